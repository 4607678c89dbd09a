"""Crash and resume: real recipe processes killed with SIGKILL at random points, restarted with ``--resume latest``.

Every case runs a recipe on the ``tiny`` dataset (CPU, one thread, a checkpoint after every step), kills it
repeatedly (seeded delays; one kill of each case lands inside a checkpoint write: the test-only environment
variable ``ROBUSTMIX_TEST_CHECKPOINT_PAUSE`` holds the writer while its temporary folder is half written,
and the test kills it when that folder appears), checks after every kill that every checkpoint on disk reads
back and that ``latest`` names one, and restarts until the run finishes. The result must equal an
uninterrupted run bit for bit: final and best weights, ``metrics.json`` (test clean/PGD accuracy),
``metrics.jsonl`` (without wall-clock times) and the whole last checkpoint (optimizer, lr schedule, RNG
states, callback state: SGLR's table, CAAT's and BiLAW's meta nets and Adam states, the meta-batch counter).

Process start-ups dominate (importing torch, timm and datasets takes 10-20 s on a busy 2-core machine), so
the runs are forked from one *zygote* process that has imported robustmix once: each run is a fresh fork that
executes ``recipes/<name>.py`` as ``__main__`` (what ``python recipes/<name>.py`` does after its imports),
and is killed with SIGKILL like any process. The slow cases also finish in a fresh ``python`` interpreter.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import robustmix.runs.checkpoint as checkpoint
from robustmix.runs.checkpoint import (
    LATEST,
    TEST_PAUSE_ENV,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
)
from robustmix.runs.folder import BEST_DIR, METRICS_FILE, MODEL_FILE, load_metrics_log
from robustmix.training.metrics import WALL_CLOCK_KEYS
from tests.conftest import quick_flags

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds any one wait may take before the test fails instead of hanging

ZYGOTE = r"""
import json, os, runpy, sys, traceback
import robustmix.cli.recipe  # noqa: F401  (the imports every run shares, paid once)

