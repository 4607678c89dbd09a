"""The training loop: data order, events, schedules, metrics, best checkpoint, exact resume, DDP."""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch.optim.lr_scheduler import MultiStepLR, OneCycleLR

from robustmix import AdversarialCE, AdversarialStep, Callback, PGDAttack, Stage
from robustmix.data import load_dataset
from robustmix.models import unwrap_model
from robustmix.runs.folder import BEST_DIR, METRICS_FILE, MODEL_FILE, load_metrics_log
from robustmix.stages.losses import classification_loss
from robustmix.training.accelerator import training_forwards
from robustmix.training.metrics import WALL_CLOCK_KEYS
from robustmix.training.sampling import EpochBatches, batches_per_epoch
from robustmix.training.trainer import Trainer
from tests.conftest import launch_two_processes
from tests.trainers import EPS, make_model, make_trainer, weights

REPO = Path(__file__).resolve().parents[1]


class Recorder(Callback):
    """Records every trainer event, and keeps per-example state keyed by the dataset index."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.seen: torch.Tensor | None = None
        self.batches = 0

    def on_fit_start(self, trainer):
        self.events.append(("on_fit_start",))
        self.seen = torch.zeros(len(trainer.train_data), dtype=torch.int64)

    def on_epoch_start(self, trainer, epoch):
        self.events.append(("on_epoch_start", epoch))

    def on_batch_start(self, trainer, batch):
        self.events.append(("on_batch_start",))
        self.seen[batch["index"]] += 1
        self.batches += 1

    def on_before_backward(self, ctx):
        self.events.append(("on_before_backward",))

    def on_before_optimizer_step(self, trainer, optimizer):
        self.events.append(("on_before_optimizer_step",))

    def on_after_optimizer_step(self, trainer, optimizer):
        self.events.append(("on_after_optimizer_step", trainer.step_was_skipped))

    def on_epoch_end(self, trainer, epoch):
        self.events.append(("on_epoch_end", epoch))

    def on_evaluate(self, trainer, metrics):
        self.events.append(("on_evaluate", sorted(metrics)))

    def on_save_checkpoint(self, trainer, directory):
        self.events.append(("on_save_checkpoint", Path(directory).name))

    def state_dict(self):
        return {"seen": self.seen, "batches": self.batches}

    def load_state_dict(self, state):
        self.seen.copy_(state["seen"])
        self.batches = state["batches"]


# ---------------------------------------------------------------------- data order


@pytest.mark.parametrize(
    ("n", "batch", "world", "expected"),
    # A last batch of one example per process is left out (35 = 2 x 16 + 3, 33 = 2 x 16 + 1), unless batch is 1.
    [(40, 16, 1, 3), (40, 8, 2, 3), (33, 8, 2, 2), (35, 8, 2, 2), (36, 8, 2, 3), (33, 16, 1, 2), (2, 1, 3, 0)],
)
def test_batches_per_epoch(n, batch, world, expected):
    assert batches_per_epoch(n, batch, world) == expected
    ranks = [list(EpochBatches(n, batch, num_processes=world, process_index=r, seed=0)) for r in range(world)]
    assert all(len(batches) == expected for batches in ranks)


def test_epoch_batches_shard_a_seeded_permutation():
    ranks = [EpochBatches(37, 4, num_processes=3, process_index=r, seed=5) for r in range(3)]
    epoch = [list(sampler) for sampler in ranks]
    seen = [i for batches in epoch for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 36  # one left out of the last global batch of 13, to keep sizes equal
    for step in range(len(epoch[0])):
        assert len({len(batches[step]) for batches in epoch}) == 1  # every rank, same batch size
    assert [list(s) for s in ranks] == epoch  # seeded
    ranks[0].set_position(epoch=1, start=0)
    assert list(ranks[0]) != epoch[0]  # another permutation per epoch
    ranks[0].set_position(epoch=0, start=2)
    assert list(ranks[0]) == epoch[0][2:] and len(ranks[0]) == len(epoch[0]) - 2  # resumable mid-epoch


# ---------------------------------------------------------------------- the loop


def test_events_fire_in_order_with_index_state(digits, tmp_path):
    recorder = Recorder()
    trainer = make_trainer(
        digits, callbacks=[PGDAttack(EPS, EPS / 2, 1), AdversarialCE(), recorder], output_dir=tmp_path
    )
    trainer.fit()
    one_step = [("on_batch_start",), ("on_before_backward",), ("on_before_optimizer_step",),
                ("on_after_optimizer_step", False)]  # fmt: skip
    val = ("on_evaluate", ["val_clean_acc", "val_n", "val_pgd_acc"])
    expected = [("on_fit_start",)]
    for epoch, step in ((0, 3), (1, 6)):
        expected += [("on_epoch_start", epoch), *one_step * 3, val, ("on_epoch_end", epoch)]
        expected += [("on_save_checkpoint", f"step_{step}")]
    assert recorder.events == expected
    assert recorder.seen.tolist() == [2] * 40  # every example once per epoch, through the index column


def test_scheduler_steps_once_per_optimizer_step(digits, tmp_path):
    total = 5
    trainer = make_trainer(
        digits, callbacks=[PGDAttack(EPS, EPS, 0), AdversarialCE()], max_steps=total, val_data=None,
        scheduler=lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=total), output_dir=tmp_path,
    )  # fmt: skip
    trainer.fit()
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = OneCycleLR(reference, max_lr=0.1, total_steps=total)
    expected = []
    for _ in range(total):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert trainer.scheduler.last_epoch == total
    assert trainer.optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
    logged = [row["lr"] for row in load_metrics_log(tmp_path) if "lr" in row]
    assert logged == expected  # each step logs the lr it used


def test_metrics_log_and_best_checkpoint_from_validation(digits, tmp_path):
    trainer = make_trainer(digits, epochs=3, output_dir=tmp_path, log_every=2)
    summary = trainer.fit()
    rows = load_metrics_log(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_pgd_acc" in r]
    assert [r["step"] for r in train_rows] == [2, 3, 4, 6, 8, 9]  # every 2 steps and at each epoch's end
    assert all(r["forwards_per_step"] == 2 and r["backwards_per_step"] == 2 for r in train_rows)  # PGD-1: 1+1
    assert all(0 <= r["train_adv_acc"] <= 1 and "train_clean_acc" not in r for r in train_rows)
    assert [(r["epoch"], r["step"]) for r in val_rows] == [(0, 3), (1, 6), (2, 9)]
    assert all(r["val_n"] == 12 and r["val_pgd_acc"] <= r["val_clean_acc"] for r in val_rows)

    best_row = max(val_rows, key=lambda r: (r["val_pgd_acc"], -r["step"]))  # the first of equals is kept
    best = json.loads((tmp_path / BEST_DIR / METRICS_FILE).read_text())
    assert best["selected_on"] == "validation" and best["step"] == best_row["step"]
    assert best["val_pgd_acc"] == best_row["val_pgd_acc"] == summary["best"]["val_pgd_acc"]
    # The best weights measure again exactly what was logged (evaluation is seeded).
    unwrap_model(trainer.model).load_state_dict(load_file(tmp_path / BEST_DIR / MODEL_FILE))
    again = trainer.evaluate(digits[1])
    assert (again["clean_acc"], again["pgd_acc"]) == (best_row["val_clean_acc"], best_row["val_pgd_acc"])
    final = load_file(tmp_path / MODEL_FILE)
    assert final.keys() == weights(trainer).keys()


def test_train_accuracy_uses_clean_logits_the_step_has(digits):
    class CleanAndAdversarialCE(Callback):
        stage, reads, writes = Stage.LOSS, ("logits_clean", "logits_adv"), ("loss",)

        def __call__(self, ctx):
            ctx.loss = classification_loss(ctx.get_logits("clean"), ctx.targets) + classification_loss(
                ctx.get_logits("adv"), ctx.targets
            )

    step_callbacks = [PGDAttack(EPS, EPS / 2, 1), CleanAndAdversarialCE()]
    assert training_forwards(AdversarialStep(step_callbacks)) == {"clean", "adv"}
    trainer = make_trainer(digits, callbacks=step_callbacks, max_steps=1, val_data=None)
    # Two training forwards before one backward: DDP must not broadcast BatchNorm buffers in between.
    assert trainer.accelerator.ddp_handler.broadcast_buffers is False
    trainer.fit()
    assert trainer._window.empty  # logged at the end
    assert training_forwards(AdversarialStep([PGDAttack(EPS, EPS, 1), AdversarialCE()])) == {"adv"}


class _Extras(Callback):
    """Logs the step number (a device tensor) every step and a float on odd steps only."""

    stage, reads, writes = Stage.WEIGHTS, ("targets",), ()

    def __init__(self, extras=None):
        self.extras = extras

    def __call__(self, ctx):
        if self.extras is not None:
            ctx.extras.update(self.extras)
            return
        ctx.extras["step_seen"] = torch.tensor(float(ctx.step))
        if ctx.step % 2:
            ctx.extras["odd_only"] = 1.5


def test_callback_extras_are_logged_as_window_means(digits, tmp_path):
    trainer = make_trainer(
        digits, callbacks=[PGDAttack(EPS, EPS, 1), _Extras(), AdversarialCE()], max_steps=4, val_data=None,
        output_dir=tmp_path, log_every=2,
    )  # fmt: skip
    trainer.fit()
    rows = [r for r in load_metrics_log(tmp_path) if "loss" in r]
    # Windows: steps 0-1, step 2 (the epoch ends after 3 batches), step 3. Each logs the mean of the values
    # written in it, over the steps that wrote them; a name no step of the window wrote is left out.
    logged = [(r["step"], r["step_seen"], r.get("odd_only")) for r in rows]
    assert logged == [(2, 0.5, 1.5), (3, 2.0, None), (4, 3.0, 1.5)]


@pytest.mark.parametrize(
    ("extras", "error", "match"),
    [
        ({"loss": 1.0}, ValueError, "overwrite"),
        ({"v": torch.ones(3)}, ValueError, "scalar"),
        ({"v": "a"}, TypeError, "number"),
    ],
)  # fmt: skip
def test_bad_callback_extras_are_named(digits, extras, error, match):
    trainer = make_trainer(digits, callbacks=[PGDAttack(EPS, EPS, 1), _Extras(extras), AdversarialCE()], max_steps=1,
                           val_data=None)  # fmt: skip
    with pytest.raises(error, match=match):
        trainer.fit()


def test_evaluate_is_seeded_and_works_under_inference_mode(digits):
    trainer = make_trainer(digits)
    plain = trainer.evaluate(digits[1])
    with torch.inference_mode():
        assert trainer.evaluate(digits[1]) == plain
    assert plain["n"] == 12 and 0 <= plain["pgd_acc"] <= plain["clean_acc"] <= 1


def test_gradient_clipping_bounds_the_norm(digits):
    norms = []

    class GradNorm(Callback):
        def on_after_optimizer_step(self, trainer, optimizer):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer = make_trainer(
        digits, callbacks=[PGDAttack(EPS, EPS, 1), AdversarialCE(), GradNorm()], grad_clip=0.01, max_steps=2,
        val_data=None,
    )  # fmt: skip
    trainer.fit()
    assert len(norms) == 2 and all(n <= 0.01 * 1.0001 for n in norms)


def test_bf16_mixed_precision_trains_on_cpu(digits):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        callbacks = [PGDAttack(EPS, EPS, 1), AdversarialCE()]
        with pytest.raises(ValueError, match="step was built with mixed_precision='no'"):
            make_trainer(digits, callbacks=callbacks, mixed_precision="bf16")
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        step = AdversarialStep(callbacks, mixed_precision="bf16")
        trainer = Trainer(model, step, optimizer, digits[0], max_steps=2, batch_size=16, progress=False)
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.fit()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"epochs": 0}, "epochs must be an integer >= 1"), ({"max_steps": 0}, "max_steps must be an integer >= 1"),
     ({"grad_clip": -1.0}, "grad_clip must be a positive number"), ({"seed": -1}, "seed must be an integer >= 0"),
     ({"callbacks": [AdversarialCE(source="clean")]}, "pass eval_eps=")],
)  # fmt: skip
def test_bad_arguments_fail_before_training(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(digits, **kwargs)


# ---------------------------------------------------------------------- checkpoints and resume


def test_resume_continues_bit_for_bit(digits, tmp_path):
    """6 steps straight == 4 steps, checkpoint, fresh objects resumed from it, 2 more steps."""

    def run(output_dir, model_seed, resume=None):
        recorder = Recorder()
        trainer = make_trainer(
            digits, model=make_model(model_seed), callbacks=[PGDAttack(EPS, EPS / 2, 2), AdversarialCE(), recorder],
            scheduler=lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=6), augment=True,
            checkpoint_every_steps=4, output_dir=output_dir,
        )  # fmt: skip
        trainer.fit(resume=resume)
        return trainer, recorder

    straight, straight_recorder = run(tmp_path / "straight", model_seed=0)
    torch.rand(100)  # the resumed run must not depend on the global RNG it starts with
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)  # mid-epoch: the data position matters
    resumed, resumed_recorder = run(tmp_path / "resumed", model_seed=1, resume=checkpoint)

    assert resumed.global_step == 6
    expected, actual = weights(straight), weights(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert torch.equal(resumed_recorder.seen, straight_recorder.seen) and resumed_recorder.batches == 6
    # The resumed run logs exactly the rows the straight run logged after the checkpoint.
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    later = [r for r in load_metrics_log(tmp_path / "straight") if r["step"] > 4]
    assert drop_time(load_metrics_log(tmp_path / "resumed")) == drop_time(later)


def test_resume_latest_and_refusals(digits, tmp_path):
    trainer = make_trainer(digits, max_steps=2, val_data=None, checkpoint_every_steps=1, output_dir=tmp_path)
    trainer.fit()
    with pytest.raises(ValueError, match="already holds a run"):
        make_trainer(digits, max_steps=2, output_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="batch_size 16 \\(checkpoint\\) vs 8 \\(now\\)"):
        make_trainer(digits, max_steps=2, batch_size=8, output_dir=tmp_path).fit(resume="latest")
    with pytest.raises(FileNotFoundError, match="not a complete robustmix checkpoint"):
        make_trainer(digits, output_dir=tmp_path).fit(resume=tmp_path / "nowhere")

    # Resuming the older step_1 starts a new continuation: step_2 of the old one goes.
    resumed = make_trainer(digits, max_steps=2, val_data=None, checkpoint_every_steps=1, output_dir=tmp_path)
    resumed.fit(resume=tmp_path / "checkpoints" / "step_1")
    assert resumed.global_step == 2
    assert [r["step"] for r in load_metrics_log(tmp_path)] == [1, 2]


def test_multistep_milestones_count_optimizer_steps(digits):
    trainer = make_trainer(
        digits, callbacks=[PGDAttack(EPS, EPS, 0), AdversarialCE()], val_data=None, epochs=2, lr=0.1,
        scheduler=lambda opt: MultiStepLR(opt, milestones=[3], gamma=0.1),
    )  # fmt: skip
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


# ---------------------------------------------------------------------- two processes

DRIVER = """
import dataclasses, json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from robustmix import AdversarialStep, Callback, PGDAttack, Stage
from robustmix.data import DATASETS, load_dataset
from robustmix.stages.losses import classification_loss
from robustmix.models import create_model, unwrap_model
from robustmix.training.trainer import Trainer


