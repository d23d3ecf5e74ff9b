"""UnifiedModel (C2 -> projector -> Qwen2) and the stage-1/2 trainer on a tiny random Qwen2."""
import json
import math
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import unicode2_fast as u2  # noqa: E402
from unicode2_fast.models.unified import UnifiedModel  # noqa: E402
from unicode2_fast import cli  # noqa: E402
from unicode2_fast.train import TokenDataset, train, warmup_cosine  # noqa: E402

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "blue", "big", "small", "sits", "runs"]
CAPTIONS = [
    "a cat sits on the mat", "the dog runs", "a red cat", "a big blue dog", "the small cat runs",
    "a dog on the mat", "red mat", "the big cat sits", "blue dog sits on a mat", "a small red dog",
    "the cat", "a dog runs on the blue mat",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    llm_dir = root / "llm"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    codebook = u2.Codebook(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)))
    codebook_path = root / "codebook.safetensors"
    codebook.save(codebook_path)
    ids = np.random.default_rng(2).integers(0, 20, size=(12, 4)).astype(np.int64)  # rows 20..39 unused
    ids_path = root / "ids.npy"
    np.save(ids_path, ids)
    captions_path = root / "captions.jsonl"
    captions_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CAPTIONS))
    return dict(root=root, llm=str(llm_dir), codebook=str(codebook_path), ids=str(ids_path),
                captions=str(captions_path), tokenizer=tokenizer)


def _model(assets):
    torch.manual_seed(0)
    return UnifiedModel.from_pretrained(assets["llm"], assets["codebook"])


def _dataset(assets, rows=None):
    ds = TokenDataset(assets["ids"], assets["captions"], assets["tokenizer"])
    if rows is not None:
        ds.ids, ds.tokens = ds.ids[:rows], ds.tokens[:rows]
    return ds


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_matches_manual_computation(assets):
    model = _model(assets)
    ds = _dataset(assets, rows=4)
    batch = ds.collate([ds[i] for i in range(4)])
    with torch.no_grad():
        loss = model(batch["visual_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"])
        visual = model.projector(model.c2[batch["visual_ids"]])
        text = model.llm.model.embed_tokens(batch["input_ids"])
        embeds = torch.cat([visual, text], 1)
        mask = torch.cat([torch.ones(4, 4, dtype=torch.int64), batch["attention_mask"]], 1)
        labels = torch.cat([torch.full((4, 4), -100), batch["labels"]], 1)
        manual = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        # and by hand: CE of text tokens, each predicted from the previous position
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual, rtol=0, atol=0)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    # step 0 of train() reports the same loss (before any update)
    losses = train(model, ds, stage=1, steps=1, batch_size=4, shuffle=False)
    assert losses[0] == pytest.approx(float(loss), rel=1e-6)


def test_stage1_trains_projector_only_and_loss_decreases(assets):
    model = _model(assets)
    ds = _dataset(assets, rows=4)
    llm0, c20, proj0 = _snapshot(model.llm), model.c2.detach().clone(), _snapshot(model.projector)
    losses = train(model, ds, stage=1, steps=30, batch_size=4, shuffle=False, warmup_ratio=0.1)
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 0.03, losses  # a random LLM: only the projector moves
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25
    for name, value in _snapshot(model.llm).items():
        assert torch.equal(value, llm0[name]), name
    assert torch.equal(model.c2.detach(), c20)
    assert any(not torch.equal(v, proj0[k]) for k, v in _snapshot(model.projector).items())
    assert all(p.grad is None for p in model.llm.parameters())


