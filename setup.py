"""Packaging: kernels/ is installed as ``unicode2_fast.kernels``.

A top-level ``kernels`` package would shadow the PyPI package of that name, which transformers
imports, so the folder is mapped under our namespace instead of being installed as-is.
"""
from setuptools import setup

setup(
    packages=["unicode2_fast", "unicode2_fast.kernels"],
    package_dir={"unicode2_fast": "unicode2_fast", "unicode2_fast.kernels": "kernels"},
)
