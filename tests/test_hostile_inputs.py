"""Run folders and checkpoints received from someone else, damaged on disk, or resumed with other flags.

Nothing in a checkpoint runs code when it is loaded, every file is checked against the manifest before
anything is restored, a damaged ``latest`` checkpoint gives way (loudly) to the newest intact one, and the
resumed run still ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import MultiStepLR

from robustmix import AdversarialCE, AdversarialStep, FGSMAttack, PGDAttack
from robustmix.attacks import apgd, fab_targeted, fgsm_rs, perturb, pgd, square_attack
from robustmix.data import load_dataset
from robustmix.evaluation.run import split_size
from robustmix.methods.caat import ClassWiseBudget
from robustmix.runs.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    open_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from robustmix.runs.folder import (
    RunFolderInUse,
    load_config,
    load_model,
    locked_run_folder,
    recorded_flags,
    replacing_run,
)
from robustmix.runs.safestate import decode_state, encode_state, load_state, save_state
from robustmix.stages.anti import AntiAdversary, anti_adversary
from robustmix.training.sampling import EpochBatches, batches_per_epoch
from robustmix.training.trainer import Trainer
from tests.conftest import crash_at, load_recipe, quick_flags
from tests.trainers import make_model, make_trainer, weights


class _Planted:
    """Unpickling this creates ``path``: a stand-in for code a crafted pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def plant_pickles(folder: Path, marker: Path) -> None:
    """Write the pickled files of the version 1 format into ``folder``, each of which would create ``marker``."""
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (folder / name).write_bytes(pickle.dumps({"state": _Planted(marker)}))


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture
def run(digits, tmp_path):
    """A finished 4-step run with a checkpoint after every step and a multistep lr schedule (a Counter)."""
    scheduler = lambda opt: MultiStepLR(opt, milestones=[2, 3])  # noqa: E731
    trainer = make_trainer(
        digits, max_steps=4, checkpoint_every_steps=1, keep_checkpoints=None, output_dir=tmp_path / "run",
        scheduler=scheduler, eval_every=None,
    )  # fmt: skip
    trainer.fit()
    return tmp_path / "run", scheduler, weights(trainer)


# ---------------------------------------------------------------------- no pickle on the load path


def test_a_checkpoint_is_safetensors_and_json_only(run):
    folder, _, _ = run
    checkpoint = folder / "checkpoints" / "step_4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert all(name.endswith((".safetensors", ".json")) for name in names), names
    assert not any(p.read_bytes().startswith(b"\x80") for p in checkpoint.iterdir())  # no pickle protocol header
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [n for n in names if n != MANIFEST]
    saved = read_checkpoint(checkpoint)
    assert saved["scheduler"]["milestones"] == Counter({2: 1, 3: 1})  # restored as the Counter it was
    assert saved["scheduler"]["last_epoch"] == 4 and saved["trainer_state"]["global_step"] == 4


def test_resuming_never_opens_a_planted_pickle(run, digits, tmp_path):
    folder, scheduler, _ = run
    marker = tmp_path / "code-ran"
    latest = resolve_checkpoint("latest", folder / "checkpoints")
    plant_pickles(latest, marker)
    (folder / "model.safetensors").unlink()
    make_trainer(
        digits, max_steps=4, checkpoint_every_steps=1, output_dir=folder, scheduler=scheduler, eval_every=None
    ).fit(resume="latest")
    assert not marker.exists()


def test_a_pickled_checkpoint_of_the_old_format_is_refused_without_unpickling(run, tmp_path):
    folder, _, _ = run
    marker = tmp_path / "code-ran"
    for checkpoint in (folder / "checkpoints").glob("step_*"):
        (checkpoint / MANIFEST).unlink()
        plant_pickles(checkpoint, marker)
    with pytest.raises(CheckpointError, match=r"older robustmix .*optimizer\.bin.*no longer unpickles"):
        open_checkpoint("latest", folder / "checkpoints")
    assert not marker.exists()


# ---------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_0.safetensors",
     "rng_0.json", "callbacks.json", "trainer_state.json"],
)  # fmt: skip
def test_a_flipped_byte_is_named(run, name):
    folder, _, _ = run
    checkpoint = folder / "checkpoints" / "step_4"
    flip_byte(checkpoint / name)
    with pytest.raises(CheckpointError, match=rf"step_4/{name} is corrupted: its SHA-256 differs"):
        read_checkpoint(checkpoint)


@pytest.mark.parametrize("name", ["rng_0.json", "rng_0.safetensors", "optimizer.json", "scheduler.safetensors"])
def test_a_missing_file_is_named(run, name):
    """A missing RNG state is an error like any other missing file: resuming without it would not be exact."""
    folder, _, _ = run
    checkpoint = folder / "checkpoints" / "step_4"
    (checkpoint / name).unlink()
    with pytest.raises(CheckpointError, match=rf"step_4/{name} is missing"):
        read_checkpoint(checkpoint)


