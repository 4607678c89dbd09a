"""Random bad input at every public entry point gets a clear, specific error before any state changes.

Hypothesis draws bad batches, budgets, arguments, flags and run folders for the step, the attacks, the
trainer, the recipes, the evaluation and ``load_model``. Every case checks three things:

1. the exception type is the documented one (``TypeError``, ``ValueError``, ``FileNotFoundError`` or exit
   status 2 for a command line), never a ``RuntimeError`` or ``IndexError`` from deep inside torch;
2. the message names the problem: the argument, the flag or the file;
3. nothing changed: no forward ran, model parameters, buffers, gradients and modes, optimizer state and
   callback state are identical, and no file was created, removed or modified.

Budgets are sized for one slow CPU core: every check runs before any real work, so examples cost
milliseconds (a recipe whose flags only the data can judge loads the tiny dataset, ~0.1 s).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import robustmix.cli.recipe as recipe_module
import robustmix.evaluation.run as evaluate
from robustmix import AdversarialCE, AdversarialStep, FGSMAttack, PGDAttack
from robustmix.attacks.pgd import perturb
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.data import load_dataset
from robustmix.evaluation.attacks import with_budget
from robustmix.evaluation.run import evaluate_run
from robustmix.evaluation.worstcase import worst_case
from robustmix.methods.sglr import SGLRLabels
from robustmix.models import create_model, model_config
from robustmix.runs.checkpoint import atomic_save_weights, atomic_write_json
from robustmix.runs.folder import BEST_DIR, CONFIG_FILE, METRICS_LOG, MODEL_FILE, load_metrics_log, load_model
from robustmix.training.trainer import Trainer
from tests.conftest import load_recipe, quick_flags, training_recipes

CLASSES = 3
SIDE = 6
ROWS = 12  # rows of the SGLR table: dataset indices lie in [0, ROWS)
#: 100 examples per test: the whole file runs in about 20 s on one busy CPU core.
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TinyNet(nn.Module):
    """A conv net with BatchNorm (a forward in train mode would move its statistics) that counts its forwards.

    It declares ``num_classes`` and ``in_chans`` as models from ``robustmix.create_model`` do.
    """

    num_classes = CLASSES
    in_chans = 1

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * SIDE * SIDE, 3)
        )
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return self.net(x)


MODEL = TinyNet()


def _same(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts / lists of tensors and plain values (tensors: same dtype, shape, values)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _model_state(model: nn.Module) -> dict[str, Any]:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
    }


@contextlib.contextmanager
def unchanged(model: nn.Module, *, step: AdversarialStep | None = None, forwards: bool = False):
    """Asserts, after the block, that the model (and the step's callbacks) did not change."""
    before = _model_state(model)
    callbacks = copy.deepcopy(step.state_dict()) if step is not None else None
    calls = getattr(model, "forwards", 0)
    yield
    assert _same(_model_state(model), before), "the model changed before the error"
    if step is not None:
        assert _same(step.state_dict(), callbacks), "callback state changed before the error"
    if not forwards:
        assert getattr(model, "forwards", 0) == calls, "the model ran a forward before the error"


def _files(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------- bad batches: step and worst_case

#: What each kind of bad batch must raise, and a pattern its message must match at every entry point.
BATCH_ERRORS = {
    "x integer dtype": (TypeError, r"must be a floating-point tensor"),
    "x other float dtype": (TypeError, r"inputs are torch\.\w+ but the model's parameters are torch\.float32"),
    "x not a tensor": (TypeError, r"must be a floating-point tensor"),
    "x not a batch": (ValueError, r"must be a (non-empty )?batch"),
    "x wrong rank": (ValueError, r"must be images \[B, 1, H, W\]"),
    "x wrong channels": (ValueError, r"must be images \[B, 1, H, W\]"),
    "x outside [0, 1]": (ValueError, r"pixels in \[0, 1\]"),
    "x NaN or inf": (ValueError, r"NaN or inf"),
    "y wrong dtype": (TypeError, r"integer tensor of class indices"),
    "y not a tensor": (TypeError, r"integer tensor of class indices"),
    "y out of range": (ValueError, rf"targets must be in \[0, {CLASSES}\)"),
    "y wrong shape": (ValueError, r"targets must have shape \[B\]"),
    "empty batch": (ValueError, r"empty batch"),
}
INDEX_ERRORS = {
    "index wrong dtype": (ValueError, r"index must be an integer tensor"),
    "index wrong shape": (ValueError, r"index must be an integer tensor"),
    "index not a tensor": (ValueError, r"index must be an integer tensor"),
    "index negative": (ValueError, r"index must hold dataset indices >= 0"),
}
FLOATS = (torch.float64, torch.float16, torch.bfloat16)
NON_INT64 = (torch.float32, torch.float64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


@st.composite
def bad_batches(draw, kinds: tuple[str, ...]) -> tuple[str, Any, Any, Any]:
    """``(kind, x, y, index)``: a valid batch of 1 to 5 images broken in one way."""
    size = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.rand(size, 1, SIDE, SIDE, generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    index = torch.randperm(ROWS, generator=g)[:size]
    kind = draw(st.sampled_from(kinds))
    sample = draw(st.integers(0, size - 1))
    if kind == "x integer dtype":
        x = (x * 255).to(draw(st.sampled_from((torch.uint8, torch.int32, torch.int64, torch.bool))))
    elif kind == "x other float dtype":
        x = x.to(draw(st.sampled_from(FLOATS)))
    elif kind == "x not a tensor":
        x = draw(st.sampled_from((x.tolist, x.numpy, lambda: None, lambda: 0.5)))()
    elif kind == "x not a batch":
        x = draw(st.sampled_from((x.flatten(), x[0, 0, 0, 0])))
    elif kind == "x wrong rank":
        x = draw(st.sampled_from((x[:, 0], x.unsqueeze(1), x.view(size, 1, SIDE * SIDE))))
    elif kind == "x wrong channels":
        x = x.expand(size, draw(st.integers(2, 4)), SIDE, SIDE).contiguous()
    elif kind == "x outside [0, 1]":
        above = st.floats(1.0, 2.0**100, exclude_min=True, width=32)
        below = st.floats(-(2.0**100), -(2.0**-20), width=32)
        value = draw(above | below, label="pixel out of range")
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = value
    elif kind == "x NaN or inf":
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    elif kind == "y wrong dtype":
        y = y.to(draw(st.sampled_from(NON_INT64)))
    elif kind == "y not a tensor":
        y = draw(st.sampled_from((y.tolist, y.numpy, lambda: None)))()
    elif kind == "y out of range":
        y[sample] = draw(st.integers(CLASSES, 2**62) | st.integers(-(2**62), -1), label="label out of range")
    elif kind == "y wrong shape":
        length = draw(st.integers(0, 7).filter(lambda n: n != size))
        y = draw(st.sampled_from((torch.zeros(length, dtype=torch.int64), y[:, None], y.expand(2, size))))
    elif kind == "empty batch":
        x, y, index = x[:0], y[:0], index[:0]
    elif kind == "index wrong dtype":
        index = index.to(draw(st.sampled_from((torch.float32, torch.float64, torch.bool))))
    elif kind == "index wrong shape":
        index = draw(st.sampled_from((index[:, None], torch.arange(size + 1), index[:0])))
    elif kind == "index not a tensor":
        index = draw(st.sampled_from((index.tolist, lambda: 3)))()
    elif kind == "index negative":
        index[sample] = draw(st.integers(-(2**62), -1))
    return kind, x, y, index


def _sglr_step() -> AdversarialStep:
    """PGD-AT with a per-example soft-label table (state that must not change) keyed by the dataset index."""
    return AdversarialStep(
        [PGDAttack(0.1, 0.05, 2), SGLRLabels(ROWS, CLASSES, start_epoch=0), AdversarialCE()], num_classes=CLASSES
    )


STEP = _sglr_step()


@FUZZ
@given(bad_batches((*BATCH_ERRORS, *INDEX_ERRORS)), st.booleans())
def test_step_rejects_bad_batches_before_any_work(case, train_mode):
    kind, x, y, index = case
    error, pattern = {**BATCH_ERRORS, **INDEX_ERRORS}[kind]
    MODEL.train(train_mode)
    with unchanged(MODEL, step=STEP), pytest.raises(error, match=pattern):
        STEP(MODEL, x, y, index)


@FUZZ
@given(bad_batches(tuple(BATCH_ERRORS)))
def test_worst_case_rejects_bad_batches_before_any_attack(case):
    kind, x, y, _ = case
    error, pattern = BATCH_ERRORS[kind]
    with unchanged(MODEL), pytest.raises(error, match=pattern):
        worst_case(MODEL, x, y, [with_budget("pgd20", steps=1)], eps=0.1)


def test_an_index_beyond_the_table_is_named_and_leaves_the_table_alone():
    """The table size is the callback's: it checks the index itself, after the attack's eval-mode forwards."""
    step = _sglr_step()
    x, y = torch.rand(2, 1, SIDE, SIDE), torch.tensor([0, 1])
    with unchanged(MODEL, step=step, forwards=True), pytest.raises(IndexError, match="dataset index out of range"):
        step(MODEL, x, y, torch.tensor([0, ROWS]))


# ---------------------------------------------------------------------- step arguments

#: Not integers, or below the minimum (0 for epoch and step, 1 for the totals, which may also be None).
BAD_POSITIONS = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.just(torch.tensor(1)),
)


@FUZZ
@given(
    st.sampled_from(("epoch", "step", "total_epochs", "total_steps")),
    BAD_POSITIONS | st.just(0),
)
def test_step_rejects_bad_positions(name, value):
    if type(value) is int and value == 0 and name in ("epoch", "step"):
        value = -1  # 0 is a valid epoch and step
    x, y = torch.rand(2, 1, SIDE, SIDE), torch.tensor([0, 1])
    with unchanged(MODEL, step=STEP), pytest.raises(ValueError, match=rf"{name} must be an integer >= [01]"):
        STEP(MODEL, x, y, torch.tensor([0, 1]), **{name: value})


@FUZZ
@given(st.integers(2, 1000).filter(lambda n: n != CLASSES))
def test_step_rejects_a_model_with_other_classes(num_classes):
    step = AdversarialStep([PGDAttack(0.1, 0.05, 1), AdversarialCE()], num_classes=num_classes)
    y = torch.randint(0, min(num_classes, CLASSES), (3,))
    with unchanged(MODEL), pytest.raises(ValueError, match=rf"num_classes is {num_classes} but the model has 3"):
        step(MODEL, torch.rand(3, 1, SIDE, SIDE), y)


@FUZZ
@given(st.integers(max_value=1) | st.floats() | st.booleans() | st.text(max_size=2))
def test_step_rejects_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        AdversarialStep([PGDAttack(), AdversarialCE()], num_classes=num_classes)


# ---------------------------------------------------------------------- attack budgets

#: Budgets that are not finite numbers >= 0.
#: (Within float32 range: per-sample budgets are tensors of the images' dtype.)
BAD_BUDGETS = st.floats(-1e30, -1e-12) | st.sampled_from((math.nan, math.inf, -math.inf))


class Budget(Callback):
    """Writes a given per-sample ``eps`` (a budget callback such as class-wise multipliers would compute one)."""

    stage = Stage.BUDGET
    writes = ("eps",)

    def __init__(self, eps: Tensor) -> None:
        self.eps = eps

    def __call__(self, ctx: StepContext) -> None:
        ctx.eps = self.eps


@st.composite
def bad_per_sample(draw, size: int) -> tuple[Tensor, str]:
    """A per-sample budget ``[B]`` with one bad entry, or one of the wrong shape; and the message pattern."""
    values = torch.full((size,), 0.05)
    if draw(st.booleans()):
        values[draw(st.integers(0, size - 1))] = draw(BAD_BUDGETS)
        return values, "must be finite and >= 0 for every sample"
    shape = draw(st.sampled_from(((size + 1,), (size, 1), (1, size), (max(size - 1, 0),))))
    return torch.full(shape, 0.05), r"must have shape \[B\]"


@FUZZ
@given(st.data())
def test_step_rejects_bad_per_sample_eps_before_any_forward(data):
    size = data.draw(st.integers(1, 4))
    eps, pattern = data.draw(bad_per_sample(size))
    relative = data.draw(st.booleans())
    step = AdversarialStep(
        [Budget(eps), PGDAttack(None, 0.5 if relative else 0.05, 2, relative_step_size=relative), AdversarialCE()]
    )
    x, y = torch.rand(size, 1, SIDE, SIDE), torch.randint(0, CLASSES, (size,))
    with unchanged(MODEL), pytest.raises(ValueError, match=rf"eps {pattern}|per-sample eps {pattern}"):
        step(MODEL, x, y)


@FUZZ
@given(st.sampled_from(("eps", "step_size", "steps")), st.data())
def test_attack_callbacks_reject_bad_settings(name, data):
    if name == "steps":
        value = data.draw(st.integers(max_value=-1) | st.floats() | st.booleans() | st.text(max_size=2))
        pattern = "steps must be an integer >= 0"
    else:
        value = data.draw(BAD_BUDGETS)
        pattern = f"{name} must be a finite number >= 0"
    settings_ = {"eps": 0.1, "step_size": 0.05, "steps": 2, name: value}
    with pytest.raises(ValueError, match=pattern):
        PGDAttack(**settings_)
    if name != "steps":
        with pytest.raises(ValueError, match=pattern):
            FGSMAttack(**{k: v for k, v in settings_.items() if k != "steps"})


@FUZZ
@given(st.sampled_from(("eps", "step_size")), st.data())
def test_perturb_rejects_bad_budgets_before_any_forward(name, data):
    size = data.draw(st.integers(1, 4))
    if data.draw(st.booleans()):
        value, pattern = data.draw(BAD_BUDGETS), rf"{name} must be a finite number >= 0"
    else:
        value, pattern = data.draw(bad_per_sample(size))
        pattern = rf"{name} {pattern}|per-sample {name} {pattern}"
    budgets = {"eps": 0.1, "step_size": 0.05, name: value}
    x, y = torch.rand(size, 1, SIDE, SIDE), torch.randint(0, CLASSES, (size,))
    with unchanged(MODEL), pytest.raises(ValueError, match=pattern):
        perturb(MODEL, x, y, steps=1, **budgets)


ATTACK_CALLS = [
    pytest.param(lambda: PGDAttack(0.1, 0.05, 2, loss_scale=math.nan), "loss_scale", id="PGDAttack loss_scale=nan"),
    pytest.param(lambda: PGDAttack(0.1, 0.05, 2, loss_scale=0.0), "loss_scale", id="PGDAttack loss_scale=0"),
    pytest.param(lambda: PGDAttack(torch.tensor([0.1, 0.2])), "eps", id="PGDAttack eps tensor"),
    pytest.param(lambda: FGSMAttack("0.1"), "eps", id="FGSMAttack eps string"),
    pytest.param(
        lambda: perturb(
            MODEL, torch.rand(2, 1, SIDE, SIDE), torch.tensor([0.0, 1.0]), eps=0.1, step_size=0.1, steps=1
        ),
        "y|label|target",
        id="perturb float labels",
    ),
    pytest.param(
        lambda: perturb(MODEL, torch.rand(2, 1, SIDE, SIDE), torch.tensor([0, 7]), eps=0.1, step_size=0.1, steps=1),
        "y|label|target",
        id="perturb labels out of range",
    ),
    pytest.param(
        lambda: perturb(
            MODEL, torch.full((2, 1, SIDE, SIDE), math.nan), torch.tensor([0, 1]), eps=0.1, step_size=0.1, steps=1
        ),
        "NaN",
        id="perturb NaN pixels",
    ),
    pytest.param(
        lambda: perturb(
            MODEL, torch.full((2, 1, SIDE, SIDE), 2.0), torch.tensor([0, 1]), eps=0.1, step_size=0.1, steps=0
        ),
        "out of range",
        id="perturb pixels above 1",
    ),
    pytest.param(
        lambda: perturb(MODEL, torch.rand(2, 1, SIDE, SIDE), torch.tensor([0, -1]), eps=0.1, step_size=0.1, steps=0),
        "negative label",
        id="perturb negative label",
    ),
]


@pytest.mark.parametrize(("call", "names"), ATTACK_CALLS)
def test_direct_attack_calls_check_their_inputs(call, names):
    """Direct calls of the attack functions (no step checked the batch) name a bad input before attacking."""
    with pytest.raises((ValueError, TypeError), match=names):
        call()


# ---------------------------------------------------------------------- Trainer


def _digits(n: int):
    data = load_dataset("digits", "train")
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n], index=data.index[:n])


def _model(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return create_model("test_resnet", num_classes, in_chans=in_chans, mean=(0.3,) * in_chans, std=(0.3,) * in_chans)


TRAIN = _digits(20)
TRAINER_MODEL = _model()
OPTIMIZER = torch.optim.SGD(TRAINER_MODEL.parameters(), lr=0.1, momentum=0.9)
# One update, so that the optimizer has state (momentum buffers) that must not change.
nn.functional.cross_entropy(TRAINER_MODEL(TRAIN.tensors()[0][:4]), TRAIN.labels[:4]).backward()
OPTIMIZER.step()
OPTIMIZER.zero_grad(set_to_none=True)
OTHER_MODELS = {"classes": _model(5), "channels": _model(in_chans=3), "optimizer": _model()}

INT_ARGUMENTS = {"epochs": 1, "batch_size": 1, "eval_steps": 0, "seed": 0, "num_workers": 0, "log_every": 1}
OPTIONAL_INT_ARGUMENTS = ("max_steps", "eval_every", "checkpoint_every", "checkpoint_every_steps", "keep_checkpoints")


def _bad_int(minimum: int) -> st.SearchStrategy:
    return st.integers(max_value=minimum - 1) | st.floats() | st.booleans() | st.text(max_size=2)


@st.composite
def bad_trainer_arguments(draw, folder: Path) -> tuple[dict[str, Any], type[Exception], str]:
    """Keyword arguments of ``Trainer`` with one of them bad, the error and a pattern naming the argument."""
    step = AdversarialStep([PGDAttack(0.1, 0.05, 1), AdversarialCE()])
    kwargs: dict[str, Any] = {
        "model": TRAINER_MODEL, "step": step, "optimizer": OPTIMIZER, "train_data": TRAIN,
        "output_dir": folder / "run", "progress": False,
    }  # fmt: skip
    kind = draw(
        st.sampled_from((
            "model", "step", "optimizer", "foreign optimizer", "model classes", "step classes", "channels",
            "int", "optional int", "grad_clip", "eval_eps", "empty data", "mixed_precision", "output file",
        ))
    )  # fmt: skip
    if kind == "model":
        kwargs["model"] = draw(st.sampled_from(("test_resnet", None, [TRAINER_MODEL], TRAINER_MODEL.state_dict())))
        return kwargs, TypeError, "model must be a torch.nn.Module"
    if kind == "step":
        kwargs["step"] = draw(st.sampled_from((step.callbacks, None, PGDAttack())))
        return kwargs, TypeError, "step must be a robustmix.AdversarialStep"
    if kind == "optimizer":
        kwargs["optimizer"] = draw(st.sampled_from(("sgd", None, torch.optim.SGD)))
        return kwargs, TypeError, "optimizer must be a torch.optim.Optimizer"
    if kind == "foreign optimizer":
        kwargs["optimizer"] = torch.optim.SGD(OTHER_MODELS["optimizer"].parameters(), lr=0.1)
        return kwargs, ValueError, "the optimizer holds none of the model's parameters"
    if kind == "model classes":
        kwargs["model"] = OTHER_MODELS["classes"]
        kwargs["optimizer"] = torch.optim.SGD(kwargs["model"].parameters(), lr=0.1)
        return kwargs, ValueError, "train_data has 10 classes but the model has 5 outputs"
    if kind == "step classes":
        classes = draw(st.integers(2, 100).filter(lambda n: n != 10))
        kwargs["step"] = AdversarialStep(step.callbacks, num_classes=classes)
        return kwargs, ValueError, f"the step was built with num_classes={classes} but the model has 10"
    if kind == "channels":
        kwargs["model"] = OTHER_MODELS["channels"]
        kwargs["optimizer"] = torch.optim.SGD(kwargs["model"].parameters(), lr=0.1)
        return kwargs, ValueError, "train_data has 1-channel images but the model takes in_chans=3"
    if kind == "int":
        name = draw(st.sampled_from(sorted(INT_ARGUMENTS)))
        kwargs[name] = draw(_bad_int(INT_ARGUMENTS[name]))
        return kwargs, ValueError, rf"{name} must be an integer >= {INT_ARGUMENTS[name]}"
    if kind == "optional int":
        name = draw(st.sampled_from(OPTIONAL_INT_ARGUMENTS))
        kwargs[name] = draw(_bad_int(1))
        return kwargs, ValueError, rf"{name} must be an integer >= 1"
    if kind in ("grad_clip", "eval_eps"):
        low = st.floats(max_value=0.0) if kind == "grad_clip" else st.floats(max_value=-1e-12)
        value = draw(low | st.sampled_from((math.nan, math.inf)) | st.text(max_size=3) | st.booleans())
        kwargs[kind] = value
        return kwargs, (TypeError if isinstance(value, (str, bool)) else ValueError), rf"{kind} must be a"
    if kind == "empty data":
        name = draw(st.sampled_from(("train_data", "val_data")))
        kwargs[name] = _digits(0)
        return kwargs, ValueError, rf"{name} must be a non-empty map-style dataset"
    if kind == "mixed_precision":
        kwargs["mixed_precision"] = draw(st.sampled_from(("fp8", "fp32", "bf16", "fp16", "BF16")))
        return kwargs, ValueError, "mixed_precision"
    (folder / "file").write_text("not a folder")
    kwargs["output_dir"] = folder / "file"
    return kwargs, ValueError, "output_dir .* exists and is not a folder"


@FUZZ
@given(st.data())
def test_trainer_rejects_bad_arguments_before_any_state_changes(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kwargs, error, pattern = data.draw(bad_trainer_arguments(folder))
        optimizer_state = copy.deepcopy(OPTIMIZER.state_dict())
        files = _files(folder)
        with unchanged(TRAINER_MODEL), pytest.raises(error, match=pattern):
            Trainer(**kwargs)
        assert _same(OPTIMIZER.state_dict(), optimizer_state)
        assert _files(folder) == files


# ---------------------------------------------------------------------- recipe command lines

#: The base flags' valid values; everything else must end the program with status 2.
BASE_NUMBERS = {
    "--lr": lambda v: 0 < v < math.inf,
    "--momentum": lambda v: 0 <= v < 1,
    "--weight-decay": lambda v: 0 <= v < math.inf,
    "--eps": lambda v: 0 <= v <= 1,
    "--step-size": lambda v: 0 <= v < math.inf,
    "--grad-clip": lambda v: 0 < v < math.inf,
}
#: Each flag's valid integers: from its minimum; --seed up to 2**31 - 1 (NumPy seeds each process with seed + rank).
BASE_INTS = {
    "--epochs": 1, "--batch-size": 1, "--max-steps": 1, "--attack-steps": 0, "--seed": range(0, 2**31),
    "--eval-every": 1, "--checkpoint-every": 1, "--checkpoint-every-steps": 1, "--keep-checkpoints": 1,
    "--num-workers": 0, "--threads": 0,
}  # fmt: skip
BASE_CHOICES = {"--optimizer", "--schedule", "--mixed-precision", "--preset"}
#: (recipe, flag, valid values) of the methods' own numeric flags, at --epochs 2 and the tiny dataset's
#: 90 training examples.
METHOD_NUMBERS = [
    ("adalab", "--lam-max", lambda v: 0 <= v <= 1),
    ("adalab", "--temperature", lambda v: 0 < v < math.inf),
    ("adalab", "--aa-step-size", lambda v: 0 < v < math.inf),
    ("adalab", "--importance-c", lambda v: 0 <= v < math.inf),
    ("trades", "--beta", lambda v: 0 <= v < math.inf),
    ("mart", "--beta", lambda v: 0 <= v < math.inf),
    ("awp", "--gamma", lambda v: 0 <= v < math.inf),
    ("sglr", "--r", lambda v: 0 <= v <= 1),
    ("sglr", "--momentum-sglr", lambda v: 0 <= v <= 1),
    ("sglr", "--clean-weight", lambda v: 0 <= v <= 1),
    ("mail", "--bias", math.isfinite),
    ("mail", "--slope", lambda v: 0 <= v < math.inf),
    ("gairat", "--lam", lambda v: not math.isnan(v)),
    ("bilaw", "--meta-lr", lambda v: 0 < v < math.inf),
    ("caat", "--meta-lr", lambda v: 0 < v < math.inf),
    ("caat", "--beta-tr", lambda v: 0 <= v < math.inf),
]
METHOD_INTS = [
    ("adalab", "--burn-in", range(0, 2)),
    ("mail", "--burn-in", range(0, 2)),
    ("awp", "--warmup-epochs", range(0, 2)),
    ("adalab", "--aa-steps", range(0, 10**15)),
    ("bilaw", "--meta-every", range(1, 10**15)),
    ("bilaw", "--meta-size", range(1, 90)),
    ("caat", "--meta-size", range(1, 90)),
    ("fgsm_rs", "--attack-steps", range(1, 2)),
]
METHOD_CHOICES = [
    ("adalab", "--margin"), ("adalab", "--weighting"), ("mail", "--base"), ("awp", "--base"),
    ("gairat", "--weight-kind"), ("gairat", "--lam-schedule"),
]  # fmt: skip
#: Values that are no number (or NaN); "inf" and "1e999" parse as infinity, which some flags accept.
JUNK = ("abc", "8/0", "1/", "", "--", "0x1p3", "1,5", "nan", "NaN", "inf", "-inf", "1e999")
#: Every valid value of every choice flag of every recipe, read from the parsers: junk drawn for a choice flag
#: must not be one of them.
CHOICES = {
    str(choice)
    for name in training_recipes()
    for action in load_recipe(name).parser()._actions
    for choice in action.choices or ()
}


def _bad_number(valid) -> st.SearchStrategy:
    numbers = st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not valid(v)).map(repr)
    fractions = st.tuples(st.integers(-(10**6), 10**6), st.integers(1, 10**6)).filter(lambda f: not valid(f[0] / f[1]))
    junk = [j for j in JUNK if j not in ("inf", "1e999") or not valid(math.inf)]
    return numbers | fractions.map(lambda f: f"{f[0]}/{f[1]}") | st.sampled_from(junk)


def _bad_int_flag(valid: range) -> st.SearchStrategy:
    ints = st.integers(-(10**12), 10**12).filter(lambda v: v not in valid).map(str)
    floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not v.is_integer()).map(repr)
    return ints | floats | st.sampled_from(JUNK)


@st.composite
def bad_flags(draw) -> tuple[str, list[str], str]:
    """``(recipe, flags, the flag the message must name)``."""
    kind = draw(st.sampled_from(("number", "int", "choice", "method number", "method int", "method choice", "other")))
    if kind == "number":
        flag = draw(st.sampled_from(sorted(BASE_NUMBERS)))
        return draw(st.sampled_from(("pgd_at", "trades"))), [flag, draw(_bad_number(BASE_NUMBERS[flag]))], flag
    if kind == "int":
        flag = draw(st.sampled_from(sorted(BASE_INTS)))
        valid = BASE_INTS[flag] if isinstance(BASE_INTS[flag], range) else range(BASE_INTS[flag], 10**15)
        return "pgd_at", [flag, draw(_bad_int_flag(valid))], flag
    junk = st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True).filter(lambda v: v not in CHOICES)
    if kind == "choice":
        flag = draw(st.sampled_from(sorted(BASE_CHOICES)))
        return "pgd_at", [flag, draw(junk)], flag
    if kind == "method number":
        name, flag, valid = draw(st.sampled_from(METHOD_NUMBERS))
        return name, [flag, draw(_bad_number(valid))], flag
    if kind == "method int":
        name, flag, valid = draw(st.sampled_from(METHOD_INTS))
        return name, [flag, draw(_bad_int_flag(valid))], flag
    if kind == "method choice":
        name, flag = draw(st.sampled_from(METHOD_CHOICES))
        return name, [flag, draw(junk)], flag
    other = draw(st.sampled_from(("model", "dataset", "data-path", "resume", "milestones", "mail beta", "linear")))
    if other == "model":
        return "pgd_at", ["--model", "no_such_" + draw(junk)], "--model"
    if other in ("dataset", "data-path", "resume"):
        return "pgd_at", [f"--{other}", f"/no/such/{draw(junk)}"], f"--{other}"
    if other == "milestones":
        return "pgd_at", ["--schedule", "multistep"], "--milestones"
    if other == "mail beta":
        return "mail", ["--base", "at", "--beta", "1"], "--beta"
    return "gairat", ["--lam-schedule", "linear"], "--lam"


