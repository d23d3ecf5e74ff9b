"""``unicode2-fast profile``: a torch-profiler Chrome trace of one op on synthetic data, with the
u2 stage ranges (and NVTX ranges under Nsight, see ``unicode2_fast.profiling``)."""
from __future__ import annotations

import argparse
import os

import torch

from .._io import atomic_write
from ._errors import UserError, int_at_least
from ._paths import check_out_dir, saving

NAME = "profile"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="write a torch-profiler Chrome trace of one op on synthetic data",
        description="Trace one op (u2 stage ranges included) with the torch profiler.",
        epilog="example: unicode2-fast profile nearest --k 50000 --n 729 --out traces",
    )
    parser.add_argument("op", choices=["nearest"], help="the op to profile")
    parser.add_argument("--k", type=int_at_least(1), default=50_000, help="codebook size (default 50000)")
    parser.add_argument("--n", type=int_at_least(1), default=729, help="queries (default 729: one image)")
    parser.add_argument("--d", type=int_at_least(1), default=1152, help="dimension (default 1152)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="traces",
                        help="output directory (default traces/); missing folders are created")


def profile_nearest(out_dir: str, k: int = 50_000, n: int = 729, d: int = 1152, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, repeats: int = 2) -> str:
    """Chrome trace of ``u2.nearest`` on synthetic SigLIP-like data; returns the trace path.

    One warm-up call (codebook statistics / kernel compile) runs outside the trace, then
    ``repeats`` traced calls. The trace is written atomically into ``out_dir`` (created when
    missing). Open the JSON in chrome://tracing or https://ui.perfetto.dev.

    Raises:
        ValueError: k, d < 1 or n < 0 (from the data generator).
        UserError: the trace cannot be written (the message names it).
    """
    from ..data import siglip_like
    from ..nearest import nearest

    data = siglip_like(k, n, d)
    x = data.queries.to(device=device, dtype=dtype)  # (n, d)
    codebook = data.codebook.to(device=device, dtype=dtype)  # (k, d)
    nearest(x, codebook)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            nearest(x, codebook)
        if device == "cuda":
            torch.cuda.synchronize()
    path = os.path.join(out_dir, f"trace_nearest_{device}_k{k}_n{n}.json")
    with saving(path):
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(path, prof.export_chrome_trace)
    return path


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    check_out_dir(args.out)
    path = profile_nearest(args.out, k=args.k, n=args.n, d=args.d, device=args.device)
    print(f"wrote {path} (open in chrome://tracing or ui.perfetto.dev)")
    return 0
