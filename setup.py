"""Packaging: kernels/ and bench/ are installed as ``unicode2_fast.kernels`` and ``unicode2_fast.bench``.

A top-level ``kernels`` package would shadow the PyPI package of that name, which transformers
imports, so the folder is mapped under our namespace instead of being installed as-is; bench/ is
mapped the same way so that ``unicode2-fast bench`` works after a regular (non-editable) install.
Every subpackage of unicode2_fast/ (models/, cli/, ...) is found automatically.
"""
from setuptools import find_packages, setup

MAPPED = {"unicode2_fast.kernels": "kernels", "unicode2_fast.bench": "bench"}

setup(
    packages=["unicode2_fast", *(f"unicode2_fast.{name}" for name in find_packages("unicode2_fast")), *MAPPED],
    package_dir={"unicode2_fast": "unicode2_fast", **MAPPED},
)