#: Flags every run of a recipe gets first: the tiny dataset has 90 training examples, fewer than the default
#: meta split of BiLAW and CAAT.
FIRST_FLAGS = {"bilaw": ["--meta-size", "10"], "caat": ["--meta-size", "10"]}
RECIPES = {name: load_recipe(name) for name in (*training_recipes(), "evaluate")}


def _exit_message(call) -> str:
    """Run ``call``; it must exit with status 2. Returns the last line of its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as ex:
        call()
    assert ex.value.code == 2, err.getvalue()
    return err.getvalue().strip().splitlines()[-1]


def _no_training(*args, **kwargs):
    raise AssertionError("bad flags must stop the recipe before training")


@FUZZ
@given(bad_flags())
def test_recipes_exit_with_status_2_naming_the_flag(tiny, case):
    name, flags, flag = case
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(recipe_module.Trainer, "fit", _no_training):
        out = Path(tmp) / "run"
        argv = quick_flags(tiny, out, "--max-steps", "1", *FIRST_FLAGS.get(name, []), *flags)
        line = _exit_message(lambda: RECIPES[name].main(argv))
        assert line.startswith(f"{name}.py: error: ") and flag in line, line
        assert not out.exists()


@settings(FUZZ, max_examples=10)
@given(st.sampled_from([
    ("bilaw", "--meta-lr", lambda v: 0 < v < math.inf),
    ("caat", "--beta-tr", lambda v: 0 <= v < math.inf),
    ("caat", "--meta-lr", lambda v: 0 < v < math.inf),
]), st.data())  # fmt: skip
def test_overwrite_with_a_bad_flag_keeps_the_old_run(tiny, case, data):
    """Values only a callback can judge are found after the data loads: --overwrite must not have deleted yet."""
    name, flag, valid = case
    # Fixed-point text: argparse reads "-1e-05" as an option, "-0.000010" as a negative number.
    value = data.draw(
        st.floats(allow_nan=False, min_value=-1e6).map(lambda v: f"{v:f}").filter(lambda t: not valid(float(t))),
        label="value",
    )
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(recipe_module.Trainer, "fit", _no_training):
        out = Path(tmp) / "run"
        (out / BEST_DIR).mkdir(parents=True)
        for path, content in ((CONFIG_FILE, b'{"old": 1}'), (MODEL_FILE, b"old weights"), (METRICS_LOG, b"{}\n")):
            (out / path).write_bytes(content)
        files = _files(out)
        flags = quick_flags(tiny, out, "--overwrite", *FIRST_FLAGS[name], flag, value)
        line = _exit_message(lambda: RECIPES[name].main(flags))
        assert line.startswith(f"{name}.py: error: {flag}: "), line
        assert _files(out) == files


# ---------------------------------------------------------------------- run folders: load_model and evaluation


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """The files a finished run leaves that loading and evaluation read (untrained 10-class weights)."""
    folder = tmp_path_factory.mktemp("fuzz_run") / "run"
    (folder / BEST_DIR).mkdir(parents=True)
    model = _model()
    config = {
        "recipe": "pgd_at",
        "model": model_config(model),
        "data": {"dataset": "digits", "path": None, "split_seed": 0, "num_classes": 10},
        "attack": {"eps": 0.1, "step_size": 0.04, "steps": 5},
        "seed": 0,
    }
    atomic_write_json(folder / CONFIG_FILE, config)
    atomic_save_weights(model.state_dict(), folder / MODEL_FILE)
    atomic_save_weights(model.state_dict(), folder / BEST_DIR / MODEL_FILE)
    (folder / METRICS_LOG).write_text('{"step": 1, "loss": 2.3}\n{"step": 2, "val_pgd_acc": 0.1}\n')
    return folder


#: JSON values of every type, for a config entry of the wrong type.
_JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
JSON = _JSON_LEAF | st.lists(_JSON_LEAF, max_size=3) | st.dictionaries(st.text(max_size=3), _JSON_LEAF, max_size=3)
MODEL_KEYS = ("name", "num_classes", "in_chans", "cifar_stem", "mean", "std", "timm_kwargs")


def _bad_model_value(key: str, draw) -> Any:
    """A value of the config's model entry that does not describe the saved model."""
    if key == "name":
        return draw(JSON.filter(lambda v: not isinstance(v, str)) | st.text(max_size=5).map(lambda t: "no_such_" + t))
    if key == "num_classes":
        return draw(
            JSON.filter(lambda v: v != 10 or isinstance(v, bool)) | st.integers(-5, 30).filter(lambda v: v != 10)
        )
    if key == "in_chans":
        return draw(JSON.filter(lambda v: v != 1 or isinstance(v, bool)))
    if key == "cifar_stem":
        return draw(JSON.filter(lambda v: not isinstance(v, bool)))
    if key in ("mean", "std"):
        return draw(
            JSON.filter(lambda v: not (isinstance(v, list) and len(v) == 1 and isinstance(v[0], (int, float))))
            | st.sampled_from(([math.nan], [math.inf], [-math.inf]))
        )
    # timm drops keyword arguments that are None: a dict of Nones builds the same model.
    return draw(JSON.filter(lambda v: not isinstance(v, dict) or any(x is not None for x in v.values())))