def test_stage2_updates_only_used_c2_rows_with_sparse_grads(assets):
    model = _model(assets)
    ds = _dataset(assets, rows=4)
    c20, llm0 = model.c2.detach().clone(), _snapshot(model.llm)
    seen = []
    orig_step = u2.SparseRowAdamW.step

    def spy(self, *a, **k):
        seen.append(model.c2.grad is not None and model.c2.grad.is_sparse)
        return orig_step(self, *a, **k)

    u2.SparseRowAdamW.step = spy
    try:
        train(model, ds, stage=2, steps=3, batch_size=4, shuffle=False, lr=1e-3)
    finally:
        u2.SparseRowAdamW.step = orig_step
    assert seen == [True, True, True]
    used = torch.unique(torch.from_numpy(ds.ids))
    unused = torch.ones(40, dtype=torch.bool)
    unused[used] = False
    after = model.c2.detach()
    assert torch.equal(after[unused], c20[unused])
    assert not torch.equal(after[used], c20[used])
    assert (after[used] != c20[used]).any(dim=1).all()  # every used row moved
    assert any(not torch.equal(v, llm0[k]) for k, v in _snapshot(model.llm).items())


def test_lr_schedule_warmup_then_cosine(assets):
    f = warmup_cosine(100, 0.03)  # 3 warmup steps
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)
    assert f(3 + 97 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert f(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97)))
    # the trainer's optimizer follows it
    model = _model(assets)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3 * f(s) for s in range(5)])


