"""Triton kernels and their launchers (installed as ``unicode2_fast.kernels``).

Nothing here is imported by ``import unicode2_fast``: a kernel module is imported on the first call
that needs it, and a kernel is compiled on its first launch.
"""
