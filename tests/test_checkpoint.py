"""Checkpoints survive a writer that dies at any point, and run folders load back into the same model."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import robustmix.runs.checkpoint as checkpoint
from robustmix.models import create_model, model_config
from robustmix.runs.checkpoint import (
    LATEST,
    atomic_save_weights,
    atomic_write_json,
    atomic_write_text,
    drop_checkpoints_after,
    join_state,
    list_checkpoints,
    open_checkpoint,
    resolve_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    split_state,
)
from robustmix.runs.folder import BEST_DIR, CONFIG_FILE, MODEL_FILE, load_metrics_log, load_model


@pytest.fixture
def prepared():
    """A prepared tiny model and optimizer: what a checkpoint holds, at a fraction of a real model's cost."""
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()


def _save(prepared, directory, step, **kwargs):
    accelerator, model, optimizer = prepared
    state = {"global_step": step}
    return save_checkpoint(
        accelerator, directory, step, model=model, optimizer=optimizer, trainer_state=state, callback_state={},
        **kwargs,
    )  # fmt: skip


def _load(prepared, path):
    """Restore ``path`` into the prepared model and optimizer; returns (trainer state, callback state)."""
    accelerator, model, optimizer = prepared
    _, contents = open_checkpoint(path, path.parent)
    restore_checkpoint(accelerator, contents, model=model, optimizer=optimizer)
    return contents["trainer_state"], contents["callback_state"]


def test_callback_state_round_trip():
    state = {
        "0.Table": {"table": torch.arange(6.0).view(2, 3), "momentum": 0.9, "history": [1, 2]},
        "2.Net": {"net": {"weight": torch.ones(2, dtype=torch.bfloat16), "bias": torch.zeros(2)}, "steps": 3},
        "3.Empty": {"nested": {}},
    }
    tensors, values = split_state(state)
    assert set(tensors) == {"0.Table/table", "2.Net/net/weight", "2.Net/net/bias"}
    restored = join_state(tensors, json.loads(json.dumps(values)))
    assert restored.keys() == state.keys()
    assert torch.equal(restored["0.Table"]["table"], state["0.Table"]["table"])
    assert restored["2.Net"]["net"]["weight"].dtype == torch.bfloat16
    assert restored["0.Table"]["momentum"] == 0.9 and restored["0.Table"]["history"] == [1, 2]
    assert restored["3.Empty"] == {"nested": {}}


@pytest.mark.parametrize(
    ("state", "message"),
    [({"a": {1: torch.ones(1)}}, "keys must be strings"), ({"a": {"b": object()}}, "'a/b' is a object")],
)
def test_callback_state_rejects_what_cannot_be_saved(state, message):
    with pytest.raises(ValueError, match=message):
        split_state(state)


def test_atomic_write_keeps_old_content_when_the_writer_dies(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    atomic_write_json(path, {"version": 1})

    def die(*args):
        raise OSError("killed")

    monkeypatch.setattr(checkpoint.os, "replace", die)
    with pytest.raises(OSError, match="killed"):
        atomic_write_text(path, "half")
    assert json.loads(path.read_text()) == {"version": 1}


def test_save_load_round_trip_restores_model_optimizer_and_rng(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    _train_step(model, optimizer)
    callbacks = {"0.Table": {"table": torch.tensor([1.0, 2.0]), "start": 4}}
    path = save_checkpoint(
        accelerator, tmp_path, 7, model=model, optimizer=optimizer, trainer_state={"global_step": 7},
        callback_state=callbacks, keep=None,
    )  # fmt: skip
    assert path == tmp_path / "step_7" and (tmp_path / LATEST).read_text() == "step_7"
    assert (path / "model.safetensors").is_file()  # weights as safetensors
    expected_weights = [p.detach().clone() for p in model.parameters()]
    expected_draw = torch.rand(3)

    _train_step(model, optimizer)  # move everything away from the saved state
    trainer_state, callback_state = _load(prepared, resolve_checkpoint("latest", tmp_path))
    assert trainer_state == {"global_step": 7}
    assert torch.equal(callback_state["0.Table"]["table"], callbacks["0.Table"]["table"])
    assert callback_state["0.Table"]["start"] == 4
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected_weights))
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


