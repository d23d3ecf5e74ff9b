"""Model wrappers around transformers / diffusers (``pip install unicode2_fast[models]``).

Importing this package imports neither transformers nor PIL: they load on the first call that
needs them.
"""
from .decoder import VisualDecoder
from .mapper import ConditioningMapper, FrozenTextEncoder, MapperOutput, conditioning_sizes
from .pipeline import TextToImage
from .siglip_tokenizer import SiglipTokenizer

__all__ = ["SiglipTokenizer", "ConditioningMapper", "FrozenTextEncoder", "MapperOutput", "conditioning_sizes",
           "VisualDecoder", "TextToImage"]
