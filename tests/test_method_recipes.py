"""The method recipes built on the shared fit path: a few steps each, the passes they cost, their flags."""

import pytest

from robustmix.runs.folder import load_metrics_log
from tests.conftest import load_recipe, quick_flags


def _passes(out) -> set[tuple[float, float]]:
    return {(r["forwards_per_step"], r["backwards_per_step"]) for r in load_metrics_log(out) if "loss" in r}


@pytest.mark.parametrize(
    ("name", "flags", "passes"),
    [
        # K = 2: ADA-Lab after burn-in costs K + K_aa + 2 forwards and K + K_aa + 1 backwards.
        ("adalab", ["--burn-in", "0", "--aa-steps", "1"], {(5.0, 4.0)}),
        # During the burn-in ADA-Lab costs what PGD-AT costs.
        ("adalab", ["--burn-in", "1", "--max-steps", "3"], {(3.0, 3.0)}),
        ("adalab", ["--burn-in", "0", "--margin", "kappa", "--weighting", "none", "--lam-max", "0.3"], {(5.0, 4.0)}),
        ("gairat", ["--burn-in", "0"], {(3.0, 3.0)}),
        ("gairat", ["--burn-in", "0", "--weight-kind", "discrete"], {(3.0, 3.0)}),
        # MAIL costs what its base method costs (K = 2): AT K + 1 / K + 1, TRADES K + 3 / K + 2, MART K + 2 / K + 2.
        ("mail", ["--burn-in", "0"], {(3.0, 3.0)}),
        ("mail", ["--burn-in", "0", "--base", "trades"], {(5.0, 4.0)}),
        ("mail", ["--burn-in", "0", "--base", "mart", "--beta", "3"], {(4.0, 4.0)}),
        # SGLR after its start epoch reads the clean training forward too.
        ("sglr", ["--start-epoch", "0"], {(4.0, 3.0)}),
        ("sglr", ["--start-epoch", "1", "--max-steps", "3"], {(3.0, 3.0)}),
        # The logged row averages 4 steps; step 0 is a meta step. CAAT (K = K_a = 2): plain K + K_a + 4 / K + K_a + 3,
        # meta 2(K + K_a) + 11 / 2(K + K_a) + 9 (the meta batch's own perturbations), or K + K_a + 8 / K + K_a + 7
        # with --meta-objective clean. BiLAW: plain K + 1 each, meta 2K + 3 each.
        ("caat", ["--meta-size", "20", "--meta-every", "100"], {((19 + 3 * 8) / 4, (17 + 3 * 7) / 4)}),
        (
            "caat",
            ["--meta-size", "20", "--meta-every", "100", "--meta-objective", "clean"],
            {((12 + 3 * 8) / 4, (11 + 3 * 7) / 4)},
        ),
        ("bilaw", ["--meta-size", "20", "--meta-every", "100"], {((7 + 3 * 3) / 4, (7 + 3 * 3) / 4)}),
    ],
)
def test_method_recipe_runs_and_costs_what_its_docs_say(tiny, tmp_path, name, flags, passes):
    out = tmp_path / "run"
    argv = quick_flags(tiny, out, "--attack-steps", "2", "--max-steps", "4", "--eval-every", "2", *flags)
    metrics = load_recipe(name).main(argv)
    assert metrics["test"]["n"] == 20 and 0 <= metrics["test"]["pgd_acc"] <= metrics["test"]["clean_acc"] + 1e-9
    assert _passes(out) == passes


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("adalab", ["--lam-max", "1.5"], "--lam-max must be in [0, 1]"),
        ("adalab", ["--burn-in", "5", "--epochs", "5"], "leaves no ADA-Lab epoch"),
        ("adalab", ["--temperature", "0"], "--temperature"),
        ("adalab", ["--margin", "distance"], "--margin"),
        ("gairat", ["--attack-steps", "0"], "needs --attack-steps >= 1"),
        ("sglr", ["--r", "2"], "--r must be in [0, 1]"),
        ("mail", ["--beta", "6"], "--beta applies to --base trades or mart"),
        ("mail", ["--burn-in", "3", "--epochs", "3"], "--burn-in: epoch 3 leaves no epoch of the method"),
        ("mail", ["--base", "awp"], "--base"),
    ],
)
def test_method_flags_are_checked_before_training(tmp_path, capsys, name, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(name).main([*argv, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
