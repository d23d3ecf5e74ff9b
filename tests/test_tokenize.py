"""SiglipTokenizer and `unicode2-fast tokenize` on a tiny random SigLIP (28 px, 14 px patches: 4
patches of dim 32) and a random K = 50 codebook."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

import unicode2_fast as u2  # noqa: E402
from unicode2_fast import cli  # noqa: E402
from unicode2_fast.models import SiglipTokenizer  # noqa: E402

HIDDEN, IMAGE_SIZE, PATCH, K = 32, 28, 14, 50
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def _image_processor_class():
    # the PIL processor needs no torchvision; older transformers have only SiglipImageProcessor
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=HIDDEN, image_size=IMAGE_SIZE, patch_size=PATCH, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37,
    )
    model_dir = root / "siglip"
    transformers.SiglipVisionModel(config).save_pretrained(model_dir)
    _image_processor_class()(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(model_dir)

    generator = torch.Generator().manual_seed(1)
    codebook_path = root / "codebook.safetensors"
    u2.Codebook(torch.randn(K, HIDDEN, generator=generator)).save(codebook_path)
    wrong_dim_path = root / "codebook16.safetensors"
    u2.Codebook(torch.randn(K, 16, generator=generator)).save(wrong_dim_path)

    images_dir = root / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(2)
    names = ["b.png", "a.png", "c.jpg", "d.PNG", "e.bmp"]  # odd sizes; read back sorted by name
    for i, name in enumerate(names):
        pixels = rng.integers(0, 256, size=(20 + 7 * i, 33 - 3 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / name)
    (images_dir / "notes.txt").write_text("not an image")
    return {
        "root": root, "model_dir": model_dir, "codebook": codebook_path, "wrong_dim": wrong_dim_path,
        "images_dir": images_dir, "names": sorted(names),
    }


@pytest.fixture(scope="module")
def tokenizer(assets):
    return SiglipTokenizer.from_pretrained(assets["model_dir"], assets["codebook"])


def _paths(assets):
    return [assets["images_dir"] / name for name in assets["names"]]


def test_features_match_transformers(assets, tokenizer):
    pil_images = [Image.open(path).convert("RGB") for path in _paths(assets)]
    features = tokenizer.features(_paths(assets), batch_size=2)
    assert features.shape == (len(pil_images), N_PATCHES, HIDDEN)
    assert features.dtype == torch.float32

    model = transformers.SiglipVisionModel.from_pretrained(assets["model_dir"]).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(assets["model_dir"])
    with torch.no_grad():
        expected = model(pixel_values=processor(images=pil_images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(features, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    # PIL images and paths give the same features
    torch.testing.assert_close(tokenizer.features(pil_images[:2]), features[:2])


def test_tokenize_is_nearest_codeword(assets, tokenizer):
    features = tokenizer.features(_paths(assets))  # (B, P, d)
    ids = tokenizer.tokenize(_paths(assets), batch_size=2)
    assert ids.shape == (len(assets["names"]), N_PATCHES) and ids.dtype == torch.int64

    codebook = u2.Codebook.load(assets["codebook"])
    expected_ids, _ = u2.nearest(features, codebook)
    assert torch.equal(ids, expected_ids)

    x = features.reshape(-1, HIDDEN).double()
    dists = torch.cdist(x, codebook.vectors.double()) ** 2  # (B * P, K), float64 truth
    truth = dists.argmin(dim=1).reshape(ids.shape)
    picked = dists.gather(1, ids.reshape(-1, 1)).squeeze(1)
    clear_gap = (dists.sort(dim=1).values[:, 1] - dists.min(dim=1).values) > 1e-6 * dists.min(dim=1).values
    assert torch.equal(ids.reshape(-1)[clear_gap], truth.reshape(-1)[clear_gap])
    torch.testing.assert_close(picked, dists.min(dim=1).values, rtol=1e-6, atol=1e-9)


def test_tokenize_accepts_codebook_objects(assets, tokenizer):
    codebook = u2.Codebook.load(assets["codebook"])
    by_tensor = SiglipTokenizer(tokenizer.vision_model, tokenizer.image_processor, codebook.vectors)
    paths = _paths(assets)[:2]
    assert torch.equal(by_tensor.tokenize(paths), tokenizer.tokenize(paths))
    assert tokenizer.tokenize([]).shape == (0, N_PATCHES)


def test_from_pretrained_errors(assets, tmp_path):
    with pytest.raises(ValueError, match="codebook dim 16 does not match the SigLIP hidden size 32"):
        SiglipTokenizer.from_pretrained(assets["model_dir"], assets["wrong_dim"])
    with pytest.raises(FileNotFoundError, match="SigLIP model directory not found"):
        SiglipTokenizer.from_pretrained(tmp_path / "missing", assets["codebook"])
    no_processor = tmp_path / "no_processor"
    transformers.SiglipVisionModel.from_pretrained(assets["model_dir"]).save_pretrained(no_processor)
    with pytest.raises(FileNotFoundError, match=f"{no_processor}.*preprocessor_config.json"):
        SiglipTokenizer.from_pretrained(no_processor, assets["codebook"])


def test_cli_writes_ids_and_names(assets, tokenizer, tmp_path, capsys):
    out = tmp_path / "ids.npy"
    argv = [str(assets["images_dir"]), "--siglip", str(assets["model_dir"]), "--codebook", str(assets["codebook"]),
            "--out", str(out), "--batch-size", "2"]
    assert cli.main(["tokenize", *argv]) == 0
    ids = np.load(out)
    assert ids.dtype == np.int64 and ids.shape == (len(assets["names"]), N_PATCHES)
    np.testing.assert_array_equal(ids, tokenizer.tokenize(_paths(assets)).numpy())
    assert json.loads((tmp_path / "ids.json").read_text()) == assets["names"]
    assert sorted(os.listdir(tmp_path)) == ["ids.json", "ids.npy"]  # no temporary files left
    assert "wrote" in capsys.readouterr().out


def _cli_error(argv, capsys):
    assert cli.main(["tokenize", *argv]) == 2
    err = capsys.readouterr().err
    prefix = "unicode2-fast tokenize: error: "
    # one error line, no traceback (transformers' "Loading weights" bar may come before it)
    assert err.count(prefix) == 1 and err.endswith("\n") and "Traceback" not in err
    error_line = err.rstrip("\n").split("\n")[-1]
    assert error_line.startswith(prefix)
    return error_line


def test_cli_errors(assets, tmp_path, capsys):
    model, codebook = str(assets["model_dir"]), str(assets["codebook"])
    out = str(tmp_path / "ids.npy")

    err = _cli_error([str(tmp_path / "nowhere"), "--siglip", model, "--codebook", codebook, "--out", out], capsys)
    assert "image folder not found" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error([str(empty), "--siglip", model, "--codebook", codebook, "--out", out], capsys)
    assert "no images" in err

    images = str(assets["images_dir"])
    err = _cli_error([images, "--siglip", str(tmp_path / "no_model"), "--codebook", codebook, "--out", out], capsys)
    assert "SigLIP model directory not found" in err

    err = _cli_error([images, "--siglip", model, "--codebook", str(assets["wrong_dim"]), "--out", out], capsys)
    assert "codebook dim 16" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(corrupt / "good.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    err = _cli_error([str(corrupt), "--siglip", model, "--codebook", codebook, "--out", out], capsys)
    assert "broken.png" in err

    err = _cli_error([images, "--siglip", model, "--out", out], capsys)  # missing --codebook
    assert "--codebook" in err
    assert not os.path.exists(out)
