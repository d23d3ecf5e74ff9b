"""Codebook: construction checks, safetensors round trip, atomic save, clear load errors, sq_norms."""
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch

from unicode2_fast.codebook import Codebook


def _vectors(k=7, d=129, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=generator, dtype=torch.float64).to(dtype)


def _meta(k=7, d=129):
    return {
        "coarse_ids": torch.arange(k, dtype=torch.int64) % 3,  # (K,)
        "coarse_centroids": _vectors(3, d, seed=1),  # (n_coarse, d)
        "n_coarse": 3,
        "name": "siglip-so400m",
        "mse_history": [1.5, 1.25, 1.125],
        "config": {"niter": 20, "seed": 0, "nested": {"ok": True, "none": None}},
    }


def _assert_meta_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype, key
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def _leftovers(directory, keep):
    return sorted(name for name in os.listdir(directory) if name not in keep)


# construction ---------------------------------------------------------------


def test_from_torch_keeps_tensor_without_copy():
    vectors = _vectors()
    cb = Codebook(vectors)
    assert cb.vectors is vectors
    assert (cb.k, cb.dim, len(cb)) == (7, 129, 7)
    assert cb.dtype == torch.float32 and cb.device == torch.device("cpu")
    assert cb.meta == {}


def test_from_numpy_shares_memory():
    array = _vectors(5, 3).numpy()
    cb = Codebook(array)
    assert cb.vectors.data_ptr() == array.ctypes.data
    assert torch.equal(cb.vectors, torch.from_numpy(array))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_dtypes_kept(dtype):
    cb = Codebook(_vectors(dtype=dtype))
    assert cb.dtype == dtype


def test_non_contiguous_made_contiguous():
    vectors = _vectors(129, 7).t()  # (7, 129), transposed view
    cb = Codebook(vectors)
    assert cb.vectors.is_contiguous()
    assert torch.equal(cb.vectors, vectors)


def test_numpy_meta_becomes_tensor():
    cb = Codebook(_vectors(), meta={"coarse_ids": np.arange(7)})
    assert isinstance(cb.meta["coarse_ids"], torch.Tensor)


def test_repr_and_to():
    cb = Codebook(_vectors(), meta=_meta())
    assert repr(cb) == (
        "Codebook(k=7, dim=129, dtype=torch.float32, device=cpu, "
        "meta_keys=['coarse_ids', 'coarse_centroids', 'n_coarse', 'name', 'mse_history', 'config'])"
    )
    half = cb.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and cb.dtype == torch.float32
    _assert_meta_equal(half.meta, cb.meta)


def test_to_overflowing_dtype_raises():
    with pytest.raises(ValueError, match="non-finite"):
        Codebook(torch.full((2, 3), 1e6)).to(dtype=torch.float16)


@pytest.mark.parametrize(
    "vectors, error, message",
    [
        (torch.zeros(0, 4), ValueError, "empty codebook"),
        (torch.zeros(4, 0), ValueError, "empty codebook"),
        (torch.zeros(4), ValueError, "2-D"),
        (torch.zeros(2, 3, 4), ValueError, "2-D"),
        (torch.zeros(4, 3, dtype=torch.int64), TypeError, "floating"),
        (np.zeros((4, 3), dtype=np.int32), TypeError, "floating"),
        ([[0.0, 1.0]], TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_vectors(vectors, error, message):
    with pytest.raises(error, match=message):
        Codebook(vectors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vectors(bad):
    vectors = _vectors()
    vectors[4, 2] = bad
    with pytest.raises(ValueError, match=r"vectors contains non-finite values .*first in row 4"):
        Codebook(vectors)


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"callback": print}, r"meta\['callback'\] is neither a tensor nor JSON-serialisable"),
        ({"nested": [torch.zeros(1)]}, r"meta\['nested'\] is neither a tensor nor JSON-serialisable"),
        ({1: "one"}, "meta keys must be strings"),
        ([("a", 1)], "meta must be a dict"),
    ],
)
def test_bad_meta(meta, message):
    with pytest.raises(TypeError, match=message):
        Codebook(_vectors(), meta=meta)


def test_bad_meta_added_after_construction_fails_on_save(tmp_path):
    cb = Codebook(_vectors())
    cb.meta["handle"] = object()
    with pytest.raises(TypeError, match=r"meta\['handle'\]"):
        cb.save(tmp_path / "cb.safetensors")
    assert os.listdir(tmp_path) == []


# save / load ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip(tmp_path, dtype):
    vectors = _vectors(dtype=dtype)
    meta = _meta()
    path = tmp_path / "cb.safetensors"
    assert Codebook(vectors, meta=meta).save(path) is None
    loaded = Codebook.load(path)
    assert loaded.dtype == dtype
    assert torch.equal(loaded.vectors.view(torch.uint8), vectors.view(torch.uint8))  # bitwise
    _assert_meta_equal(loaded.meta, meta)
    assert _leftovers(tmp_path, keep={"cb.safetensors"}) == []


def test_file_layout(tmp_path):
    path = str(tmp_path / "cb.safetensors")
    Codebook(_vectors(), meta=_meta()).save(path)
    with safetensors.safe_open(path, framework="pt") as file:
        header = file.metadata()
        assert sorted(file.keys()) == ["meta.coarse_centroids", "meta.coarse_ids", "vectors"]
    assert header["format"] == "unicode2_fast.codebook" and header["version"] == "1"
    assert json.loads(header["meta_json"]) == {k: v for k, v in _meta().items() if not isinstance(v, torch.Tensor)}