@dataclasses.dataclass
class Corruption:
    """What was done to a run folder, and what each entry point must say about it."""

    describe: str
    file: str  # the file the message must name ("" when the message names the problem otherwise)
    error: type[Exception]  # load_model's and evaluate_run's error
    pattern: str = ""  # a further pattern the message must match
    load_model_ok: bool = False  # the entries load_model reads are intact
    weights: str = "final"


@st.composite
def corruptions(draw, folder: Path) -> Corruption:
    """Break one file of the run folder at ``folder`` in place."""
    target = draw(st.sampled_from(("config", "config model", "config data", "weights", "best weights", "classes")))
    config_path = folder / CONFIG_FILE
    if target == "config":
        how = draw(st.sampled_from(("delete", "truncate", "bytes", "json")))
        text = config_path.read_bytes()
        if how == "delete":
            config_path.unlink()
            return Corruption(how, CONFIG_FILE, FileNotFoundError, "does not exist")
        if how == "truncate":  # every proper prefix of an object misses its closing brace
            config_path.write_bytes(text[: draw(st.integers(0, text.rindex(b"}") - 1))])
        elif how == "bytes":
            config_path.write_bytes(draw(st.binary(max_size=64)))
        else:
            config_path.write_text(
                json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict) or "model" not in v)))
            )
        return Corruption(how, CONFIG_FILE, ValueError)
    if target == "config model":
        config = json.loads(config_path.read_text())
        key = draw(st.sampled_from(MODEL_KEYS))
        if draw(st.booleans()):
            del config["model"][key]
        else:
            config["model"][key] = _bad_model_value(key, draw)
        atomic_write_json(config_path, config)
        return Corruption(f"model.{key}", CONFIG_FILE, ValueError)
    if target == "config data":
        config = json.loads(config_path.read_text())
        entry, key = draw(
            st.sampled_from((("data", "dataset"), ("data", "path"), ("data", "split_seed"), ("attack", "eps")))
        )
        if draw(st.booleans()):
            del config[entry][key]
        elif key == "eps":
            config[entry][key] = draw(
                JSON.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1)
            )
        elif key == "split_seed":
            config[entry][key] = draw(JSON.filter(lambda v: isinstance(v, bool) or not isinstance(v, int) or v < 0))
        else:
            config[entry][key] = draw(
                JSON.filter(lambda v: not isinstance(v, str) and (key == "dataset" or v is not None))
            )
        atomic_write_json(config_path, config)
        return Corruption(f"{entry}.{key}", CONFIG_FILE, ValueError, load_model_ok=True)
    if target == "classes":  # weights and config of a 5-class model, data of 10 classes
        model = _model(5)
        config = json.loads(config_path.read_text())
        config["model"] = model_config(model)
        atomic_write_json(config_path, config)
        atomic_save_weights(model.state_dict(), folder / MODEL_FILE)
        # evaluate_run finds it in the data, recipes/evaluate.py in config.json's data entry, before loading the data.
        return Corruption("classes", "", ValueError, "model has 5 classes, (the test split|its data) 10", True)
    weights = "best" if target == "best weights" else "final"
    path = folder / BEST_DIR / MODEL_FILE if weights == "best" else folder / MODEL_FILE
    data = path.read_bytes()
    how = draw(st.sampled_from(("delete", "truncate", "bytes", "append", "nonfinite", "other model")))
    if how == "delete":
        path.unlink()
        return Corruption(how, MODEL_FILE, FileNotFoundError, f"no {weights} weights", weights=weights)
    if how == "truncate":
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif how == "bytes":
        path.write_bytes(draw(st.binary(max_size=256)))
    elif how == "append":
        path.write_bytes(data + draw(st.binary(min_size=1, max_size=16)))
    elif how == "nonfinite":
        tensors = load_file(path)
        name = draw(st.sampled_from(sorted(k for k, t in tensors.items() if t.is_floating_point())))
        tensors[name].view(-1)[draw(st.integers(0, tensors[name].numel() - 1))] = draw(
            st.sampled_from((math.nan, math.inf, -math.inf))
        )
        save_file(tensors, path)
        return Corruption(how, MODEL_FILE, ValueError, "NaN or inf", weights=weights)
    else:
        atomic_save_weights(_model(5).state_dict(), path)
        return Corruption(how, MODEL_FILE, ValueError, "does not match", weights=weights)
    return Corruption(how, MODEL_FILE, ValueError, "corrupted", weights=weights)


