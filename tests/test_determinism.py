"""A seeded run on the CPU is bitwise reproducible, for every recipe: the same seed gives the same weights file,
callback state and test metrics; another seed gives other weights."""

import json

import pytest
from safetensors.torch import load_file

from robustmix.runs.folder import MODEL_FILE
from robustmix.training.metrics import WALL_CLOCK_KEYS
from tests.conftest import load_recipe, quick_flags

#: Flags that switch each method's own machinery (and its randomness) on within a few steps.
RECIPES = {
    "pgd_at": ["--augment"],  # the augmentation stream too
    "fgsm_rs": [],
    "trades": [],
    "mart": [],
    "awp": ["--warmup-epochs", "0"],
    "gairat": ["--burn-in", "0"],
    "sglr": ["--start-epoch", "0"],
    "caat": ["--meta-size", "20", "--meta-every", "2"],
    "bilaw": ["--meta-size", "20", "--meta-every", "2"],
    "adalab": ["--burn-in", "0"],
    "mail": ["--burn-in", "0"],
}


def _train(name: str, tiny: str, out, seed: int) -> tuple[bytes, dict]:
    steps = [] if name == "fgsm_rs" else ["--attack-steps", "1"]
    argv = quick_flags(tiny, out, "--max-steps", "3", "--seed", str(seed), *steps, *RECIPES[name])
    metrics = load_recipe(name).main(argv)
    return (out / MODEL_FILE).read_bytes(), metrics


def _metrics_rows(out) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]


#: In the default suite: one of each kind of randomness (augmentation, attack starts, per-example table, meta batches
#: and meta nets, the adversary's adversary, AWP). The others share those parts and run with ``-m slow``.
DEFAULT = {"pgd_at", "awp", "sglr", "caat", "adalab"}


@pytest.mark.parametrize(
    "name", [name if name in DEFAULT else pytest.param(name, marks=pytest.mark.slow) for name in sorted(RECIPES)]
)
def test_a_seeded_cpu_run_is_bitwise_reproducible(tiny, tmp_path, name):
    first, first_metrics = _train(name, tiny, tmp_path / "a", seed=3)
    second, second_metrics = _train(name, tiny, tmp_path / "b", seed=3)
    assert first == second, f"{name}: the same seed gave different weights"
    assert first_metrics == second_metrics
    assert _metrics_rows(tmp_path / "a") == _metrics_rows(tmp_path / "b")
    states = [sorted((tmp_path / run / "checkpoints").iterdir())[-1] for run in ("a", "b")]
    for file in sorted(p.name for p in states[0].iterdir() if p.suffix == ".safetensors"):
        left, right = (load_file(state / file) for state in states)
        assert left.keys() == right.keys() and all((left[k] == right[k]).all() for k in left), f"{name}: {file}"

    other, _ = _train(name, tiny, tmp_path / "c", seed=4)
    assert other != first, f"{name}: the seed does not reach the run"
