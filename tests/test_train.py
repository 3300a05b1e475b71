import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mightylm.data.loader import Loader
from mightylm.train import TrainConfig, TrainingError, cross_entropy, evaluate, fit, lr_at

from conftest import tiny


def dataset(n=64, seq=16, vocab=64, seed=0):
    """A learnable toy language: each sequence counts up by a random stride modulo vocab."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        start, stride = torch.randint(0, vocab, (2,), generator=g).tolist()
        seq_ids = (start + (stride % 7 + 1) * torch.arange(seq + 1)) % vocab
        items.append({"input_ids": seq_ids[:-1], "labels": seq_ids[1:]})
    return items


def tiny_model(seed=0):
    return tiny(seed, vocab_size=64, n_layers=2)


def config(**overrides):
    base = dict(steps=20, batch_size=4, lr=3e-3, warmup=2, eval_every=10, eval_batches=None, save_every=10,
                log_every=1)
    return TrainConfig(**{**base, **overrides})


def test_loss_falls_and_metrics_are_written(tmp_path):
    model = tiny_model()
    val = Loader(dataset(16, seed=1), 8, shuffle=False)
    before = evaluate(model, val)
    summary = fit(model, Loader(dataset(), 4), tmp_path, config(steps=60), val=val, progress=False)
    assert summary["val_loss"] < before - 1.0
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == list(range(1, 61))
    assert train_lines[-1]["tokens"] == 60 * 4 * 16 and all(l["tokens_per_s"] > 0 for l in train_lines)
    assert [l["step"] for l in lines if "val_loss" in l] == [10, 20, 30, 40, 50, 60]


def test_resume_is_exact(tmp_path):
    straight = tiny_model()
    fit(straight, Loader(dataset(), 4, seed=3), tmp_path / "a", config(), progress=False)
    half = tiny_model()
    fit(half, Loader(dataset(), 4, seed=3), tmp_path / "b", config(steps=20, save_every=10),
        loss_fn=_stop_after(10), progress=False)
    again = tiny_model(seed=99)  # different init: everything must come from the checkpoint
    summary = fit(again, Loader(dataset(), 4, seed=3), tmp_path / "b", config(), resume=True, progress=False)
    assert summary["step"] == 20
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 21))


def _stop_after(n):
    """A loss function that sends this process SIGTERM during step n, as an operator would."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return cross_entropy(model, batch)

    return loss_fn


def test_sigterm_saves_and_stops(tmp_path):
    summary = fit(tiny_model(), Loader(dataset(), 4), tmp_path, config(save_every=100), loss_fn=_stop_after(7),
                  progress=False)
    assert summary["interrupted"] and summary["step"] == 7
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        loss = cross_entropy(model, batch)
        return loss * float("nan") if calls["n"] > 12 else loss

    model = tiny_model()
    with pytest.raises(TrainingError, match=r"loss became nan at step 13.*last good checkpoint is kept"):
        fit(model, Loader(dataset(), 4), tmp_path, config(), loss_fn=exploding, progress=False)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 10
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    big, accum = tiny_model(), tiny_model()
    fit(big, Loader(dataset(), 8, seed=1), tmp_path / "a", config(steps=5, batch_size=8), progress=False)
    fit(accum, Loader(dataset(), 4, seed=1), tmp_path / "b", config(steps=5, batch_size=4, grad_accum=2),
        progress=False)
    # the loader hands out the same 8 items per step either way; same-length rows make the means equal
    for a, b in zip(big.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="--resume: no checkpoint"):
        fit(tiny_model(), Loader(dataset(), 4), tmp_path, config(), resume=True, progress=False)


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from test_train import dataset, tiny_model, config
    from mightylm.data.loader import Loader
    from mightylm.train import fit
    distributed = len(sys.argv) > 3
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = tiny_model()
    loader = Loader(dataset(), 8 // world, seed=2, rank=rank, world_size=world)
    fit(model, loader, sys.argv[2], config(steps=8, batch_size=8 // world, fsdp=sys.argv[3:] == ["fsdp"]),
        progress=False)
    if distributed:
        dist.destroy_process_group()
""")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one_process(tmp_path, mode):
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, script, tests, tmp_path / "one"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: torchrun picks its own free rendezvous port (no race with a port chosen here)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, tests, tmp_path / "two", mode], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 8
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    plain, recomputed = tiny_model(), tiny_model()
    fit(plain, Loader(dataset(), 4, seed=1), tmp_path / "a", config(steps=4), progress=False)
    fit(recomputed, Loader(dataset(), 4, seed=1), tmp_path / "b", config(steps=4, activation_checkpointing=True),
        progress=False)
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains(tmp_path):
    model = tiny_model()
    val = Loader(dataset(16, seed=1), 8, shuffle=False)
    before = evaluate(model, val)
    summary = fit(model, Loader(dataset(), 4), tmp_path, config(steps=40, bf16=True), val=val, progress=False)
    assert summary["val_loss"] < before - 0.5
    assert model.embed.weight.dtype == torch.float32  # master weights stay float32


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(tmp_path, monkeypatch):
    import warnings

    import mightylm.kernels

    monkeypatch.setattr(mightylm.kernels, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(UserWarning, match="without bfloat16 instructions.*train in float32"):
        fit(tiny_model(), Loader(dataset(8), 4), tmp_path / "a", config(steps=1, bf16=True), progress=False)
    monkeypatch.setattr(mightylm.kernels, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*bfloat16 instructions")
        fit(tiny_model(), Loader(dataset(8), 4), tmp_path / "b", config(steps=1, bf16=True), progress=False)


class _Wrapper(torch.nn.Module):
    """A module around a Transformer (as recurrent memory or a vision-language model is), with an extra parameter."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, idx, labels):
        h = self.inner.trunk(self.inner.inputs(idx))
        return self.inner.loss(h * self.scale, labels)


def _loss_with_parts(model, batch):
    loss = model(batch["input_ids"], labels=batch["labels"])
    return loss, {"ce": loss.detach(), "scale": model.scale.detach()}


def _tied(seed=0):
    return tiny(seed, vocab_size=64, n_layers=2, tie_embeddings=True)


def test_a_wrapper_trains_through_fit_with_named_loss_parts_checkpointing_and_resume(tmp_path):
    from mightylm.report import write_report

    model = _Wrapper(_tied())
    assert model.inner.head_shares_embedding
    cfg = config(steps=6, save_every=3, eval_every=3, activation_checkpointing=True)
    val = Loader(dataset(8, seed=1), 4, shuffle=False)
    fit(model, Loader(dataset(), 4, seed=3), tmp_path, cfg, val=val, loss_fn=_loss_with_parts, progress=False)
    assert all(getattr(block, "_checkpointed", False) for block in model.inner.layers)  # found by type
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["ce"] == pytest.approx(r["loss"], rel=1e-5) and "scale" in r for r in train_rows)
    assert "| final ce |" in write_report(tmp_path).read_text()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert "inner.embed.weight" in saved and "inner.lm_head.weight" not in saved and "scale" in saved
    again = _Wrapper(_tied(seed=5))
    summary = fit(again, Loader(dataset(), 4, seed=3), tmp_path, config(steps=8, save_every=3, eval_every=3),
                  val=val, loss_fn=_loss_with_parts, resume=True, progress=False)
    assert summary["step"] == 8 and again.inner.lm_head.weight is again.inner.embed.weight
