"""The evaluation attacks by name: each is data (``AttackSpec`` in ``ATTACKS``), a function and its settings.

``apgd-ce apgd-t fab-t square`` is AutoAttack's standard set, in its order and with its budgets (the differences in
detail are listed in docs/recipes.md); any other list is not AutoAttack, and results name the attacks they ran.
``with_budget`` changes a registered attack's settings, ``attack_settings`` lists every setting for a report and
``attack_cost`` gives its nominal cost.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from robustmix.attacks.apgd import apgd, apgd_targeted
from robustmix.attacks.fab import fab_targeted
from robustmix.attacks.objectives import get_objective
from robustmix.attacks.pgd import perturb
from robustmix.attacks.square import square_attack
from robustmix.core.modes import BNMode

#: ``fn(model, x, y, *, eps, seed, **kwargs) -> x_adv``.
AttackFn = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A named evaluation attack with its settings.

    Attributes:
        name: Registry key, e.g. ``"apgd-ce"``.
        label: Name in reports, e.g. ``"APGD-CE"``.
        fn: The attack, called as ``fn(model, x, y, eps=eps, seed=seed, **kwargs)``.
        kwargs: Its settings (steps, loss, queries, ...); eps and seed come per call.
        white_box: Whether it uses gradients; a black-box attack beating every white-box one
            flags gradient masking.
        min_classes: Fewest classes the attack is defined for (APGD-T's targeted DLR needs 4).
        traces_loss: ``fn`` accepts ``loss_trace``, a ``[steps]`` tensor it adds the summed loss
            of each iteration to (PGD-type attacks, see ``pgd_eval``).
    """

    name: str
    label: str
    fn: AttackFn
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    white_box: bool = True
    min_classes: int = 2
    traces_loss: bool = False

    def __post_init__(self) -> None:
        # A read-only view: a spec is shared through the registry and must not change under other users.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, seed: int = 0, **extra: Any) -> Tensor:
        return self.fn(model, x, y, eps=eps, seed=seed, **self.kwargs, **extra)


#: The attacks ``robustmix.evaluation.run.evaluate_run`` runs by default, in this order.
DEFAULT_ATTACKS = ("pgd20", "pgd100", "cw", "apgd-ce", "apgd-t", "fab-t", "square")
#: Every attack of the suite works in the L-inf ball.
NORM = "linf"
#: Arguments an attack receives per call, not settings.
_CALL_ARGUMENTS = ("model", "x", "y", "eps", "seed", "loss_trace")


def attack_cost(attack: str | AttackSpec) -> float:
    """An attack's nominal cost per example in forward-and-backward passes: iterations x target classes x
    restarts for the gradient attacks, a third of a pass per query for the forward-only Square. For progress
    and planning, not a measurement."""
    spec = get_attack(attack) if isinstance(attack, str) else attack
    settings = spec.kwargs
    passes = settings.get("steps", 0) * settings.get("n_target_classes", 1) * settings.get("restarts", 1)
    return float(passes + settings.get("queries", 0) / 3)


def get_attack(name: str) -> AttackSpec:
    """The registered evaluation attack called ``name``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown evaluation attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name]


def with_budget(attack: str | AttackSpec, **settings: Any) -> AttackSpec:
    """An evaluation attack with some settings changed, e.g. ``with_budget("square", queries=500)``.

    The name and label stay (reports print the settings next to them), so ``sanity_flags`` still knows
    the attack.

    Raises:
        ValueError: The attack is unknown, or its function takes no setting of one of the given names.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    unknown = sorted(set(settings) - set(attack_settings(spec)["settings"]))
    if unknown:
        raise ValueError(f"{spec.label} has no setting {unknown}; it has {sorted(attack_settings(spec)['settings'])}")
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **settings})


