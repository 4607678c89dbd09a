"""The fast path (``AdversarialStep(fast=True)``, ``perturb(compile_backend=...)``) computes what the eager path does.

The default suite compiles with the ``aot_eager`` backend: dynamo traces the iteration (forward, ``torch.func.grad``,
step, projection) into one graph and AOTAutograd runs it, in seconds. Inductor's generated kernels are checked by
the slow test at the end (minutes of C++ compilation on a CPU). fp32 on a CPU: the tolerances are a few float32
ulps of the values compared.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch._dynamo.utils import counters

from robustmix import (
    AdaLabLabels,
    AdaLabWeights,
    AdversarialCE,
    AdversarialStep,
    AdversarysAdversary,
    PGDAttack,
    ProbabilityMargin,
)
from robustmix.attacks import perturb
from robustmix.data import DATASETS, load_dataset
from robustmix.models import create_model, unwrap_model
from robustmix.stages.losses import TRADESLoss
from robustmix.training.trainer import Trainer

BACKEND = "aot_eager"
EPS, STEP = 8 / 255, 2 / 255
#: Sign steps move pixels by exact multiples of the step; a few float32 ulps of [0, 1] values and of the losses.
ATOL = 1e-6

METHODS = {
    "pgd_at": lambda: [PGDAttack(EPS, STEP, 3), AdversarialCE()],
    "trades": lambda: [PGDAttack(EPS, STEP, 3, loss="kl", start="normal"), TRADESLoss(6.0)],
    "adalab": lambda: [
        PGDAttack(EPS, STEP, 3), AdversarysAdversary(1), ProbabilityMargin(), AdaLabLabels(), AdaLabWeights(),
        AdversarialCE(),
    ],
}  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches (and its recompile limit) are process-wide."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = DATASETS["digits"]
    return create_model("test_resnet", 10, in_chans=1, mean=spec.mean, std=spec.std)


def batches(sizes: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 1, 32, 32, generator=gen), torch.randint(0, 10, (b,), generator=gen)) for b in sizes]


@pytest.mark.parametrize(
    "options",
    [{}, {"loss": "kl", "start": "normal"}, {"norm": "l2", "eps": 0.5, "step_size": 0.1}, {"descend": True}],
    ids=["ce", "kl", "l2", "descend"],
)
def test_compiled_iterations_give_the_eager_iterates(options):
    model = make_model().eval()
    (x, y), = batches((8,))  # fmt: skip
    reference = model(x).detach() if options.get("loss") == "kl" else None
    kwargs = {"eps": EPS, "step_size": STEP, "steps": 3, "reference": reference} | options
    seen = {"eager": [], "compiled": []}
    runs = {}
    for name, backend in (("eager", None), ("compiled", BACKEND)):
        observer = lambda k, logits, x_k, name=name: seen[name].append((k, logits, x_k))  # noqa: E731
        generator = torch.Generator().manual_seed(1)
        runs[name] = perturb(model, x, y, **kwargs, observer=observer, generator=generator, compile_backend=backend)
    torch.testing.assert_close(runs["compiled"], runs["eager"], atol=ATOL, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert [k for k, *_ in seen["compiled"]] == [0, 1, 2]
    for (_, logits, x_k), (_, eager_logits, eager_x_k) in zip(seen["compiled"], seen["eager"]):
        torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_k, eager_x_k, atol=ATOL, rtol=0)
    assert (runs["compiled"] - x).abs().amax() <= kwargs["eps"] + ATOL or options.get("norm") == "l2"


@pytest.mark.parametrize("method", METHODS)
def test_the_fast_step_trains_like_the_eager_step(method):
    """Two epochs of 16, 16 and a short last batch of 6 (run eagerly): same x_adv, losses, passes and weights."""
    models = {"eager": make_model(), "fast": make_model()}
    steps = {
        "eager": AdversarialStep(METHODS[method]()),
        "fast": AdversarialStep(METHODS[method](), fast=True, compile_backend=BACKEND),
    }
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    data = batches((16, 16, 6))
    for epoch in range(2):
        for i, (x, y) in enumerate(data):
            out = {}
            for name in ("eager", "fast"):
                torch.manual_seed(100 * epoch + i)  # the attack's random start
                models[name].train()
                loss, ctx = steps[name](models[name], x, y, epoch=epoch)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                out[name] = loss.detach(), ctx
            (loss_eager, eager), (loss_fast, fast) = out["eager"], out["fast"]
            assert fast.attack_backend == (BACKEND if len(x) == 16 else None)
            torch.testing.assert_close(fast.x_adv, eager.x_adv, atol=ATOL, rtol=0)
            torch.testing.assert_close(loss_fast, loss_eager, atol=ATOL, rtol=1e-5)
            assert fast.passes() == eager.passes()
            if method == "adalab":
                torch.testing.assert_close(fast.x_anti, eager.x_anti, atol=ATOL, rtol=0)
                torch.testing.assert_close(fast.weights, eager.weights, atol=ATOL, rtol=1e-5)
    expected, actual = models["eager"].state_dict(), models["fast"].state_dict()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4)
    # One graph per attack (ADA-Lab: the attack and the adversary's adversary), none for the short batch, no
    # recompile in the second epoch, and the whole iteration in it (no graph break).
    assert counters["stats"]["unique_graphs"] == (2 if method == "adalab" else 1)
    assert not counters["graph_break"]


def test_the_fast_step_checks_values_on_the_first_batch_of_each_epoch_only():
    model = make_model()
    step = AdversarialStep([PGDAttack(EPS, STEP, 1), AdversarialCE()], fast=True, compile_backend=BACKEND)
    (x, y), = batches((4,))  # fmt: skip
    step(model, x, y, epoch=0)
    # What the fast path gives up: a batch out of [0, 1] later in the epoch is not refused.
    step(model, x * 2, y, epoch=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        step(model, x * 2, y, epoch=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the eager step checks every batch
        AdversarialStep([PGDAttack(EPS, STEP, 1), AdversarialCE()])(model, x * 2, y, epoch=0)


def test_the_eager_attack_runs_a_model_compiled_in_place_eagerly():
    """``model.compile()`` in place (the recipes' ``--compile`` and ``--fast``): the eager loop compiles no graph of
    its own (a compiled backward would compute every weight gradient; on CUDA with channels_last weights it failed
    its stride check) and gives the iterates of the same weights uncompiled."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, plain = make_model(), make_model()
    model.compile(backend=counting_backend)
    (x, y), = batches((6,))  # fmt: skip
    model(x)
    assert len(graphs) == 1  # the compiled forward is in use
    plain.load_state_dict(model.state_dict())  # that train-mode forward moved the BatchNorm statistics
    attack = {"eps": EPS, "step_size": STEP, "steps": 3, "loss": "kl", "reference": torch.randn(6, 10)}
    x_adv = perturb(model, x, y, generator=torch.Generator().manual_seed(1), **attack)
    assert len(graphs) == 1
    expected = perturb(plain, x, y, generator=torch.Generator().manual_seed(1), **attack)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)
    model.eval()
    model(x)  # outside the attack, the eval-mode forward compiles: what the attack would have done
    assert len(graphs) == 2