def test_a_manifest_cannot_name_files_outside_the_checkpoint(run):
    folder, _, _ = run
    checkpoint = folder / "checkpoints" / "step_4"
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"]["../../config.json"] = "0" * 64
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lists '\.\./\.\./config\.json', which is not a file of"):
        read_checkpoint(checkpoint)


def test_rng_state_that_matches_its_hash_but_is_invalid_is_refused(run):
    """A consistent manifest does not make a state valid: RNG states are tried on throwaway generators first."""
    folder, _, _ = run
    checkpoint = folder / "checkpoints" / "step_4"
    state = load_state(checkpoint, "rng_0")
    state["python"] = (3, (1, 2, 3), None)
    save_state(state, checkpoint, "rng_0")
    _rehash(checkpoint)
    with pytest.raises(CheckpointError, match=r"rng_0\.json does not hold valid RNG states"):
        read_checkpoint(checkpoint)


def _rehash(checkpoint: Path) -> None:
    """Rewrite the manifest for the files as they are now (what a crafted checkpoint would do)."""
    from robustmix.runs.checkpoint import file_sha256

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {name: file_sha256(checkpoint / name) for name in manifest["files"]}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------- falling back to an intact checkpoint


def test_a_damaged_latest_falls_back_loudly_and_the_run_stays_exact(run, digits, tmp_path, monkeypatch):
    _, scheduler, expected = run
    crashed = tmp_path / "crashed"
    options = {"max_steps": 4, "checkpoint_every_steps": 1, "keep_checkpoints": 2, "output_dir": crashed}
    crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(digits, scheduler=scheduler, eval_every=None, **options).fit()
    monkeypatch.undo()
    flip_byte(crashed / "checkpoints" / "step_3" / "rng_0.safetensors")

    trainer = make_trainer(digits, scheduler=scheduler, eval_every=None, **options)
    with pytest.warns(RuntimeWarning, match=r"skipping the checkpoints after step_2 \(.*step_3/rng_0\.safetensors"):
        trainer.fit(resume="latest")
    assert all(torch.equal(expected[k], v) for k, v in weights(trainer).items())


def test_a_checkpoint_named_by_its_path_is_never_replaced(run):
    folder, _, _ = run
    flip_byte(folder / "checkpoints" / "step_4" / "rng_0.json")
    with pytest.raises(CheckpointError, match=r"step_4/rng_0\.json is corrupted"):
        open_checkpoint(folder / "checkpoints" / "step_4", folder / "checkpoints")


def test_no_intact_checkpoint_is_an_error_naming_each(run):
    folder, _, _ = run
    for checkpoint in (folder / "checkpoints").glob("step_*"):
        flip_byte(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step_4/model.*step_1/model"):
        open_checkpoint("latest", folder / "checkpoints")


# ---------------------------------------------------------------------- the latest pointer


@pytest.mark.parametrize("target", ["../../elsewhere", "/tmp", "step_2/..", "step_x"])
def test_latest_cannot_lead_out_of_the_checkpoints_folder(run, target):
    folder, _, _ = run
    (folder / "checkpoints" / LATEST).write_text(target)
    with pytest.raises(CheckpointError, match="not a step_<N> checkpoint folder beside it"):
        resolve_checkpoint("latest", folder / "checkpoints")


def test_latest_cannot_name_a_link(run, tmp_path):
    folder, _, _ = run
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder / "checkpoints" / "step_4", elsewhere)
    os.symlink(elsewhere, folder / "checkpoints" / "step_9")
    (folder / "checkpoints" / LATEST).write_text("step_9")
    with pytest.raises(CheckpointError, match="'step_9', not a step_<N> checkpoint folder"):
        resolve_checkpoint("latest", folder / "checkpoints")


# ---------------------------------------------------------------------- state files


_keys = st.text(max_size=5)
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf]),
    st.text(max_size=5),
    st.builds(lambda n, dtype: torch.arange(n).to(dtype), st.integers(0, 4), st.sampled_from([torch.float32,
              torch.bfloat16, torch.int64, torch.uint8])),
)  # fmt: skip
_states = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_keys, inner, max_size=3),
        st.dictionaries(st.integers(-3, 9), inner, max_size=3),
        st.dictionaries(st.integers(0, 9), st.integers(1, 3), max_size=3).map(Counter),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=60, deadline=None)
@given(_states)
def test_state_files_round_trip_every_allowed_type(state):
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(state, tensors)
    assert _same(decode_state(json.loads(json.dumps(tree)), tensors), state)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), {(1, 2): 3}, {1: "a", "b": 2}, print])
def test_state_files_refuse_what_needs_pickle(value):
    with pytest.raises(ValueError, match="can be saved without pickle"):
        encode_state({"entry": value}, {})