def test_save_handles_views_and_shared_memory(tmp_path):
    base = _vectors(20, 5)
    vectors = base[:10]  # contiguous view into a larger storage
    meta = {"first_rows": vectors[:2], "strided": base[:, 0]}  # shares memory; non-contiguous
    path = tmp_path / "cb.safetensors"
    Codebook(vectors, meta=meta).save(path)
    loaded = Codebook.load(path)
    assert torch.equal(loaded.vectors, vectors)
    _assert_meta_equal(loaded.meta, meta)


def test_save_overwrites_existing(tmp_path):
    path = tmp_path / "cb.safetensors"
    Codebook(_vectors(seed=1)).save(path)
    Codebook(_vectors(seed=2)).save(path)
    assert torch.equal(Codebook.load(path).vectors, _vectors(seed=2))
    assert _leftovers(tmp_path, keep={"cb.safetensors"}) == []


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as file:
        file.write(b"\x00" * 16)  # a partial write, then the failure
    raise OSError("disk full")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    path = tmp_path / "cb.safetensors"
    with pytest.raises(OSError, match="disk full"):
        Codebook(_vectors()).save(path)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "cb.safetensors"
    Codebook(_vectors(seed=1)).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        Codebook(_vectors(seed=2)).save(path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, keep={"cb.safetensors"}) == []


def test_interrupted_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "cb.safetensors"
    Codebook(_vectors(seed=1)).save(path)
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Codebook(_vectors(seed=2)).save(path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, keep={"cb.safetensors"}) == []


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        Codebook(_vectors()).save(tmp_path / "missing" / "cb.safetensors")


# load errors ----------------------------------------------------------------


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Codebook.load(path)


def test_load_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        Codebook.load(tmp_path)


@pytest.mark.parametrize("keep_bytes", [0, 5, 8, 40, -1])
def test_load_truncated(tmp_path, keep_bytes):
    path = tmp_path / "cb.safetensors"
    Codebook(_vectors(), meta=_meta()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match=r"cb\.safetensors: not a valid safetensors file"):
        Codebook.load(path)


def test_load_random_bytes(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=r"random\.bin: not a valid safetensors file"):
        Codebook.load(path)


def test_load_foreign_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"vectors": _vectors()}, str(path))  # no format metadata
    with pytest.raises(ValueError, match=r"model\.safetensors is not a unicode2_fast codebook"):
        Codebook.load(path)


def test_load_ours_without_vectors(tmp_path):
    path = tmp_path / "cb.safetensors"
    safetensors.torch.save_file(
        {"weights": _vectors()}, str(path), metadata={"format": "unicode2_fast.codebook", "version": "1"}
    )
    with pytest.raises(ValueError, match="is not a unicode2_fast codebook"):
        Codebook.load(path)


def _write_raw(path, vectors, version="1", meta_json="{}"):
    metadata = {"format": "unicode2_fast.codebook", "version": version, "meta_json": meta_json}
    safetensors.torch.save_file({"vectors": vectors}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "vectors, message",
    [
        (torch.zeros(7), r"2-D .* got shape \(7,\)"),
        (torch.zeros(2, 3, 4), r"2-D .* got shape \(2, 3, 4\)"),
        (torch.zeros(4, 3, dtype=torch.int32), "floating .* got dtype torch.int32"),
        (torch.zeros(0, 3), "empty codebook"),
        (torch.tensor([[0.0, float("nan")]]), "non-finite values"),
    ],
)
def test_load_invalid_stored_vectors(tmp_path, vectors, message):
    path = tmp_path / "cb.safetensors"
    _write_raw(path, vectors)
    with pytest.raises(ValueError, match=r"cb\.safetensors: invalid stored codebook: .*" + message):
        Codebook.load(path)


def test_load_unsupported_version(tmp_path):
    path = tmp_path / "cb.safetensors"
    _write_raw(path, _vectors(), version="99")
    with pytest.raises(ValueError, match="unsupported codebook version '99'"):
        Codebook.load(path)


@pytest.mark.parametrize("meta_json", ["{not json", "[1, 2]"])
def test_load_corrupt_meta_json(tmp_path, meta_json):
    path = tmp_path / "cb.safetensors"
    _write_raw(path, _vectors(), meta_json=meta_json)
    with pytest.raises(ValueError, match=r"cb\.safetensors: corrupt codebook metadata"):
        Codebook.load(path)


# sq_norms -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sq_norms_match_float64_reference(dtype):
    cb = Codebook(_vectors(k=1153, d=129, dtype=dtype))
    reference = cb.vectors.double().pow(2).sum(dim=1)  # (K,)
    norms = cb.sq_norms()
    assert norms.dtype == torch.float32 and norms.shape == (1153,)
    # Summed in float64, so the only error left is the final rounding to float32.
    assert torch.equal(norms, reference.float())
    assert torch.equal(cb.sq_norms(torch.float64), reference)


def test_sq_norms_chunked(monkeypatch):
    import unicode2_fast.codebook as codebook_module

    monkeypatch.setattr(codebook_module, "_NORM_CHUNK_ELEMENTS", 3 * 129 + 5)  # 3 rows per chunk
    cb = Codebook(_vectors(k=10, d=129))
    assert torch.equal(cb.sq_norms(torch.float64), cb.vectors.double().pow(2).sum(dim=1))


def test_sq_norms_cached_until_cleared():
    cb = Codebook(_vectors())
    first = cb.sq_norms()
    assert cb.sq_norms() is first
    assert cb.sq_norms(torch.float64) is not first
    cb.vectors.mul_(2)
    cb.clear_cache()
    assert torch.equal(cb.sq_norms(), 4 * first)