def test_the_fast_path_refuses_train_mode_attacks():
    with pytest.raises(ValueError, match="bn_mode='eval' only; PGDAttack runs with bn_mode='train'"):
        AdversarialStep([PGDAttack(EPS, STEP, 1, bn_mode="train"), AdversarialCE()], fast=True)
    (x, y), = batches((4,))  # fmt: skip
    with pytest.raises(ValueError, match="needs bn_mode='eval'"):
        perturb(make_model(), x, y, eps=EPS, step_size=STEP, steps=1, bn_mode="train", compile_backend=BACKEND)


def test_a_fast_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """6 steps straight == 4 steps, checkpoint, fresh objects resumed from it, 2 more (a short batch per epoch)."""
    train = load_dataset("digits", "train")
    train = dataclasses.replace(train, images=train.images[:40], labels=train.labels[:40], index=train.index[:40])

    def run(output_dir, model_seed, resume=None):
        model = make_model(model_seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = AdversarialStep([PGDAttack(EPS, STEP, 2), AdversarialCE()], fast=True, compile_backend=BACKEND)
        trainer = Trainer(
            model, step, optimizer, train, epochs=2, batch_size=16, progress=False, checkpoint_every_steps=4,
            output_dir=output_dir,
        )  # fmt: skip
        trainer.fit(resume=resume)
        return trainer

    straight = run(tmp_path / "straight", 0)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["batch_in_epoch"] == 1
    resumed = run(tmp_path / "resumed", 1, resume=checkpoint)
    expected, actual = (unwrap_model(t.model).state_dict() for t in (straight, resumed))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.slow
def test_inductor_kernels_give_the_eager_training_numbers():
    """Inductor's fused kernels (CPU C++; minutes to compile): 3 PGD-AT steps, same x_adv, losses and weights."""
    eager_model, fast_model = make_model(), make_model()
    eager_step = AdversarialStep(METHODS["pgd_at"]())
    fast_step = AdversarialStep(METHODS["pgd_at"](), fast=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager_model, fast_model)]
    for i, (x, y) in enumerate(batches((16, 16, 16))):
        results = []
        for model, step, optimizer in zip((eager_model, fast_model), (eager_step, fast_step), optimizers):
            torch.manual_seed(i)
            loss, ctx = step(model, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results.append((loss.detach(), ctx.x_adv))
        (loss_eager, adv_eager), (loss_fast, adv_fast) = results
        # Inductor reorders float sums: a gradient component within rounding of 0 may flip its sign, moving that
        # pixel by 2 steps. Nearly all pixels agree to the ulp; the losses to float32 rounding.
        assert ((adv_fast - adv_eager).abs() > ATOL).float().mean() < 1e-3
        torch.testing.assert_close(loss_fast, loss_eager, atol=1e-4, rtol=1e-4)
    for key, value in eager_model.state_dict().items():
        torch.testing.assert_close(fast_model.state_dict()[key], value, atol=1e-4, rtol=1e-3)


def test_the_recipes_fast_flag_trains_like_the_eager_recipe(tiny, tmp_path, capsys):
    """--fast (here with --compile aot_eager: the backend of both the attacks and the model) on pgd_at's recipe:
    7 steps, the epoch's short last batch (10 of 16) among them."""
    from safetensors.torch import load_file

    from tests.conftest import load_recipe, quick_flags

    pgd_at = load_recipe("pgd_at")
    runs = {name: tmp_path / name for name in ("eager", "fast")}
    pgd_at.main(quick_flags(tiny, runs["eager"], "--max-steps", "7", "--attack-steps", "2"))
    assert counters["stats"]["unique_graphs"] == 0
    pgd_at.main(quick_flags(tiny, runs["fast"], "--max-steps", "7", "--attack-steps", "2", "--fast", "--compile",
                            "aot_eager"))  # fmt: skip
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]  # the attack and the model
    expected, actual = (load_file(run / "model.safetensors") for run in runs.values())
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4)
    eager, fast = (json.loads((run / "metrics.json").read_text())["test"] for run in runs.values())
    assert (fast["clean_acc"], fast["pgd_acc"]) == (eager["clean_acc"], eager["pgd_acc"])
    with pytest.raises(SystemExit):
        pgd_at.main(quick_flags(tiny, tmp_path / "refused", "--fast", "--attack-bn-mode", "train"))
    assert "--fast compiles attacks in eval mode only, got --attack-bn-mode train" in capsys.readouterr().err
