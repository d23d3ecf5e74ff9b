"""Model wrappers around transformers / diffusers (``pip install unicode2_fast[models]``).

Importing this package imports neither transformers nor PIL: they load on the first call that
needs them.
"""
from .siglip_tokenizer import SiglipTokenizer

__all__ = ["SiglipTokenizer"]