@pytest.mark.parametrize(
    "tree",
    [{"tensor": "absent"}, {"tuple": [1], "list": [2]}, {"object": "os.system"}, {"counter": [[1, "x"]]},
     {"int_dict": {"a": 1}}, {"dict": [1]}, {"tensor": 3}],
)  # fmt: skip
def test_state_files_refuse_what_they_do_not_write(tree):
    with pytest.raises(ValueError):
        decode_state(tree, {})


# ---------------------------------------------------------------------- resuming with other flags (recipes)


PGD_AT = load_recipe("pgd_at")
#: --attack-bn-mode is given: the tests compare it with what a run recorded, whatever the recipe's default.
RUN_FLAGS = [
    "--max-steps", "3", "--attack-steps", "1", "--checkpoint-every-steps", "1", "--eval-every", "9",
    "--attack-bn-mode", "train",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe_run(tiny, tmp_path_factory) -> Path:
    """A 3-step pgd_at run on the tiny dataset, killed before its last step (checkpoints step_1 and step_2)."""
    folder = tmp_path_factory.mktemp("recipe_run") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(KeyboardInterrupt):
        crash_at(monkeypatch, 2)
        PGD_AT.main(quick_flags(tiny, folder, *RUN_FLAGS))
    return folder


@pytest.fixture
def unfinished(recipe_run, tmp_path) -> Path:
    """A copy of ``recipe_run`` to resume."""
    shutil.copytree(recipe_run, tmp_path / "run")
    return tmp_path / "run"


def exit_line(call, capsys) -> str:
    """Run ``call``; it must exit with status 2 and an error line (after argparse's usage), which is returned."""
    with pytest.raises(SystemExit) as exited:
        call()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--eps", "0.2"], "--eps 0.1 there, 0.2 here"), (["--attack-steps", "2"], "--attack-steps 1 there, 2 here"),
     (["--lr", "0.05"], "--lr 0.1 there, 0.05 here"), (["--seed", "1"], "--seed 0 there, 1 here"),
     (["--model", "resnet18"], '--model "test_resnet" there, "resnet18" here'),
     (["--max-steps", "5"], "--max-steps 3 there, 5 here (the lr schedule spans the planned steps"),
     (["--batch-size", "8"], "--batch-size 16 there, 8 here"), (["--train-size", "50"], "--train-size null there"),
     (["--schedule", "constant"], '--schedule "warmup-cosine" there, "constant" here'),
     (["--attack-bn-mode", "eval"], '--attack-bn-mode "train" there, "eval" here')],
)  # fmt: skip
def test_resuming_with_other_flags_is_refused_and_changes_nothing(tiny, unfinished, capsys, flags, named):
    before = tree(unfinished)
    argv = quick_flags(tiny, unfinished, *RUN_FLAGS, *flags, "--resume", "latest")
    line = exit_line(lambda: PGD_AT.main(argv), capsys)
    assert line.startswith("pgd_at.py: error: --resume: the run in ") and named in line, line
    assert "another --output-dir" in line and f"--init-from {unfinished}" in line
    assert tree(unfinished) == before  # config.json above all


def test_another_recipe_cannot_resume_the_run(tiny, unfinished, capsys):
    trades = load_recipe("trades")
    line = exit_line(lambda: trades.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest")), capsys)
    assert '--recipe "pgd_at" there, "trades" here' in line


def test_resuming_past_a_finished_run_is_refused(tiny, unfinished, capsys):
    PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest"))
    argv = quick_flags(tiny, unfinished, *RUN_FLAGS, "--max-steps", "4", "--resume", "latest")
    assert "--max-steps 3 there, 4 here (the lr schedule" in exit_line(lambda: PGD_AT.main(argv), capsys)


def test_bookkeeping_flags_may_change_and_the_resume_stays_exact(tiny, unfinished, tmp_path):
    PGD_AT.main(quick_flags(tiny, tmp_path / "straight", *RUN_FLAGS))
    config = (unfinished / "config.json").read_bytes()
    bookkeeping = ["--keep-checkpoints", "5", "--eval-every", "1", "--threads", "1", "--checkpoint-every", "2"]
    PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, *bookkeeping, "--resume", "latest"))
    straight, resumed = _weights(tmp_path / "straight"), _weights(unfinished)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (unfinished / "config.json").read_bytes() == config  # the run keeps the config it started with


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_a_run_that_predates_a_flag_compares_as_its_default(tiny, unfinished):
    """Flags a run did not record take their default; --attack-bn-mode is read from the attack it recorded."""
    config = json.loads((unfinished / "config.json").read_text())
    for name in ("attack_bn_mode", "grad_clip", "init_from"):
        del config["flags"][name]
    assert "bn_mode='train'" in config["callbacks"][0]
    (unfinished / "config.json").write_text(json.dumps(config))
    PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest"))
    assert (unfinished / "model.safetensors").is_file()