def _check_message(message: str, corruption: Corruption) -> None:
    assert corruption.file in message, message
    assert re.search(corruption.pattern, message), message


def _must_not_run(*args, **kwargs):
    raise AssertionError("a broken run folder must be rejected before any attack")


@FUZZ
@given(st.data(), st.sampled_from(("load_model", "evaluate_run", "recipes/evaluate.py")))
def test_a_broken_run_folder_is_named_and_left_as_it_was(run_folder, data, entry):
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(evaluate, "worst_case", _must_not_run):
        folder = Path(tmp) / "run"
        shutil.copytree(run_folder, folder)
        corruption = data.draw(corruptions(folder), label="corruption")
        files = _files(folder)
        if entry == "load_model":
            if corruption.load_model_ok:
                load_model(folder, weights=corruption.weights)
            else:
                with pytest.raises(corruption.error) as raised:
                    load_model(folder, weights=corruption.weights)
                _check_message(str(raised.value), corruption)
        elif entry == "evaluate_run":
            with pytest.raises(corruption.error) as raised:
                evaluate_run(folder, weights=corruption.weights, n_examples=4, progress=False, plots=False)
            _check_message(str(raised.value), corruption)
        else:
            argv = ["--run-dir", str(folder), "--weights", corruption.weights, "--n-examples", "4", "--no-plots"]
            argv.append("--no-progress")
            # Every damage ends the command line with a one-line message before any work.
            line = _exit_message(lambda: RECIPES["evaluate"].main(argv))
            assert line.startswith("evaluate.py: error: ")
            _check_message(line, corruption)
        assert _files(folder) == files, "the run folder changed"