@pytest.mark.parametrize("crash_in", ["optimizer_state", "callback_state", "latest_pointer"])
def test_a_writer_dying_mid_checkpoint_leaves_latest_complete(prepared, tmp_path, monkeypatch, crash_in):
    _, model, optimizer = prepared
    _save(prepared, tmp_path, 1)
    weights_at_1 = [p.detach().clone() for p in model.parameters()]
    _train_step(model, optimizer)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("writer killed")

    if crash_in == "optimizer_state":
        real = checkpoint.save_state

        def partial_save(state, folder, name):  # the model file is written, then the process dies
            if name != "optimizer":
                return real(state, folder, name)
            (checkpoint.Path(folder) / "optimizer.safetensors").write_bytes(b"\x00truncated")
            die()

        monkeypatch.setattr(checkpoint, "save_state", partial_save)
    elif crash_in == "callback_state":
        monkeypatch.setattr(checkpoint, "save_file", die)
    else:
        monkeypatch.setattr(checkpoint, "atomic_write_text", die)
    with pytest.raises(KeyboardInterrupt):
        _save(prepared, tmp_path, 2)
    monkeypatch.undo()

    latest = resolve_checkpoint("latest", tmp_path)
    # Dying before the rename leaves step_2 absent; dying after it leaves a complete step_2 that latest
    # does not name yet. Either way, latest names a complete checkpoint and loads.
    assert latest == tmp_path / "step_1"
    complete = ["step_1", "step_2"] if crash_in == "latest_pointer" else ["step_1"]
    assert [p.name for p in list_checkpoints(tmp_path)] == complete
    _load(prepared, latest)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights_at_1))

    if crash_in != "latest_pointer":  # the next save clears the half-written folder and succeeds
        assert (tmp_path / ".tmp-step_2").is_dir()
        _save(prepared, tmp_path, 2)
        assert not (tmp_path / ".tmp-step_2").exists()
        assert resolve_checkpoint("latest", tmp_path) == tmp_path / "step_2"


def test_keep_prunes_the_oldest_checkpoints(prepared, tmp_path):
    for step in (1, 2, 3):
        _save(prepared, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_3"]


def test_save_refuses_to_overwrite_a_checkpoint(prepared, tmp_path):
    _save(prepared, tmp_path, 1)
    with pytest.raises(FileExistsError, match="step_1 exists already"):
        _save(prepared, tmp_path, 1)


def test_resolve_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint was completed"):
        resolve_checkpoint("latest", tmp_path)
    (tmp_path / "step_3").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete robustmix checkpoint"):
        resolve_checkpoint(tmp_path / "step_3", tmp_path)


def test_resuming_an_older_checkpoint_drops_the_later_ones(prepared, tmp_path):
    for step in (1, 2, 3):
        _save(prepared, tmp_path, step)
    drop_checkpoints_after(tmp_path, tmp_path / "step_1")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "step_1"


# ---------------------------------------------------------------------- run folders


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, in_chans=1, mean=(0.3,), std=(0.3,))
    model.eval()  # BatchNorm running statistics are part of the saved state
    folder = tmp_path / "run"
    (folder / BEST_DIR).mkdir(parents=True)
    atomic_write_json(folder / CONFIG_FILE, {"model": model_config(model), "seed": 0})
    atomic_save_weights(model.state_dict(), folder / MODEL_FILE)
    atomic_save_weights(model.state_dict(), folder / BEST_DIR / MODEL_FILE)
    return folder, model


@pytest.mark.parametrize("weights", ["final", "best"])
def test_load_model_reproduces_the_logits(run_dir, weights):
    folder, model = run_dir
    x = torch.rand(4, 1, 32, 32)
    loaded = load_model(folder, weights=weights)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_names_the_problem(run_dir, tmp_path):
    folder, _ = run_dir
    with pytest.raises(FileNotFoundError, match=r"run folder .* does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="weights must be one of 'final', 'best', 'ema'"):
        load_model(folder, weights="last")

    (folder / MODEL_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted"):
        load_model(folder)
    (folder / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no final weights"):
        load_model(folder)

    (folder / CONFIG_FILE).write_text('{"model": {"name": "test_res')
    with pytest.raises(ValueError, match=r"config\.json is corrupted"):
        load_model(folder, weights="best")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        load_model(folder, weights="best")


def test_load_model_rejects_weights_of_another_model(run_dir):
    folder, _ = run_dir
    other = create_model("test_resnet", 5, in_chans=1, mean=(0.3,), std=(0.3,))
    atomic_save_weights(other.state_dict(), folder / MODEL_FILE)
    with pytest.raises(ValueError, match="does not match the model described in"):
        load_model(folder)


def test_metrics_log_names_a_corrupted_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_metrics_log(tmp_path)