def attack_settings(attack: str | AttackSpec) -> dict[str, Any]:
    """Everything that defines an evaluation attack, for a report.

    Returns:
        ``{"name", "label", "white_box", "settings"}``; ``settings`` holds every keyword of the attack
            function (steps, restarts, queries, target classes, step sizes, loss, BatchNorm mode ...) with the
            value the spec passes or, when it passes none, the function's default. eps and seed come per call and
            are not among them.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(spec.fn).parameters.items()
        if name not in _CALL_ARGUMENTS and parameter.default is not inspect.Parameter.empty
    }
    return {
        "name": spec.name,
        "label": spec.label,
        "white_box": spec.white_box,
        "settings": defaults | dict(spec.kwargs),
    }


def pgd_eval(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_fraction: float = 0.25,
    loss: str = "ce",
    seed: int = 0,
    bn_mode: BNMode = "eval",
    loss_trace: Tensor | None = None,
) -> Tensor:
    """PGD as the evaluation suite runs it: uniform start, step ``step_fraction * eps``, seeded.

    ``model``, ``x``, ``y``, ``eps``, ``steps``, ``loss`` and ``bn_mode`` are as in
    ``robustmix.attacks.pgd.perturb``.

    Args:
        step_fraction: Step size as a fraction of eps (1/4: 2/255 at 8/255).
        seed: Seed of the random start.
        loss_trace: A ``[steps]`` float tensor on ``x``'s device; iteration ``k`` adds the summed
            loss of the batch at ``x_k`` to entry ``k`` (no extra forward, no host sync).

    Returns:
        ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1].
    """
    observer = None
    if loss_trace is not None:
        objective = get_objective(loss)

        def observer(k: int, logits: Tensor, x_k: Tensor) -> None:
            loss_trace[k] += objective(logits, y).sum()

    generator = torch.Generator(device=x.device).manual_seed(seed)
    return perturb(
        model, x, y, eps=eps, step_size=step_fraction * eps, steps=steps, loss=loss, start="uniform",
        bn_mode=bn_mode, observer=observer, generator=generator,
    )  # fmt: skip


#: The evaluation attacks by name. Step sizes are fractions of eps; budgets follow the papers:
#: PGD-20 / PGD-100 with step eps/4 (2/255 at 8/255) and one random start; CW-inf as 30 PGD steps
#: on the margin loss (papers use 20-30); APGD-CE (one run), APGD-T and FAB-T (9 targets, one run
#: each) with 100 iterations, and Square with 5000 queries on the unrescaled p schedule, as in
#: AutoAttack's standard version: ``apgd-ce apgd-t fab-t square`` is its attack set, in its order.
ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("pgd20", "PGD-20", pgd_eval, {"steps": 20, "step_fraction": 0.25, "loss": "ce"}, traces_loss=True),
        AttackSpec(
            "pgd100", "PGD-100", pgd_eval, {"steps": 100, "step_fraction": 0.25, "loss": "ce"}, traces_loss=True
        ),
        AttackSpec("cw", "CW-inf", pgd_eval, {"steps": 30, "step_fraction": 0.25, "loss": "cw"}, traces_loss=True),
        AttackSpec("apgd-ce", "APGD-CE", apgd, {"steps": 100, "loss": "ce"}),
        AttackSpec("apgd-t", "APGD-T", apgd_targeted, {"steps": 100, "n_target_classes": 9}, min_classes=4),
        AttackSpec("fab-t", "FAB-T", fab_targeted, {"steps": 100, "n_target_classes": 9}),
        AttackSpec("square", "Square", square_attack, {"queries": 5000}, white_box=False),
    )
}


#: The eps sweep's attacks, cheaper than the main evaluation because they run at every eps: PGD-20 as it
#: is, APGD-CE with 20 steps and Square with 500 queries over its whole p schedule (rescaled).
SWEEP_ATTACKS: tuple[AttackSpec, ...] = (
    ATTACKS["pgd20"],
    with_budget("apgd-ce", steps=20),
    with_budget("square", queries=500, rescale_schedule=True),
)
