"""unicode2_fast: exact and hierarchical search, row-sparse training and tooling for very large
visual codebooks (the tokenizer side of UniCode^2).

Importing the package touches no GPU and compiles no kernel: Triton kernels are imported and
compiled on the first call that needs them.
"""
from .codebook import Codebook
from .search import nearest

__all__ = ["Codebook", "nearest"]
__version__ = "0.1.0"
