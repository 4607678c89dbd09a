"""Cost accounting: every method's forwards and backwards per step, three ways, and its host reads.

1. counted by the step: ``ctx.passes()`` after ``loss.backward()`` (a forward hook on the model);
2. counted independently, inside the model: an autograd function on its logits tallies every forward
   and every backward that flows through them;
3. stated in the method's docs page: the "Cost per step" table row, read from the page and evaluated
   at the test's ``K`` and ``K_aa``.

A docs page and the code disagreeing, or the step's counter missing a pass, fails the test. The host
reads of a step (values copied back to the host, a synchronization each on CUDA) are counted on any device:
none may happen per attack iteration; what counts as a host read is ``benchmarks/host_reads.py``, which
``benchmarks/throughput.py`` counts with too. Counts, not times: timings live in ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from robustmix import (
    AdaLabLabels,
    AdaLabWeights,
    AdversarialCE,
    AdversarialStep,
    AdversarysAdversary,
    Callback,
    FGSMAttack,
    MAILWeights,
    PGDAttack,
    ProbabilityMargin,
)
from robustmix.methods.awp import AWP
from robustmix.methods.gairat import ScheduledGAIRATWeights
from robustmix.methods.sglr import SGLRLabels
from robustmix.stages.losses import MARTLoss, TRADESLoss
from tests.conftest import load_benchmark
from tests.toys import TallyNet, batch_8x8

DOCS = Path(__file__).resolve().parents[1] / "docs"
K = 10  # the standard protocol's PGD-10
K_AA = 1  # ADA-Lab's default
BURN_IN = 1  # epochs of the base method for callbacks with a burn-in: epoch 0 is in it, epoch 1 after it
BATCH = 8
NUM_CLASSES = 3
HostReads = load_benchmark("host_reads").HostReads


def documented_cost(page: str, row: str, **symbols: int) -> tuple[int, int]:
    """Forwards and backwards of ``row`` in the "Cost per step" table of ``docs/<page>``, at ``symbols``.

    Cells are sums of integers and symbols, written ``$K + K_{aa} + 2$`` or ```K + 1```.
    """
    text = (DOCS / page).read_text()
    lines = [line for line in text.splitlines() if line.startswith(f"| {row} |")]
    if len(lines) != 1:
        raise AssertionError(f"docs/{page} has {len(lines)} table rows labelled {row!r}; expected one")
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return _evaluate(cells[1], symbols), _evaluate(cells[2], symbols)


def _evaluate(cell: str, symbols: dict[str, int]) -> int:
    terms = re.sub(r"[$`]", "", cell).replace("K_{aa}", "K_aa").split("+")
    total = 0
    for term in (t.strip() for t in terms):
        if term.isdigit():
            total += int(term)
        elif term in symbols:
            total += symbols[term]
        else:
            raise AssertionError(f"cannot evaluate {term!r} in the docs cell {cell!r}")
    return total


def _attack(**kwargs: Any) -> PGDAttack:
    return PGDAttack(eps=0.1, step_size=0.03, steps=K, **kwargs)


# (callbacks, docs page, row of its cost table, epoch)
CASES: dict[str, tuple[Callable[[], list[Callback]], str, str, int]] = {
    "pgd_at": (lambda: [_attack(), AdversarialCE()], "concepts.md", "PGD-AT, PGD-`K`", 0),
    "fgsm_rs": (lambda: [FGSMAttack(eps=0.1), AdversarialCE()], "concepts.md", "FGSM-RS", 0),
    "trades": (lambda: [_attack(loss="kl", start="normal"), TRADESLoss()], "methods/trades.md", "**TRADES**", 0),
    "mart": (lambda: [_attack(start="normal"), MARTLoss()], "methods/mart.md", "**MART**", 0),
    **{
        f"gairat_epoch{epoch}": (
            lambda: [_attack(track_kappa=True), ScheduledGAIRATWeights(K, burn_in_epochs=BURN_IN), AdversarialCE()],
            "methods/gairat.md", "GAIRAT (burn-in and after)", epoch,
        )
        for epoch in (0, 1)
    },
    # MAIL's page states its weights come from the training logits "at no extra pass": PGD-AT's cost.
    **{
        f"mail_epoch{epoch}": (
            lambda: [_attack(), ProbabilityMargin(), MAILWeights(burn_in_epochs=BURN_IN), AdversarialCE()],
            "concepts.md", "PGD-AT, PGD-`K`", epoch,
        )
        for epoch in (0, 1)
    },
    **{
        name: (
            lambda: [_attack(), SGLRLabels(BATCH, NUM_CLASSES, start_epoch=BURN_IN), AdversarialCE()],
            "methods/sglr.md", row, epoch,
        )
        for name, row, epoch in (
            ("sglr_before_start", "SGLR before `start_epoch`", 0), ("sglr_from_start", "SGLR from `start_epoch`", 1),
        )
    },
    **{
        name: (
            lambda: [
                _attack(), AdversarysAdversary(K_AA, burn_in_epochs=BURN_IN), ProbabilityMargin(),
                AdaLabLabels(burn_in_epochs=BURN_IN), AdaLabWeights(burn_in_epochs=BURN_IN), AdversarialCE(),
            ],
            "methods/adalab.md", row, epoch,
        )
        for name, row, epoch in (("adalab_burn_in", "ADA-Lab, burn-in", 0), ("adalab", "ADA-Lab, after burn-in", 1))
    },
    "at_awp": (lambda: [_attack(), AWP(0.01), AdversarialCE()], "methods/awp.md", "AT-AWP", 0),
    "trades_awp": (
        lambda: [_attack(loss="kl", start="normal"), AWP(0.005, loss="trades"), TRADESLoss()],
        "methods/awp.md", "TRADES-AWP", 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_passes_per_step_match_the_docs(name: str) -> None:
    callbacks, page, row, epoch = CASES[name]
    model = TallyNet().train()
    x, y = batch_8x8(BATCH)
    step = AdversarialStep(callbacks())
    loss, ctx = step(model, x, y, torch.arange(BATCH) if step.requires_index else None, epoch=epoch)
    loss.backward()

    stated = documented_cost(page, row, K=K, K_aa=K_AA)
    assert (model.forwards, model.backwards) == stated, f"the model ran a different number of passes than {page}"
    assert ctx.passes() == stated, f"the step's pass counter disagrees with the passes the model ran ({page})"


def test_mail_page_states_no_extra_pass() -> None:
    text = " ".join((DOCS / "methods" / "mail.md").read_text().split())
    assert "no extra pass" in text


@pytest.mark.parametrize("k_aa", [0, 2])
def test_adalab_cost_grows_by_one_forward_and_backward_per_descent_step(k_aa: int) -> None:
    model = TallyNet().train()
    callbacks = [
        _attack(), AdversarysAdversary(k_aa), ProbabilityMargin(), AdaLabLabels(), AdaLabWeights(), AdversarialCE(),
    ]  # fmt: skip
    loss, ctx = AdversarialStep(callbacks)(model, torch.rand(BATCH, 1, 8, 8), torch.arange(BATCH) % NUM_CLASSES)
    loss.backward()
    stated = documented_cost("methods/adalab.md", "ADA-Lab, after burn-in", K=K, K_aa=k_aa)
    assert ctx.passes() == (model.forwards, model.backwards) == stated


def test_documented_cost_reads_a_row_and_rejects_unknown_terms() -> None:
    assert documented_cost("methods/trades.md", "**TRADES**", K=4) == (7, 6)
    with pytest.raises(AssertionError, match="cannot evaluate 'K'"):
        documented_cost("methods/trades.md", "**TRADES**")
    with pytest.raises(AssertionError, match="0 table rows"):
        documented_cost("methods/trades.md", "no such method")


def _host_reads(callbacks: list[Callback], **step_kwargs: Any) -> int:
    model = TallyNet().train()
    step = AdversarialStep(callbacks, **step_kwargs)
    x, y = torch.rand(BATCH, 1, 8, 8), torch.arange(BATCH) % NUM_CLASSES
    with HostReads() as reads:
        loss, _ = step(model, x, y, torch.arange(BATCH) if step.requires_index else None, epoch=BURN_IN)
        loss.backward()
    return reads.count


@pytest.mark.parametrize(
    "build",
    [
        lambda k: [PGDAttack(eps=0.1, step_size=0.03, steps=k), AdversarialCE()],
        lambda k: [PGDAttack(eps=0.1, step_size=0.03, steps=k, loss="kl", start="normal"), TRADESLoss()],
        lambda k: [
            PGDAttack(eps=0.1, step_size=0.03, steps=k, track_kappa=True), ScheduledGAIRATWeights(k), AdversarialCE()
        ],
        lambda k: [
            PGDAttack(eps=0.1, step_size=0.03, steps=k), AdversarysAdversary(k), ProbabilityMargin(), AdaLabLabels(),
            AdaLabWeights(), AdversarialCE(),
        ],
    ],
    ids=["pgd_at", "trades", "gairat", "adalab"],
)  # fmt: skip
def test_no_host_read_per_attack_iteration(build: Callable[[int], list[Callback]]) -> None:
    assert _host_reads(build(2)) == _host_reads(build(4))


def test_input_validation_is_the_only_host_read_of_a_pgd_at_step() -> None:
    callbacks = [_attack(), AdversarialCE()]
    assert _host_reads(callbacks) == 1
    assert _host_reads(callbacks, check_inputs=False) == 0


def test_adalab_passes_the_uniform_budget_on_without_reading_it_back() -> None:
    """The adversary's adversary takes the attack's float budget: no host read to check a ``[B]`` eps."""

    def callbacks() -> list[Callback]:
        return [
            _attack(), AdversarysAdversary(K_AA), ProbabilityMargin(), AdaLabLabels(), AdaLabWeights(), AdversarialCE()
        ]  # fmt: skip

    assert _host_reads(callbacks()) == 1
    assert _host_reads(callbacks(), check_inputs=False) == 0


def test_sglr_reuses_the_index_range_of_the_input_check() -> None:
    """SGLR's table-size check costs no host read of its own when the step validated the batch."""

    def callbacks() -> list[Callback]:
        return [_attack(), SGLRLabels(BATCH, NUM_CLASSES, start_epoch=0), AdversarialCE()]

    assert _host_reads(callbacks()) == 1
    assert _host_reads(callbacks(), check_inputs=False) == 1  # its own range read
