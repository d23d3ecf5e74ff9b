"""Helpers shared by the bench scripts: timing, peak-memory sampling, machine stamp, atomic output.

Installed as ``unicode2_fast.bench._common`` (bench/ is mapped like kernels/, see setup.py).
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import importlib
import importlib.util
import os
import platform
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

MIB = 1024 * 1024
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


class RssPeak:
    """Peak extra resident memory over a ``with`` block, sampled by a background thread.

    Extra = highest RSS seen in the block minus the RSS on entry. Sampling every ``interval_s``
    misses allocations that live shorter than that, so it is a lower bound on the true peak;
    the N x K-sized buffers the search benchmarks care about live far longer than 2 ms.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        # one fd for the whole block: pread(0) re-reads the live value without reopening
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            while not self._stop.is_set():
                self.peak = max(self.peak, int(os.pread(fd, 128, 0).split()[1]) * _PAGE_BYTES)
                self._stop.wait(self.interval_s)
        finally:
            os.close(fd)

    def __enter__(self) -> "RssPeak":
        self.base = self.peak = rss_bytes()
        if os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mib(self) -> float:
        return max(0, self.peak - self.base) / MIB


class CudaPeak:
    """Peak extra CUDA memory allocated through torch's caching allocator over a ``with`` block.

    Memory that a library allocates outside torch (FAISS's GPU resources) is not seen.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.base = 0
        self.peak = 0

    def __enter__(self) -> "CudaPeak":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def extra_mib(self) -> float:
        return max(0, self.peak - self.base) / MIB


def time_calls(
    fn: Callable[[], Any], repeats: int, warmup: int = 0, sync: Optional[Callable[[], None]] = None
) -> Tuple[List[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and before stopping the
    clock, so asynchronous GPU work is inside the measured interval whatever stream it ran on.

    Returns:
        (seconds of each timed call, the last call's result).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        result = fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times, result


def quantiles(times: Sequence[float]) -> Dict[str, float]:
    """median, p10 and p90 (linear interpolation) of the timings, in seconds."""
    p10, p90 = np.percentile(np.asarray(times, dtype=np.float64), [10, 90])
    return {"median_s": statistics.median(times), "p10_s": float(p10), "p90_s": float(p90)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _module_version(name: str) -> str:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except ImportError:
        return "absent"


def machine_stamp() -> Dict[str, Any]:
    """Where and with what a benchmark ran.

    Keys: device (the GPU name when CUDA is available, else the CPU model), cpu, gpu (None without
    CUDA), cores (usable by this process), threads (torch's intra-op threads), torch, faiss,
    triton, numpy, python versions, and date (UTC, ISO 8601).
    """
    cpu = _cpu_model()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": gpu or cpu,
        "cpu": cpu,
        "gpu": gpu,
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss": _module_version("faiss"),
        "triton": _module_version("triton"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    A crash or error mid-write leaves any existing ``path`` untouched and no temporary behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the result the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as out:
            out.write(text)


def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Write dict rows as CSV atomically; columns in order of first appearance, None -> empty."""
    fields: List[str] = []
    for row in rows:
        fields.extend(key for key in row if key not in fields)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fields, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: "" if value is None else value for key, value in row.items()})


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (and ``suffix``), or "–" for a missing value."""
    return "–" if value is None else format(value, spec) + suffix


def short_count(count: int) -> str:
    """500000 -> "500K", 2000000 -> "2M"; other counts as they are."""
    if count >= 1_000_000 and count % 100_000 == 0:
        return f"{count / 1e6:g}M"
    if count >= 1_000 and count % 100 == 0:
        return f"{count / 1e3:g}K"
    return str(count)


def stamp_text(stamp: Dict[str, Any], libraries: Sequence[str] = ("torch", "faiss", "triton", "numpy", "python")) -> str:
    """One line naming the machine, the versions of ``libraries`` and the date of a run."""
    gpu = f"GPU: {stamp['gpu']} | " if stamp["gpu"] else ""
    versions = ", ".join(f"{name} {stamp[name]}" for name in libraries)
    return f"CPU: {stamp['cpu']} ({stamp['cores']} cores, {stamp['threads']} threads) | {gpu}{versions} | {stamp['date']}"


#: dense peak TFLOP/s from NVIDIA's data sheets: (name fragment, bf16/fp16 tensor core, fp32 non-tensor)
GPU_PEAK_TFLOPS = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),
)


def gpu_peak_tflops(device_name: Optional[str], dtype: str) -> Optional[float]:
    """The data-sheet peak of ``device_name`` for ``dtype`` ("bfloat16"/"float16" on tensor cores,
    "float32" without), or None for an unknown device."""
    if not device_name:
        return None
    for fragment, tensor_core, fp32 in GPU_PEAK_TFLOPS:
        if fragment in device_name:
            return fp32 if dtype == "float32" else tensor_core
    return None


def plotting_available() -> bool:
    """Whether matplotlib is installed (``pip install "unicode2_fast[bench]"``); without it the
    benchmarks write their tables and CSVs and skip the PNGs."""
    return importlib.util.find_spec("matplotlib") is not None


NO_PLOT_NOTE = "matplotlib is not installed: no PNG plots (pip install \"unicode2_fast[bench]\" for them)"


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """Write a matplotlib figure as a PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def write_report(out_dir: str, name: str, rows: Sequence[Dict[str, Any]], table: str, stamp_line: str,
                 title: str, notes: str, plot: Optional[Callable[[str], None]] = None) -> None:
    """Print the table and stamp; write OUT/<name>.csv, OUT/<name>.md (title, table, stamp, notes)
    and, when there are rows and a ``plot(path)``, OUT/<name>.png; say what was written."""
    print(table)
    print()
    print(stamp_line)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, f"{name}.csv"))
    write_text(f"# {title}\n\n{table}\n\n{stamp_line}\n\n{notes}\n", os.path.join(out_dir, f"{name}.md"))
    written = [f"{name}.csv", f"{name}.md"]
    if rows and plot is not None:
        if plotting_available():
            plot(os.path.join(out_dir, f"{name}.png"))
            written.append(f"{name}.png")
        else:
            print(NO_PLOT_NOTE)
    print(f"wrote {', '.join(os.path.join(out_dir, file) for file in written)}")
