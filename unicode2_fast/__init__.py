"""unicode2_fast: exact and hierarchical search, row-sparse training and tooling for very large
visual codebooks (the tokenizer side of UniCode^2).

Importing the package touches no GPU and compiles no kernel: Triton kernels are imported and
compiled on the first call that needs them, and the heavier modules load on first attribute use.
"""
import importlib

from .codebook import Codebook
from .nearest import nearest

__version__ = "0.1.0"

# public name -> module that defines it, imported on first use
_LAZY = {
    "build_codebook": ".kmeans",
    "HierarchicalIndex": ".hierarchical",
    "gathered_embedding": ".embedding",
    "SparseRowAdamW": ".sparse_adamw",
    "nearest_grouped": ".grouped",
    "CascadedQuantizer": ".quantizer",
    "VectorQuantizer": ".quantizer",
    "MultiCodebookQuantizer": ".quantizer",
    "ResidualQuantizer": ".quantizer",
    "EMACodebook": ".quantizer",
    "large_vocab_cross_entropy": ".cross_entropy",
    "info_nce": ".cross_entropy",
}

__all__ = ["Codebook", "nearest", "distributed", *_LAZY]


def __getattr__(name):
    if name == "distributed":  # a submodule: u2.distributed.nearest(...)
        return importlib.import_module(".distributed", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unicode2_fast' has no attribute {name!r}")