def test_a_run_that_predates_attack_bn_mode_and_attacked_in_eval_mode_is_refused(tiny, unfinished, capsys):
    config = json.loads((unfinished / "config.json").read_text())
    del config["flags"]["attack_bn_mode"]
    config["callbacks"][0] = config["callbacks"][0].replace("bn_mode='train'", "bn_mode='eval'")
    (unfinished / "config.json").write_text(json.dumps(config))
    argv = quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest")
    assert '--attack-bn-mode "eval" there, "train" here' in exit_line(lambda: PGD_AT.main(argv), capsys)


def test_resume_takes_only_checkpoints_of_the_output_dir(tiny, unfinished, tmp_path, capsys):
    argv = quick_flags(tiny, tmp_path / "other", *RUN_FLAGS, "--resume", str(unfinished / "checkpoints" / "step_2"))
    line = exit_line(lambda: PGD_AT.main(argv), capsys)
    assert "is not a checkpoint of the run in --output-dir" in line and "--init-from" in line


def test_a_checkpoint_of_the_old_format_is_a_one_line_error(tiny, unfinished, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    for checkpoint in (unfinished / "checkpoints").glob("step_*"):
        (checkpoint / MANIFEST).unlink()
        plant_pickles(checkpoint, marker)
    line = exit_line(lambda: PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest")), capsys)
    assert line.startswith("pgd_at.py: error: --resume: no intact checkpoint") and "older robustmix" in line
    assert not marker.exists()


# ---------------------------------------------------------------------- resuming from an older checkpoint

FINAL = ("model.safetensors", "metrics.json", "curves.png")


def rising_scores(monkeypatch, score=lambda trainer: trainer.global_step / 100) -> None:
    """Make every evaluation score ``score(trainer)`` as its PGD accuracy, without attacking."""
    scores = lambda self, data, **_: {"clean_acc": 1.0, "pgd_acc": score(self), "n": 1}  # noqa: E731
    monkeypatch.setattr(Trainer, "evaluate", scores)


def test_a_resume_from_an_older_checkpoint_deletes_the_abandoned_results(tiny, tmp_path, capsys, monkeypatch):
    folder, flags = tmp_path / "run", [*RUN_FLAGS, "--max-steps", "5", "--keep-checkpoints", "9"]  # best/: step 5
    PGD_AT.main(quick_flags(tiny, folder, *flags))
    straight = {name: (folder / name).read_bytes() for name in ("model.safetensors", "best/model.safetensors")}
    assert all((folder / name).is_file() for name in FINAL)

    crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        PGD_AT.main(quick_flags(tiny, folder, *flags, "--resume", str(folder / "checkpoints" / "step_2")))
    monkeypatch.undo()
    assert "deleted the model.safetensors, metrics.json, curves.png, best/ of the run" in capsys.readouterr().out
    assert not any((folder / name).exists() for name in (*FINAL, "best"))
    for kind in ("final", "best"):
        with pytest.raises(FileNotFoundError, match=r"the run in .*run is unfinished .*--resume latest finishes it"):
            load_model(folder, weights=kind)
    line = exit_line(lambda: load_recipe("evaluate").main(["--run-dir", str(folder), "--no-plots"]), capsys)
    assert line.startswith("evaluate.py: error: ") and "is unfinished" in line, line
    line = exit_line(lambda: load_recipe("results").main([str(folder), "--output", str(tmp_path / "r.md")]), capsys)
    assert line.startswith("results.py: error: ") and "is unfinished" in line, line

    PGD_AT.main(quick_flags(tiny, folder, *flags, "--resume", "latest"))  # the same run again, bit for bit
    assert {name: (folder / name).read_bytes() for name in straight} == straight


def test_resuming_the_latest_checkpoint_of_an_interrupted_run_deletes_nothing(digits, tmp_path, monkeypatch):
    options = {"max_steps": 6, "checkpoint_every_steps": 1, "keep_checkpoints": None, "eval_steps": 1}
    straight = make_trainer(digits, output_dir=tmp_path / "straight", **options)
    straight.fit()
    folder = tmp_path / "run"
    crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(digits, output_dir=folder, **options).fit()
    assert json.loads((folder / "best" / "metrics.json").read_text())["step"] == 3  # the first epoch's validation
    before = tree(folder)
    with pytest.raises(KeyboardInterrupt):  # resumed from step_5, and dead again at once
        make_trainer(digits, output_dir=folder, **options).fit(resume="latest")
    assert tree(folder) == before
    monkeypatch.undo()
    resumed = make_trainer(digits, output_dir=folder, **options)
    resumed.fit(resume="latest")
    assert all(torch.equal(weights(straight)[k], v) for k, v in weights(resumed).items())
    assert tree(folder / "best") == tree(tmp_path / "straight" / "best")


def test_a_best_from_before_the_checkpoint_stays_and_the_final_files_go(digits, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    options = {"max_steps": 6, "checkpoint_every_steps": 1, "keep_checkpoints": None, "output_dir": folder}
    rising_scores(monkeypatch, lambda trainer: 0.5 if trainer.global_step == 3 else 0.1)  # best: step 3
    make_trainer(digits, ema_decay=0.9, **options).fit()
    best = tree(folder / "best")
    make_trainer(digits, ema_decay=0.9, **options).fit(resume=folder / "checkpoints" / "step_4")
    assert tree(folder / "best") == best  # the resumed run did not score higher, and kept it
    assert (folder / "model.safetensors").is_file()  # written again at the end, like model_ema.safetensors
    crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(digits, ema_decay=0.9, **options).fit(resume=folder / "checkpoints" / "step_4")
    assert not any((folder / name).exists() for name in ("model.safetensors", "model_ema.safetensors"))
    assert tree(folder / "best") == best


def test_a_resumed_run_that_never_scores_as_well_again_ends_without_best(tiny, tmp_path, capsys, monkeypatch):
    # Validated at the end of the first epoch (step 6) and of the run (step 9).
    folder, flags = tmp_path / "run", [*RUN_FLAGS, "--max-steps", "9", "--eval-every", "1", "--keep-checkpoints", "9"]
    rising_scores(monkeypatch)
    PGD_AT.main(quick_flags(tiny, folder, *flags))
    assert json.loads((folder / "best" / "metrics.json").read_text())["step"] == 9
    # A continuation from step_7 (whose best is step 6, weights best/ no longer holds) that scores lower.
    rising_scores(monkeypatch, lambda trainer: 0.0)
    metrics = PGD_AT.main(quick_flags(tiny, folder, *flags, "--resume", str(folder / "checkpoints" / "step_7")))
    assert "no best/ and no test_best: the weights of the best validation score (step 6)" in capsys.readouterr().out
    assert metrics["best"]["step"] == 6 and "test_best" not in metrics and not (folder / "best").exists()
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    with pytest.raises(FileNotFoundError, match=r"the run has no best weights .*resumed from a checkpoint older"):
        load_model(folder, weights="best")
    load_model(folder)  # the final weights are there
    argv = ["--run-dir", str(folder), "--weights", "best", "--no-plots"]
    assert "has no best weights (it never validated" in exit_line(lambda: load_recipe("evaluate").main(argv), capsys)


# ---------------------------------------------------------------------- a last batch of one example


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.integers(1, 12), st.integers(1, 4))
def test_no_epoch_ends_with_a_batch_of_one_example(n, batch, world):
    ranks = [list(EpochBatches(n, batch, num_processes=world, process_index=r, seed=0)) for r in range(world)]
    assert all(len(batches) == batches_per_epoch(n, batch, world) for batches in ranks)
    sizes = {len(b) for batches in ranks for b in batches}
    assert batch == 1 or 1 not in sizes
    seen = [i for batches in ranks for b in batches for i in b]
    assert len(seen) == len(set(seen)) >= n - (2 * world - 1 if batch > 1 else world - 1)


def test_a_dataset_that_leaves_one_example_trains_and_warns(digits):
    train, val = digits
    train = dataclasses.replace(train, images=train.images[:33], labels=train.labels[:33], index=train.index[:33])
    with pytest.warns(UserWarning, match=r"33 examples: the last batch .* one example per process.*left out \(1 "):
        trainer = make_trainer((train, val), epochs=2)
    assert trainer.steps_per_epoch == 2
    assert trainer.fit()["step"] == 4


def test_a_step_on_one_example_refuses_before_batchnorm_moves(digits):
    model = make_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = AdversarialStep([PGDAttack(0.1, 0.05, 2), AdversarialCE()])
    x, y = digits[0].images[:1], digits[0].labels[:1]
    with pytest.raises(ValueError, match="a batch of one example cannot train a model with BatchNorm in train mode"):
        step(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics untouched
    loss, _ = step(model.eval(), x, y)  # frozen statistics: one example is fine
    assert torch.isfinite(loss)


def test_batch_size_one_with_batchnorm_is_refused_by_the_trainer(digits):
    with pytest.raises(ValueError, match="batch_size 1 cannot train a model with BatchNorm"):
        make_trainer(digits, batch_size=1)


# ---------------------------------------------------------------------- L-inf budgets above 1


def _budget_calls(splits) -> dict:
    """Every public entry point that takes an L-inf budget, as ``{name: eps -> call}``."""
    model = make_model().eval()
    x, y = torch.rand(2, 1, 32, 32), torch.tensor([0, 1])
    return {
        "PGDAttack": lambda eps: PGDAttack(eps, 0.01, 1),
        "FGSMAttack": lambda eps: FGSMAttack(eps),
        "AntiAdversary": lambda eps: AntiAdversary(eps, 0.01, 1),
        "ClassWiseBudget": lambda eps: ClassWiseBudget(eps, [1.0, 1.0]),
        "perturb": lambda eps: perturb(model, x, y, eps=eps, step_size=0.01, steps=1),
        "perturb per sample": lambda eps: perturb(model, x, y, eps=torch.tensor([0.1, eps]), step_size=0.01, steps=1),
        "pgd": lambda eps: pgd(model, x, y, eps=eps, step_size=0.01, steps=1),
        "fgsm_rs": lambda eps: fgsm_rs(model, x, y, eps=eps),
        "anti_adversary": lambda eps: anti_adversary(model, x, y, eps=eps, step_size=0.01, steps=1),
        "apgd": lambda eps: apgd(model, x, y, eps=eps, steps=1),
        "square_attack": lambda eps: square_attack(model, x, y, eps=eps, queries=1),
        "fab_targeted": lambda eps: fab_targeted(model, x, y, eps=eps, steps=1),
        "Trainer eval_eps": lambda eps: make_trainer(splits, eval_eps=eps),
    }


@pytest.mark.parametrize("name", list(_budget_calls(None)))
def test_an_linf_budget_above_one_is_refused_with_the_command_line_hint(name, digits):
    call = _budget_calls(digits)[name]
    hint = r"in pixels in \[0, 1\](, got 8(\.0)?; for 8/255 write 8/255)?"
    with pytest.raises(ValueError, match=hint):
        call(8.0)
    call(1.0)  # the whole pixel range is still a budget


def test_an_l2_budget_above_one_is_a_budget():
    PGDAttack(3.0, 0.5, 1, norm="l2")
    x_adv = pgd(make_model().eval(), torch.rand(2, 1, 32, 32), torch.tensor([0, 1]), eps=3.0, step_size=0.5, steps=1,
                norm="l2")  # fmt: skip
    assert x_adv.shape == (2, 1, 32, 32)


# ---------------------------------------------------------------------- the run folder: lock, --overwrite, config


def test_a_second_run_into_a_folder_in_use_is_a_one_line_error(tiny, unfinished, capsys):
    before = tree(unfinished)
    with locked_run_folder(unfinished):  # as the first run holds it while it trains
        argv = quick_flags(tiny, unfinished, *RUN_FLAGS, "--resume", "latest")
        line = exit_line(lambda: PGD_AT.main(argv), capsys)
        with pytest.raises(RunFolderInUse), locked_run_folder(unfinished):
            pass
    assert line == f"pgd_at.py: error: --output-dir: {unfinished} is in use: another run is training into it"
    assert tree(unfinished) == before
    PGD_AT.main(argv)  # released with the block


def test_a_killed_run_leaves_its_folder_unlocked(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from robustmix.runs.folder import locked_run_folder\n"
         f"with locked_run_folder({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderInUse), locked_run_folder(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with locked_run_folder(tmp_path):
        pass


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(tiny, unfinished, monkeypatch):
    before = tree(unfinished)
    crash_at(monkeypatch, 2)  # the replacement dies in training
    with pytest.raises(KeyboardInterrupt):
        PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--lr", "0.05", "--overwrite"))
    monkeypatch.undo()
    assert tree(unfinished) == before and not (unfinished / ".replaced").exists()

    PGD_AT.main(quick_flags(tiny, unfinished, *RUN_FLAGS, "--lr", "0.05", "--overwrite"))
    assert json.loads((unfinished / "config.json").read_text())["flags"]["lr"] == 0.05
    assert (unfinished / "metrics.json").is_file() and not (unfinished / ".replaced").exists()


def kill_inside_replacement(folder: Path, names: tuple[str, ...], new_config: str) -> None:
    """Start replacing the run in ``folder`` in a process that writes ``new_config`` and dies (``os._exit``)."""
    code = (
        "import os; from pathlib import Path; from robustmix.runs.folder import replacing_run\n"
        f"with replacing_run({str(folder)!r}, {names!r}, replace=True):\n"
        f"    Path({str(folder / 'config.json')!r}).write_text({new_config!r}); os._exit(9)"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert killed.returncode == 9


def test_a_replacement_killed_half_way_is_discarded_by_the_next_overwrite(tmp_path):
    names = ("config.json", "model.safetensors", "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("old")
    kill_inside_replacement(tmp_path, names, "new, unfinished")
    assert (tmp_path / ".replaced" / "config.json").read_text() == "old"

    with replacing_run(tmp_path, names, replace=True):  # --overwrite again: the unfinished one goes
        assert not (tmp_path / "config.json").exists()
        assert (tmp_path / ".replaced" / "config.json").read_text() == "old"
        (tmp_path / "config.json").write_text("newer")
    assert (tmp_path / "config.json").read_text() == "newer" and not (tmp_path / ".replaced").exists()


def test_a_replacement_killed_half_way_removes_the_old_run_once_resumed_to_the_end(tmp_path):
    (tmp_path / "config.json").write_text("old")
    kill_inside_replacement(tmp_path, ("config.json",), "new")
    with pytest.raises(KeyboardInterrupt), replacing_run(tmp_path, ["config.json"], replace=False):
        raise KeyboardInterrupt  # the resumed run dies too: nothing is touched
    assert (tmp_path / ".replaced" / "config.json").read_text() == "old"
    with replacing_run(tmp_path, ["config.json"], replace=False):
        pass
    assert (tmp_path / "config.json").read_text() == "new" and not (tmp_path / ".replaced").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, {"pretrained": True},
     {"img_size": {"nested": 1}}],
)  # fmt: skip
def test_a_config_cannot_pass_timm_anything_but_architecture_settings(unfinished, kwargs):
    config = json.loads((unfinished / "config.json").read_text())
    config["model"]["timm_kwargs"] = kwargs
    (unfinished / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: the model's timm_kwargs may hold only architecture settings"):
        load_model(unfinished)


def test_architecture_settings_in_timm_kwargs_load(unfinished):
    config = json.loads((unfinished / "config.json").read_text())
    config["model"]["timm_kwargs"] = {"drop_rate": 0.1, "img_size": [32, 32]}
    (unfinished / "config.json").write_text(json.dumps(config))
    assert load_config(unfinished)["model"]["timm_kwargs"] == {"drop_rate": 0.1, "img_size": [32, 32]}


# ---------------------------------------------------------------------- the test split, checked before training


def _local_dataset(folder: Path, test_mode: str, test_side: int) -> str:
    """A saved DatasetDict: 40 grayscale 32x32 training digits, 10 test digits in ``test_mode`` at ``test_side``."""
    images, labels = load_dataset("digits", "test").tensors()
    pil = [PIL.Image.fromarray(np.asarray(image[0] * 255, dtype=np.uint8), mode="L") for image in images[:50]]
    test = [image.convert(test_mode).resize((test_side, test_side)) for image in pil[40:]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": pil[:40], "label": labels[:40].tolist()}, features=features),
        "test": datasets.Dataset.from_dict({"image": test, "label": labels[40:50].tolist()}, features=features),
    }).save_to_disk(folder)  # fmt: skip
    return str(folder)


def test_a_test_split_that_cannot_be_evaluated_stops_the_run_before_training(tmp_path, capsys):
    # RGB test images beside grayscale training images make every split RGB (tests/test_data.py); another size stops.
    data = _local_dataset(tmp_path / "data", "L", 16)
    argv = ["--dataset", data, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--val-size", "10"]
    line = exit_line(lambda: PGD_AT.main(argv), capsys)
    assert re.search(r"--dataset, --data-path: the test split holds 10-class images of shape \[1, 16, 16\]", line)
    assert not (tmp_path / "run").exists()


def test_callback_state_that_does_not_load_is_a_one_line_error(tiny, tmp_path, capsys):
    """An SGLR checkpoint whose table is missing: the recipe says so in one line instead of a traceback."""
    sglr = load_recipe("sglr")
    flags = quick_flags(tiny, tmp_path / "run", *RUN_FLAGS, "--start-epoch", "0", "--max-steps", "2")
    sglr.main(flags)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    (checkpoint / "callbacks.json").write_text("{}")
    save_file({}, checkpoint / "callbacks.safetensors")
    _rehash(checkpoint)
    line = exit_line(lambda: sglr.main([*flags, "--resume", "latest"]), capsys)
    assert line.startswith("sglr.py: error: --resume: the callbacks' state in ") and "do not match" in line, line


def test_an_output_dir_that_cannot_be_created_is_a_one_line_error(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    argv = quick_flags(tiny, tmp_path / "file" / "run", *RUN_FLAGS)
    line = exit_line(lambda: PGD_AT.main(argv), capsys)
    assert line.startswith("pgd_at.py: error: --output-dir: ") and "file/run" in line, line


# ---------------------------------------------------------------------- local data: test splits, one-line errors


def _digit_images(n: int) -> tuple[list[PIL.Image.Image], list[int]]:
    images, labels = load_dataset("digits", "test").tensors()
    pil = [PIL.Image.fromarray(np.asarray(image[0] * 255, dtype=np.uint8), mode="L") for image in images[:n]]
    return pil, labels[:n].tolist()


def _parquet(path: Path, images: list, labels: list[int]) -> str:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)
    return str(path)


def _corrupt_parquet(folder: Path) -> list[str]:
    images, labels = _digit_images(60)
    path = Path(_parquet(folder / "good.parquet", images, labels))
    rows = datasets.Dataset.from_parquet(str(path)).cast_column("image", datasets.Image(decode=False)).to_list()
    rows[23]["image"]["bytes"] = rows[23]["image"]["bytes"][:60]  # a PNG cut short: its header still reads
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(folder / "bad.parquet")
    return ["--dataset", str(folder / "bad.parquet"), "--test-from-train", "10"]


def _test_split_of_training_images(folder: Path) -> list[str]:
    images, labels = _digit_images(40)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    train = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(train=train, test=train.select(range(20))).save_to_disk(folder / "copied")
    return ["--dataset", str(folder / "copied")]


def _empty_folder(folder: Path) -> list[str]:
    (folder / "empty").mkdir()
    return ["--dataset", str(folder / "empty")]


#: Hostile data and flags: each stops the recipe with a one-line error (exit 2) before any work.
BAD_DATA = {
    "seed beyond numpy": (
        lambda folder: ["--seed", "4294967296"],
        r"argument --seed: must be <= 2147483647 \(2\*\*31 - 1\), got 4294967296",
    ),
    "empty folder": (_empty_folder, r"--dataset, --data-path: local dataset folder '.*empty' holds no data files"),
    "corrupt PNG": (_corrupt_parquet, r"bad.parquet' \(train split\): the image in row 23 \(column 'image'\) cannot"),
    "three images": (
        lambda folder: ["--dataset", _parquet(folder / "three.parquet", *_digit_images(3)), "--test-from-train", "1"],
        r"3 examples of 3 classes are too few for a stratified hold-out \(test_size=1\)",
    ),
    "one class": (
        lambda folder: ["--dataset", _parquet(folder / "one.parquet", _digit_images(30)[0], [4] * 30)],
        r"holds a single class \(label 4\): a classifier needs at least two",
    ),
    "hub unreachable": (
        lambda folder: ["--dataset", "cifar10"],
        r"'cifar10' could not be fetched: could not load uoft-cs/cifar10 from the Hub .*--data-path FOLDER",
    ),
    "no test split": (
        lambda folder: ["--dataset", _parquet(folder / "all.parquet", *_digit_images(60))],
        r"has no test split .*--test-from-train N",
    ),
    "test split of training images": (
        _test_split_of_training_images,
        r"20 of the 20 test images of .* equal training or validation images",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # nothing cached
    make, pattern = BAD_DATA[case]
    argv = [*make(tmp_path), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    line = exit_line(lambda: PGD_AT.main(argv), capsys)
    assert line.startswith("pgd_at.py: error: ") and re.search(pattern, line), line
    assert not (tmp_path / "run").exists()


HELD_OUT_FLAGS = ["--val-size", "10", "--batch-size", "8", "--max-steps", "2", "--attack-steps", "1"]


@pytest.fixture(scope="module")
def held_out_test_run(tmp_path_factory) -> Path:
    """A finished 2-step run on a single parquet file of 60 digits, its test split held out with --test-from-train."""
    folder = tmp_path_factory.mktemp("held_out")
    data = _parquet(folder / "digits.parquet", *_digit_images(60))
    PGD_AT.main(["--dataset", data, *HELD_OUT_FLAGS, "--test-from-train", "10", "--output-dir", str(folder / "run")])
    return folder / "run"


def test_test_from_train_holds_out_the_test_split_and_evaluation_finds_it(held_out_test_run):
    config = json.loads((held_out_test_run / "config.json").read_text())
    assert config["data"]["test_size"] == 10 and config["data"]["sizes"] == {"train": 40, "validation": 10}
    assert json.loads((held_out_test_run / "metrics.json").read_text())["test"]["n"] == 10
    assert split_size(held_out_test_run) == 10  # recipes/evaluate.py rebuilds the same test split


def test_resuming_with_another_test_from_train_is_refused(held_out_test_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(held_out_test_run, run)
    dataset = recorded_flags(json.loads((run / "config.json").read_text()))["dataset"]
    argv = ["--dataset", dataset, *HELD_OUT_FLAGS, "--test-from-train", "12", "--output-dir", str(run)]
    line = exit_line(lambda: PGD_AT.main([*argv, "--resume", "latest"]), capsys)
    assert re.search(r"other flags: --test-from-train 10 there, 12 here\. A resumed run", line), line


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda config: config["model"].update(std=[math.nan]), r"describes a model that cannot be built: std must"),
        (lambda config: config["model"].update(num_classes=12), r"model.safetensors does not match the model"),
        (lambda config: config["data"].update(num_classes=12), r"inconsistent: its model has 10 classes, its data 12"),
    ],
)
def test_evaluating_a_damaged_config_is_a_one_line_error(held_out_test_run, tmp_path, capsys, change, pattern):
    run = tmp_path / "run"
    shutil.copytree(held_out_test_run, run)
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))
    line = exit_line(lambda: load_recipe("evaluate").main(["--run-dir", str(run), "--no-plots"]), capsys)
    assert line.startswith("evaluate.py: error: ") and re.search(pattern, line), line
