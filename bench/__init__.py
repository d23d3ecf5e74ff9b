"""The benchmarks, one script per op plus ``run_all`` (the main job), installed as ``unicode2_fast.bench``.

Run them as ``unicode2-fast bench`` (every op), ``python -m unicode2_fast.bench.bench_nearest`` or,
from a source checkout, ``python bench/bench_nearest.py``. Nothing here is imported by
``import unicode2_fast``.
"""
