"""Every recipe under 2 CPU processes: identical weights, optimizer and callback state on both ranks, and
test metrics that count every example once (uneven last batch included)."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from robustmix.data import load_dataset
from robustmix.runs.folder import load_model
from tests.conftest import launch_two_processes

#: Flags that switch each method's own machinery on within the few steps the test trains.
RECIPES = {
    "pgd_at": [],
    "fgsm_rs": [],
    "trades": [],
    "mart": [],
    "awp": ["--warmup-epochs", "0"],
    "gairat": ["--burn-in", "0"],
    "sglr": ["--start-epoch", "0"],
    "caat": ["--meta-size", "20", "--meta-every", "2"],
    "bilaw": ["--meta-size", "20", "--meta-every", "2"],
    "adalab": ["--burn-in", "0"],
    "mail": ["--burn-in", "0", "--base", "trades"],
}

DRIVER = """
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from robustmix.core.callbacks import Callback
from robustmix.runs.checkpoint import split_state
from robustmix.models import unwrap_model
from tests.conftest import load_recipe


class Capture(Callback):  # no stage: only sees the trainer
    def on_fit_start(self, trainer):
        self.trainer = trainer


def state_of(trainer, callbacks):
    tensors = {f"model/{k}": v for k, v in unwrap_model(trainer.model).state_dict().items()}
    moments = {str(k): v for k, v in trainer.optimizer.state_dict()["state"].items()}
    optimizer, optimizer_values = split_state(moments, "optimizer/")
    tensors |= optimizer
    values = {"optimizer": optimizer_values}
    for i, callback in enumerate(callbacks):
        callback_tensors, callback_values = split_state(callback.state_dict(), f"callback{i}/")
        tensors |= callback_tensors
        values[f"callback{i}"] = callback_values
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, values


dataset, out, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
for name, flags in spec.items():
    module, capture = load_recipe(name), Capture()
    build = module.build_callbacks
    built = []

    def build_callbacks(args, info, build=build, built=built, capture=capture):
        built.extend(build(args, info))
        return [*built, capture]

    module.build_callbacks = build_callbacks
    run_dir = out / name
    # Batch 7 per process: 14 examples per step; the 20 test and 10 validation examples end in uneven batches.
    steps = [] if name == "fgsm_rs" else ["--attack-steps", "2"]  # FGSM-RS takes exactly one
    metrics = module.main(["--dataset", dataset, "--batch-size", "7", "--epochs", "2", "--max-steps", "5", *steps,
                           "--eval-every", "1", "--output-dir", str(run_dir), *flags])
    tensors, values = state_of(capture.trainer, built)
    rank = capture.trainer.accelerator.process_index
    save_file(tensors, out / f"{name}-rank{rank}.safetensors")
    (out / f"{name}-rank{rank}.json").write_text(json.dumps({"values": values, "metrics": metrics}, default=str))
"""


@pytest.mark.distributed
def test_every_recipe_agrees_across_two_processes(tiny, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    launch_two_processes(script, tiny, str(tmp_path), json.dumps(RECIPES), timeout=900)

    images, labels = load_dataset(tiny, "test").tensors()
    for name in RECIPES:
        ranks = [load_file(tmp_path / f"{name}-rank{r}.safetensors") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys(), name
        differ = [key for key in ranks[0] if not torch.equal(ranks[0][key], ranks[1][key])]
        assert not differ, f"{name}: ranks hold different {differ[:5]}"
        records = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert records[0] == records[1], f"{name}: callback values or metrics differ between ranks"
        # The recipe's own state beyond the model is in the comparison (tables, meta nets, schedules).
        assert any(key.startswith("optimizer/") for key in ranks[0]), name

        test, val = records[0]["metrics"]["test"], records[0]["metrics"]["last_val"]
        assert test["n"] == 20 and val["val_n"] == 10, f"{name}: an example was dropped or counted twice"
        model = load_model(tmp_path / name)
        with torch.no_grad():
            correct = (model(images).argmax(dim=1) == labels).sum().item()
        assert test["clean_acc"] == pytest.approx(correct / 20), f"{name}: gathered clean accuracy is off"

    sglr = load_file(tmp_path / "sglr-rank0.safetensors")
    assert any(key.startswith("callback") and sglr[key].abs().sum() > 0 for key in sglr), "SGLR's table is empty"