@FUZZ
@given(st.data())
def test_a_broken_metrics_log_names_the_file_and_line(run_folder, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = (run_folder / METRICS_LOG).read_bytes()
        how = data.draw(st.sampled_from(("cut inside a line", "bytes", "not an object")))
        if how == "cut inside a line":
            ends = {i for i, b in enumerate(text) if b == ord("\n")}
            cut = data.draw(st.integers(1, len(text) - 2).filter(lambda i: i not in ends and i - 1 not in ends))
            text, pattern = text[:cut], r"line \d+ is not valid JSON"
        elif how == "bytes":
            text = data.draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _valid_rows(b)))
            pattern = r"not UTF-8 text|line \d+ is not (valid JSON|a JSON object)"
        else:
            row = data.draw(JSON.filter(lambda v: not isinstance(v, dict)))
            text += json.dumps(row).encode() + b"\n"
            pattern = r"line 3 is not a JSON object"
        (folder / METRICS_LOG).write_bytes(text)
        with pytest.raises(ValueError, match=pattern) as raised:
            load_metrics_log(folder)
        assert METRICS_LOG in str(raised.value)
        assert (folder / METRICS_LOG).read_bytes() == text


def _valid_rows(data: bytes) -> bool:
    try:
        return all(isinstance(json.loads(line), dict) for line in data.decode().splitlines())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