class CleanAndAdversarialCE(Callback):  # TRADES-like: two training forwards before one backward
    stage, reads, writes = Stage.LOSS, ("logits_clean", "logits_adv"), ("loss",)

    def __call__(self, ctx):
        ctx.loss = classification_loss(ctx.get_logits("clean"), ctx.targets) + classification_loss(
            ctx.get_logits("adv"), ctx.targets)


def subset(data, n):
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n], index=data.index[:n])


def run(out, model_seed, resume=None):
    torch.manual_seed(model_seed)
    spec = DATASETS["digits"]
    model = create_model("test_resnet", 10, in_chans=1, mean=spec.mean, std=spec.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=6)
    # 48 examples, 8 per process: 3 steps per epoch; 7 validation examples do not split evenly over 2 ranks.
    train, val = subset(load_dataset("digits", "train"), 48), subset(load_dataset("digits", "validation"), 7)
    step = AdversarialStep([PGDAttack(0.1, 0.05, 1), CleanAndAdversarialCE()])
    trainer = Trainer(model, step, optimizer, train, val, scheduler=scheduler, epochs=2, batch_size=8, eval_steps=1,
                      checkpoint_every_steps=2, output_dir=out, progress=False)
    summary = trainer.fit(resume=resume)
    rank = trainer.accelerator.process_index
    state = {k: v.contiguous() for k, v in unwrap_model(trainer.model).state_dict().items()}
    save_file(state, out / f"rank{rank}.safetensors")
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({"summary": summary, "lr": optimizer.param_groups[0]["lr"],
                                                      "steps_per_epoch": trainer.steps_per_epoch}))


