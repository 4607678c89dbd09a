"""robustmix's AutoAttack-standard suite against an independent implementation (torchattacks), on a trained model.

Optional: skipped unless torchattacks is installed (``pip install torchattacks``; it pins an old ``requests``,
so it is not one of robustmix's extras). torchattacks' own ``AutoAttack`` runs 10 iterations per attack; the
reference here is its APGD-CE, APGD-T, FAB-T and Square at AutoAttack standard's budgets (100 iterations,
9 target classes, 5,000 queries), so both sides run the same protocol.
"""

from __future__ import annotations

import pytest
import torch

from robustmix.data import load_dataset
from robustmix.evaluation.worstcase import worst_case
from robustmix.runs.folder import load_model
from tests.conftest import load_recipe

torchattacks = pytest.importorskip("torchattacks")

EPS = 0.1
#: The first N test images: about 140 robust ones to attack, so each side takes minutes, not an hour, on one core.
N = 200


@pytest.mark.slow
def test_suite_matches_the_reference_worst_case_within_one_point(tmp_path):
    run = tmp_path / "pgd_at"
    load_recipe("pgd_at").main(["--output-dir", str(run)])  # the digits preset: about 66% worst case
    model = load_model(run)
    x, y = (t[:N] for t in load_dataset("digits", "test").tensors())

    ours = worst_case(model, x, y, ["apgd-ce", "apgd-t", "fab-t", "square"], eps=EPS, standalone=False)

    torch.manual_seed(0)
    reference = torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, eps=EPS, steps=100, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(model, eps=EPS, steps=100, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(model, eps=EPS, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
            torchattacks.Square(model, eps=EPS, n_queries=5000, n_restarts=1, seed=0),
        ]
    )
    x_adv = reference(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        theirs = (model(x_adv).argmax(1) == y).float().mean().item()
    print(f"clean {ours['clean']:.4f}; worst case: robustmix {ours['worst_case']:.4f}, torchattacks {theirs:.4f}")
    assert 0.2 < theirs < ours["clean"]  # a model with something to attack
    assert abs(ours["worst_case"] - theirs) <= 0.01  # 1 point: 2 of the 200 images
