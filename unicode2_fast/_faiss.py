"""FAISS helpers shared by the exact search and the codebook build: FAISS's thread count, set for
one call and restored (FAISS's OpenMP pool is process-wide state of the user's too)."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def faiss_threads(n_threads: int) -> Iterator[None]:
    """Run the block with FAISS on ``n_threads`` OpenMP threads, then restore the caller's count."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
