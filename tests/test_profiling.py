"""NVTX ranges are a no-op without the nvtx package or CUDA, and always reach the torch profiler."""
import torch

from unicode2_fast import profiling


def test_stage_without_nvtx_still_records_for_torch_profiler(monkeypatch):
    monkeypatch.setattr(profiling, "_nvtx", None)
    assert not profiling.nvtx_available()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiling.stage("unit/test_stage"):
            torch.ones(4).sum()
    assert "unit/test_stage" in {event.name for event in prof.events()}


def test_stage_outside_profiler_is_transparent():
    with profiling.stage("unit/plain"):
        value = torch.arange(3).sum().item()
    assert value == 3


def test_profiling_is_a_leaf_module():
    # every layer marks its stages with it, so it imports nothing of the package
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(profiling.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("unicode2_fast"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("unicode2_fast") for alias in node.names), ast.dump(node)