def test_save_from_pretrained_round_trip(assets, tmp_path):
    model = _model(assets)
    ds = _dataset(assets, rows=4)
    train(model, ds, stage=2, steps=2, batch_size=4, shuffle=False, lr=1e-3, out_dir=tmp_path / "run")
    assert {"config.json", "model.safetensors", "llm"} <= set(os.listdir(tmp_path / "run"))
    loaded = UnifiedModel.from_pretrained(tmp_path / "run")
    batch = ds.collate([ds[i] for i in range(4)])
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model(batch["visual_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"])
        b = loaded(batch["visual_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(loaded.c2, model.c2)


def test_cli_train_end_to_end(assets, tmp_path, capsys):
    out = tmp_path / "new" / "out"  # missing folders are created
    rc = cli.main(["train", "--llm", assets["llm"], "--codebook", assets["codebook"], "--ids", assets["ids"],
                   "--captions", assets["captions"], "--stage", "1", "--steps", "3", "--batch-size", "4",
                   "--out", str(out), "--log-every", "0"])
    assert rc == 0
    assert {"config.json", "model.safetensors", "llm"} <= set(os.listdir(out))
    assert UnifiedModel.from_pretrained(out).codebook_size == 40


def test_cli_train_row_count_mismatch(assets, tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a cat"}) + "\n")
    rc = cli.main(["train", "--llm", assets["llm"], "--codebook", assets["codebook"], "--ids", assets["ids"],
                   "--captions", str(short), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("unicode2-fast train: error:") and "12 rows" in err
    assert not (tmp_path / "o").exists()


def test_cli_train_codebook_too_small_and_missing_file(assets, tmp_path, capsys):
    big = tmp_path / "big.npy"
    np.save(big, np.full((12, 4), 40, dtype=np.int64))
    rc = cli.main(["train", "--llm", assets["llm"], "--codebook", assets["codebook"], "--ids", str(big),
                   "--captions", assets["captions"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "codebook too small" in err
    rc = cli.main(["train", "--llm", assets["llm"], "--codebook", str(tmp_path / "nope.safetensors"), "--ids", assets["ids"],
                   "--captions", assets["captions"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("unicode2-fast train: error:")


def test_cli_train_llm_folder_without_a_model_is_one_line(assets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["train", "--llm", str(empty), "--codebook", assets["codebook"], "--ids", assets["ids"],
                   "--captions", assets["captions"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"unicode2-fast train: error: cannot load a tokenizer from {empty}")
    assert not (tmp_path / "o").exists()


def test_torchrun_two_ranks_fsdp2_on_cpu(assets, tmp_path):
    # two gloo ranks on the CPU: process-group set-up from torchrun's environment, FSDP2 sharding of
    # the LLM, the text embedding looked up through the registered FSDP forward method, replicated
    # (sparse) gradients averaged, and the save on rank 0
    import subprocess
    import sys

    # C2 sharded by rows across the ranks (the default) and replicated (--replicate-c2): the same
    # updates, so the same saved table; both moved away from the codebook they started from
    tables = {}
    for mode in ("sharded", "replicated"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "unicode2_fast", "train", "--llm", assets["llm"], "--codebook", assets["codebook"],
               "--ids", assets["ids"], "--captions", assets["captions"], "--stage", "2", "--steps", "2",
               "--batch-size", "2", "--out", str(out), "--log-every", "1", "--lr", "1e-2"]
        args = cmd + (["--replicate-c2"] if mode.startswith("replicated") else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=240)
        if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
            # a rank aborting in the C++ teardown after its work (seen twice in ~10 full runs on the
            # 2-core CI machine, never in isolation): one rerun; any other failure, or a second, fails
            done = subprocess.run(args, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "step 2/2" in done.stdout
        reloaded = UnifiedModel.from_pretrained(str(out))
        assert reloaded.codebook_size == 40
        tables[mode] = reloaded.c2.detach()
    torch.testing.assert_close(tables["sharded"], tables["replicated"], rtol=1e-5, atol=1e-6)
    initial = u2.Codebook.load(assets["codebook"]).vectors
    assert not torch.equal(tables["sharded"], initial)


def test_a_fresh_projector_is_the_same_whatever_the_global_generator(assets):
    # every rank of a torchrun job builds its own model: their replicated projectors must agree
    torch.manual_seed(123)
    first = UnifiedModel.from_pretrained(assets["llm"], assets["codebook"])
    torch.manual_seed(456)
    second = UnifiedModel.from_pretrained(assets["llm"], assets["codebook"])
    for a, b in zip(first.projector.parameters(), second.projector.parameters()):
        assert torch.equal(a, b)
    # and building it leaves the caller's generator where it was
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    UnifiedModel.from_pretrained(assets["llm"], assets["codebook"])
    assert torch.equal(torch.rand(3), expected)


def test_generation_loss_equals_float64_cross_entropy_on_materialised_logits(assets):
    model = _model(assets).double()
    model.init_visual_head()
    # untied head: initialised to the projected C2 rows
    torch.testing.assert_close(model.visual_head, model.projector(model.c2).detach())
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 15, (2, 5), generator=g)
    visual = torch.randint(0, 40, (2, 6), generator=g)
    loss = model.generation_loss(prompt, visual)
    # reference: the same sequence through the LLM, every logit materialised, float64 torch CE
    embeds = torch.cat([model.llm.get_input_embeddings()(prompt), model.projector(model.c2[visual])], dim=1)
    hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    logits = hidden[:, 4:10] @ model.visual_head.t()  # positions before each visual token
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), visual.reshape(-1))
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert model.visual_head.grad is not None and model.c2.grad is not None
    assert all(p.grad is not None for p in model.projector.parameters())


def test_mixed_batch_losses_and_the_head_round_trip(assets, tmp_path):
    model = _model(assets)
    model.init_visual_head(tied=True)
    g = torch.Generator().manual_seed(5)
    und = {"visual_ids": torch.randint(0, 40, (2, 4), generator=g), "input_ids": torch.randint(3, 15, (2, 6), generator=g)}
    gen = {"prompt_ids": torch.randint(3, 15, (2, 5), generator=g), "visual_ids": torch.randint(0, 40, (2, 4), generator=g),
           "prompt_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}
    out = model.losses(und, gen)
    torch.testing.assert_close(out["loss"], out["loss_und"] + out["loss_gen"])
    torch.testing.assert_close(out["loss_und"], model(und["visual_ids"], und["input_ids"]))
    with pytest.raises(ValueError, match="left-padded"):
        model.generation_loss(gen["prompt_ids"], gen["visual_ids"], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="und"):
        model.losses()
    model.save_pretrained(tmp_path / "tied")
    assert UnifiedModel.from_pretrained(str(tmp_path / "tied")).visual_head_mode == "tied"
    untied = _model(assets)
    untied.init_visual_head()
    untied.save_pretrained(tmp_path / "untied")
    reloaded = UnifiedModel.from_pretrained(str(tmp_path / "untied"))
    assert reloaded.visual_head_mode == "untied" and torch.equal(reloaded.visual_head, untied.visual_head.detach())
    with pytest.raises(RuntimeError, match="no visual head"):
        _model(assets).generation_loss(gen["prompt_ids"], gen["visual_ids"])


def test_sample_ids_keeps_to_top_k_and_the_nucleus():
    from unicode2_fast.models.sampling import sample_ids

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 300, generator=g) * 3
    top = logits.topk(7, dim=1).indices
    for _ in range(50):
        ids = sample_ids(logits, 1.0, top_k=7, generator=g)
        assert bool((ids.unsqueeze(1) == top).any(dim=1).all())
    probs = logits.softmax(dim=1)
    order = probs.sort(dim=1, descending=True)
    nucleus = [order.indices[b, :int((order.values[b].cumsum(0) < 0.8).sum()) + 1] for b in range(4)]
    for _ in range(50):
        ids = sample_ids(logits, 1.0, top_p=0.8, generator=g)
        assert all(int(ids[b]) in nucleus[b].tolist() for b in range(4))
    assert torch.equal(sample_ids(logits, 0.0), logits.argmax(dim=1))
    # a nucleus wider than the first block of candidates: the block grows until it covers top_p
    import unicode2_fast.models.sampling as sampling

    gentle = -torch.arange(100, dtype=torch.float32).unsqueeze(0) * 0.05  # top 16 ids hold < 90%
    inside = int((gentle.softmax(dim=1)[0].cumsum(0) < 0.9).sum()) + 1
    assert inside > 16
    saved, sampling.NUCLEUS_CANDIDATES = sampling.NUCLEUS_CANDIDATES, 16
    try:
        ids = torch.cat([sample_ids(gentle, 1.0, top_p=0.9, generator=g) for _ in range(300)])
    finally:
        sampling.NUCLEUS_CANDIDATES = saved
    assert int(ids.max()) >= 16 and int(ids.max()) < inside  # ids past the first block, none past the nucleus
    with pytest.raises(ValueError, match="top_p"):
        sample_ids(logits, 1.0, top_p=1.5)


def test_greedy_generation_with_the_cache_equals_recomputing_the_sequence(assets):
    model = _model(assets)
    model.init_visual_head()
    model.eval()
    prompt = torch.randint(3, 15, (2, 5), generator=torch.Generator().manual_seed(7))
    ids = model.generate_visual_ids(prompt, 4, temperature=0.0)
    assert ids.shape == (2, 4) and bool(((ids >= 0) & (ids < 40)).all())
    with torch.no_grad():  # reference: the whole sequence again at every step, no cache
        tokens = torch.empty((2, 0), dtype=torch.int64)
        for _ in range(4):
            embeds = torch.cat([model.llm.get_input_embeddings()(prompt), model.visual_embeds(tokens)], dim=1)
            hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1]
            tokens = torch.cat([tokens, (hidden @ model.visual_head.t()).argmax(dim=1, keepdim=True)], dim=1)
    assert torch.equal(ids, tokens)
    # guidance 1 is the conditional stream itself; sampling is reproducible from its generator
    assert torch.equal(model.generate_visual_ids(prompt, 4, temperature=0.0, guidance_scale=1.0), ids)
    first = model.generate_visual_ids(prompt, 5, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    again = model.generate_visual_ids(prompt, 5, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert model.generate_visual_ids(prompt, 3, guidance_scale=3.0, generator=torch.Generator().manual_seed(2)).shape == (2, 3)