# One launch saves process start-ups: the resumed run starts from fresh objects (other initial weights).
out = Path(sys.argv[1])
run(out / "straight", model_seed=0)
run(out / "resumed", model_seed=1, resume=out / "straight" / "checkpoints" / "step_4")
"""


@pytest.mark.distributed
def test_two_processes_train_resume_and_agree(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    launch_two_processes(script, str(tmp_path))

    runs = {}
    for name in ("straight", "resumed"):
        ranks = [load_file(tmp_path / name / f"rank{r}.safetensors") for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), f"{name}: ranks disagree"
        runs[name] = ranks[0]
    assert all(torch.equal(runs["straight"][k], runs["resumed"][k]) for k in runs["straight"])
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps_per_epoch"] == 3 and summary["summary"]["step"] == 6
    assert summary["summary"]["val"]["val_n"] == 7  # every validation example counted once across ranks
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    schedule = OneCycleLR(reference, max_lr=0.1, total_steps=6)
    for _ in range(6):
        reference.step()
        schedule.step()
    assert summary["lr"] == reference.param_groups[0]["lr"]  # stepped once per step, not once per process


def test_only_host_datasets_are_pinned():
    """A dataset already on the accelerator (--data-on-device) cannot be pinned; the loader must not try."""
    from robustmix.training.sampling import on_host

    data = load_dataset("digits", "validation")
    assert on_host(data) and on_host(list(range(3)))
    assert not on_host(types.SimpleNamespace(images=torch.zeros(2, 1, 4, 4, device="meta")))
