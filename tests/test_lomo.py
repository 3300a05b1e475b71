import pytest
import torch

from mightylm.data.loader import Loader
from mightylm.optim.lomo import LOMO
from mightylm.train import TrainingError, fit

from test_train import config, dataset, tiny_model


def run(tmp_path, name, optimizer_for, **cfg):
    model = tiny_model()
    fit(model, Loader(dataset(), 4, seed=1), tmp_path / name, config(steps=6, grad_clip=None, warmup=1, **cfg),
        optimizer=optimizer_for(model), progress=False)
    return model


def test_lomo_without_clipping_is_plain_sgd(tmp_path):
    sgd = run(tmp_path, "sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    lomo = run(tmp_path, "lomo", lambda m: LOMO(m.parameters(), lr=0.05))
    for a, b in zip(sgd.parameters(), lomo.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_two_pass_clipping_matches_global_norm_clipping():
    def step(model, use_lomo):
        batch = Loader(dataset(), 4, seed=1).next_batch()
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        if use_lomo:
            opt = LOMO(model.parameters(), lr=0.1, clip_grad_norm=0.5)
            opt.backward(loss)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            assert norm > 0.5  # the clip really bites
            opt.step()

    a, b = tiny_model(), tiny_model()
    step(a, False)
    step(b, True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in b.parameters())  # no gradient outlives its update


def test_loss_scale_overflow_skips_the_update_and_halves_the_scale():
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    opt = LOMO(model.parameters(), lr=0.1, loss_scale=1e38)
    batch = Loader(dataset(), 4).next_batch()
    loss = torch.nn.functional.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
    opt.backward(loss)
    assert opt.skipped == 1 and opt.loss_scale == 5e37
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_lomo_refuses_settings_it_cannot_honour(tmp_path):
    model = tiny_model()
    with pytest.raises(TrainingError, match="grad_accum=1, grad_clip=None"):
        fit(model, Loader(dataset(), 4), tmp_path, config(grad_clip=1.0), optimizer=LOMO(model.parameters()),
            progress=False)