for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "run":
        pid = os.fork()
        if pid == 0:  # the child: becomes `python <script> <argv>`
            code = 1
            try:
                log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ.update(command["env"])
                sys.argv = [command["script"], *command["argv"]]
                runpy.run_path(command["script"], run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply = {"pid": pid}
    elif command["op"] == "poll":
        pid, status = os.waitpid(command["pid"], 0 if command["block"] else os.WNOHANG)
        reply = {"exit": os.waitstatus_to_exitcode(status) if pid else None}
    print(json.dumps(reply), flush=True)
"""


class Zygote:
    """A process that has imported robustmix and forks recipe runs on request."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=REPO, text=True,
        )  # fmt: skip

    def _ask(self, **command: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the zygote died (exit {self.process.poll()})"
        return json.loads(line)

    def start(self, recipe: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        script = str(REPO / "recipes" / f"{recipe}.py")
        return self._ask(op="run", script=script, argv=argv, log=str(log), env=env or {})["pid"]

    def poll(self, pid: int, block: bool = False) -> int | None:
        """The run's exit code (negative: killed by that signal), or ``None`` while it runs."""
        return self._ask(op="poll", pid=pid, block=block)["exit"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


# ---------------------------------------------------------------------- checks on disk


def latest_step(checkpoints: Path) -> int:
    try:
        return int((checkpoints / LATEST).read_text().removeprefix("step_"))
    except (FileNotFoundError, ValueError):  # none yet (or being replaced: os.replace makes that instant)
        return 0


def assert_every_checkpoint_reads(checkpoints: Path) -> None:
    """No folder named like a checkpoint is incomplete or unreadable, and ``latest`` names a complete one."""
    if not checkpoints.is_dir():
        return
    named = sorted(
        (p for p in checkpoints.iterdir() if re.fullmatch(r"step_\d+", p.name)), key=checkpoint.checkpoint_step
    )
    assert named == list_checkpoints(checkpoints), f"incomplete checkpoint folders: {named}"
    for folder in named:
        saved = read_checkpoint(folder)  # raises, naming the file, if anything does not load
        assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
        assert saved["trainer_state"]["global_step"] == int(folder.name.removeprefix("step_"))
    if (checkpoints / LATEST).exists():
        assert resolve_checkpoint("latest", checkpoints) in named


def equal(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoint contents (tensors, arrays, dicts, lists, tuples, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]


def assert_same_run(reference: Path, resumed: Path) -> None:
    for weights in (MODEL_FILE, f"{BEST_DIR}/{MODEL_FILE}"):
        expected, actual = load_file(reference / weights), load_file(resumed / weights)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert json.loads((resumed / METRICS_FILE).read_text()) == json.loads((reference / METRICS_FILE).read_text())
    assert without_time(load_metrics_log(resumed)) == without_time(load_metrics_log(reference))
    last = [read_checkpoint(resolve_checkpoint("latest", run / "checkpoints")) for run in (reference, resumed)]
    for saved in last:
        saved["trainer_state"].pop("elapsed_s")
    assert equal(last[0], last[1])  # weights, optimizer, schedule, RNG states, callback state, counters


# ---------------------------------------------------------------------- the crash loop


def run_with_kills(
    zygote: Zygote, recipe: str, flags: list[str], out: Path, total_steps: int, kills: int, seed: int,
    fresh_finish: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run ``recipe`` into ``out``, SIGKILLing it ``kills`` times; restart until it finishes. Returns counts."""
    rng = random.Random(seed)
    # Where to kill: steps spread over the run (the last one may be the end: killed in the final evaluation),
    # each either inside the checkpoint write of that step or at a random moment after it.
    targets = sorted(rng.sample(range(1, total_steps + 1), kills))
    modes = ["write"] + [rng.choice(["write", "anywhere"]) for _ in range(kills - 1)]
    rng.shuffle(modes)
    checkpoints, log = out / "checkpoints", out.parent / f"{out.name}.log"
    counts: dict[str, Any] = {"kills": 0, "aimed_at_writes": 0, "in_write": 0, "restarts": 0, "latest_at_kills": []}
    for target, mode in zip(targets, modes):
        resume = ["--resume", "latest"] if (checkpoints / LATEST).exists() else []
        target = max(target, latest_step(checkpoints) + 1) if mode == "write" else target
        # The writer of step_<target> sleeps 1.5 s with its temporary folder half written: time enough for
        # this test, polling on a busy machine, to kill it there.
        env = {TEST_PAUSE_ENV: f"1.5@{target}"} if mode == "write" else {}
        pid = zygote.start(recipe, [*flags, *resume], log, env)
        counts["restarts"] += bool(resume)
        deadline = time.monotonic() + TIMEOUT
        if mode == "write":
            while not (checkpoints / f".tmp-step_{target}").exists() and zygote.poll(pid) is None:
                assert time.monotonic() < deadline, "no checkpoint write seen"
                time.sleep(0.005)
        else:  # kill at a random moment after the checkpoint of the target step
            while latest_step(checkpoints) < target and zygote.poll(pid) is None:
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
        os.kill(pid, signal.SIGKILL)  # a no-op on a run that has just finished (a zombie until polled)
        code = zygote.poll(pid, block=True)
        if code == 0:  # it finished first
            return counts
        assert code == -signal.SIGKILL, f"run failed (exit {code}):\n{log.read_text()[-3000:]}"
        counts["kills"] += 1
        counts["aimed_at_writes"] += mode == "write"
        counts["latest_at_kills"].append(latest_step(checkpoints))
        counts["in_write"] += any(checkpoints.glob(".tmp-*"))  # a writer (or a deletion) died half way
        assert_every_checkpoint_reads(checkpoints)

    resume = ["--resume", "latest"] if (checkpoints / LATEST).exists() else []
    counts["restarts"] += bool(resume)
    if fresh_finish:  # the last leg in a fresh interpreter: `python recipes/<recipe>.py ... --resume latest`
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        command = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *flags, *resume]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        pid = zygote.start(recipe, [*flags, *resume], log)
        code = zygote.poll(pid, block=True)
        assert code == 0, f"run failed (exit {code}):\n{log.read_text()[-3000:]}"
    assert_every_checkpoint_reads(checkpoints)
    return counts


# (recipe, its flags, kills, seed). The state each case exercises is in the comment.
CASES = [
    # PGD-AT with augmentation, stopped by --max-steps in the middle of epoch 1 (a final validation row
    # follows the last checkpoint).
    pytest.param("pgd_at", ["--augment", "--max-steps", "10"], 3, 1, id="pgd_at"),
    # SGLR's soft-label table: rows written in epoch 0 are read in epoch 1.
    pytest.param("sglr", ["--start-epoch", "0"], 3, 2, id="sglr"),
    # ADA-Lab's burn-in schedule (plain PGD-AT in epoch 0).
    pytest.param("adalab", ["--burn-in", "1"], 3, 3, id="adalab", marks=pytest.mark.slow),
    # CAAT: meta net, its Adam state, the meta-batch counter, class-wise losses.
    pytest.param("caat", ["--meta-size", "20", "--meta-every", "2"], 3, 4, id="caat", marks=pytest.mark.slow),
    # BiLAW: weight net and its Adam state, lookahead every 2 steps.
    pytest.param("bilaw", ["--meta-size", "20", "--meta-every", "2"], 3, 5, id="bilaw", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("recipe", "extra", "kills", "seed"), CASES)
def test_killed_runs_resume_to_the_uninterrupted_result(zygote, tiny, tmp_path, recipe, extra, kills, seed, request):
    flags = ["--attack-steps", "1", "--checkpoint-every-steps", "1", "--threads", "1", *extra]
    reference = tmp_path / "reference"
    pid = zygote.start(recipe, quick_flags(tiny, reference, *flags), tmp_path / "reference.log")
    assert zygote.poll(pid, block=True) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    crashed = tmp_path / "crashed"
    slow = request.node.get_closest_marker("slow") is not None
    total_steps = json.loads((reference / "config.json").read_text())["total_steps"]
    counts = run_with_kills(
        zygote, recipe, quick_flags(tiny, crashed, *flags), crashed, total_steps, kills, seed, fresh_finish=slow
    )
    print(f"{recipe}: {counts}")
    assert counts["kills"] >= 2 and counts["aimed_at_writes"] >= 1  # really interrupted, once or more in a write
    assert counts["in_write"] >= counts["aimed_at_writes"]  # a half-written folder was left by each of those
    assert_same_run(reference, crashed)


# ---------------------------------------------------------------------- the pieces, in process


def test_read_checkpoint_names_a_folder_without_manifest(tmp_path):
    folder = tmp_path / "step_1"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    with pytest.raises(checkpoint.CheckpointError, match=r"step_1 is not a complete .* no manifest\.json"):
        read_checkpoint(folder)


def test_a_deletion_cut_short_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint aside before deleting it: a crash half way leaves only a ``.tmp-`` folder."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    save = lambda step: checkpoint.save_checkpoint(  # noqa: E731
        accelerator, tmp_path, step, model=model, optimizer=optimizer, trainer_state={"global_step": step},
        callback_state={}, keep=1,
    )  # fmt: skip
    save(1)
    real_rmtree = checkpoint.shutil.rmtree

    def die_half_way(path, *args, **kwargs):
        if ".tmp-deleted-" in str(path) and Path(path).exists():
            next(Path(path).glob("*.safetensors")).unlink()  # a file or two went, then the process died
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert_every_checkpoint_reads(tmp_path)
    save(3)  # the next save clears what the dead deletion left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3"]


def test_rows_logged_after_the_last_checkpoint_are_not_repeated(tmp_path):
    """Killed after the final validation (logged after the last checkpoint), the resumed run logs it once."""
    from robustmix.data import load_dataset
    from tests.trainers import make_trainer, subset

    digits = subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)
    # max_steps 4 stops in epoch 1; the step checkpoint at 4 is written before _finish validates.
    make_trainer(digits, max_steps=4, checkpoint_every_steps=2, output_dir=tmp_path, eval_steps=1).fit()
    rows = load_metrics_log(tmp_path)
    assert rows[-1]["step"] == 4 and "val_pgd_acc" in rows[-1]  # the row after the checkpoint
    (tmp_path / MODEL_FILE).unlink()  # as if killed before the final weights were written
    make_trainer(digits, max_steps=4, checkpoint_every_steps=2, output_dir=tmp_path, eval_steps=1).fit(resume="latest")
    assert without_time(load_metrics_log(tmp_path)) == without_time(rows)
