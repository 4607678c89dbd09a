"""Robust evaluation: named attacks, their per-example worst case, and sanity checks against gradient masking.

Each evaluation attack is data (:class:`AttackSpec` in :data:`ATTACKS`): a function and its settings.
:func:`worst_case` runs a list of them the way AutoAttack does (an example is attacked only while
it is still classified correctly) and decides every example with the fp32 model at the point the
attack found. :func:`sanity_flags` reads the numbers and says when they cannot be trusted: a
stronger attack doing worse than a weaker one, a black-box attack beating the white-box ones, no
collapse at a large eps, or a PGD loss that does not rise. A worst case over APGD-CE, APGD-T and
Square is *not* AutoAttack (whose standard set also runs FAB-T): results name the attacks they ran.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from robustmix.attacks.apgd import apgd, apgd_targeted
from robustmix.attacks.objectives import get_objective
from robustmix.attacks.pgd import perturb
from robustmix.attacks.square import square_attack
from robustmix.modes import BNMode, model_mode
from robustmix.validation import check_batch

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
            of each iteration to (PGD-type attacks, see :func:`pgd_eval`).
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


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on ``(x, y)`` against one attack at L-inf ``eps``.

    See :func:`worst_case` for the arguments; clean-misclassified examples count as not robust.
    """
    return worst_case(model, x, y, [attack], eps=eps, standalone=False, batch_size=batch_size, seed=seed)["worst_case"]


def worst_case(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str | AttackSpec],
    *,
    eps: float,
    standalone: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    record_loss: bool = False,
) -> dict[str, Any]:
    """Per-example worst case of several attacks at L-inf ``eps``, AutoAttack-style.

    Attacks run in the given order. An example counts as robust when it is classified correctly
    clean and at the point every attack found; clean-misclassified examples are never attacked.
    Every decision is made by the model in eval mode with autocast off (fp32), so an attack that
    ran under autocast is judged by the fp32 model. Works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.

    With ``standalone=False`` an attack only sees the examples every earlier attack failed on
    (cheapest; AutoAttack's protocol). With ``standalone=True`` every attack sees all
    clean-correct examples, which also gives each attack's own accuracy, at the cost of
    attacking examples an earlier attack already broke. The worst case means the same either way
    (its value can differ by the attacks' randomness, as their batches differ).

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, ...]`` and returning logits ``[B, C]``.
        x: Images ``[N, ...]``, pixels in [0, 1], on the model's device.
        y: Labels ``[N]`` (int64).
        attacks: Names in :data:`ATTACKS` or specs (e.g. a registry spec with a smaller budget via
            ``dataclasses.replace``).
        eps: L-inf radius in pixels (8/255 on CIFAR-10).
        standalone: Also run every attack on every clean-correct example (see above).
        batch_size: Examples per attack call.
        seed: Seed of the attacks' randomness; batch ``j`` uses ``seed + j``.
        record_loss: For PGD-type attacks, also return the mean attack loss per iteration, read
            from the logits the attack computes anyway.

    Returns:
        A dict with ``"attack"`` (the combination's name, e.g. "worst case over APGD-CE, APGD-T,
        Square"), ``"attacks"`` (names), ``"eps"``, ``"n"`` (examples), ``"clean"`` (clean
        accuracy), ``"cumulative"`` (per name: accuracy against that attack and every earlier
        one, as AutoAttack prints it), ``"standalone"`` (per name: accuracy against that attack
        alone; only with ``standalone=True``), ``"worst_case"`` (accuracy against all), ``"robust"``
        (bool ``[N]`` on the CPU: robust against all) and, with ``record_loss``, ``"loss_trace"``
        (per PGD-type name: the mean loss before each step, a list of ``steps`` floats).
        Accuracies are fractions in [0, 1].
    """
    specs = [get_attack(a) if isinstance(a, str) else a for a in attacks]
    _check_eval_args(specs, x, eps, batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under inference_mode cannot enter autograd.
        x, y = (t.detach().clone() if t.is_inference() else t.detach() for t in (x, y))
        num_classes = _num_classes(model, x)
        check_batch(x, y, num_classes)
        for spec in specs:
            if num_classes < spec.min_classes:
                raise ValueError(
                    f"{spec.label} needs at least {spec.min_classes} classes, the model has {num_classes}"
                )

        correct = torch.cat([_correct(model, xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
        robust = correct.clone()
        n = x.shape[0]
        results: dict[str, Any] = {
            "attack": "worst case over " + ", ".join(spec.label for spec in specs),
            "attacks": [spec.name for spec in specs],
            "eps": float(eps),
            "n": n,
            "clean": correct.float().mean().item(),
            "cumulative": {},
        }
        if standalone:
            results["standalone"] = {}
        if record_loss:
            results["loss_trace"] = {}
        for spec in specs:
            # One host sync per attack to pick its examples; none inside the attacks.
            todo = (correct if standalone else robust).nonzero().squeeze(1)
            trace = None
            if record_loss and spec.traces_loss:
                trace = torch.zeros(spec.kwargs["steps"], device=x.device)
            survived = _survives(spec, model, x[todo], y[todo], eps, batch_size, seed, trace)
            attack_robust = torch.zeros_like(correct)
            attack_robust[todo] = survived
            robust &= attack_robust
            if standalone:
                results["standalone"][spec.name] = attack_robust.float().mean().item()
            results["cumulative"][spec.name] = robust.float().mean().item()
            if trace is not None and todo.numel() > 0:
                results["loss_trace"][spec.name] = (trace / todo.numel()).tolist()
        results["worst_case"] = robust.float().mean().item()
        results["robust"] = robust.cpu()
    return results


def eps_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: Sequence[float],
    *,
    attack: str | AttackSpec = "pgd20",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[float, float]:
    """Robust accuracy against ``attack`` at each eps, ``{eps: accuracy}``; put it in a result's ``"eps_sweep"``.

    Include a large eps (e.g. 0.5 in L-inf, where any image can be turned mid-gray): a working
    attack drives accuracy to ~0 there, which :func:`sanity_flags` checks.
    """
    return {
        float(eps): robust_accuracy(model, x, y, attack, eps=eps, batch_size=batch_size, seed=seed)
        for eps in eps_values
    }


def sanity_flags(results: Mapping[str, Any], *, tolerance: float = 0.01, zero_accuracy: float = 0.05) -> list[str]:
    """Warnings about an evaluation that cannot be trusted; empty when every check passes.

    Checks what ``results`` holds (a :func:`worst_case` result, optionally with ``"eps_sweep"``
    from :func:`eps_sweep`):

    - ordering: clean >= PGD-20 >= PGD-100 >= worst case (standalone accuracies);
    - gradient masking: a black-box attack (Square) below every white-box attack;
    - eps sweep: accuracy at the largest eps above ``zero_accuracy``, or rising with eps;
    - loss trace: a PGD-type attack whose mean loss is not higher at the last step than at the first.

    Args:
        results: Accuracies as fractions in [0, 1].
        tolerance: Slack of the comparisons in accuracy units, for the noise of a finite test set
            and of attacks that do not keep their best iterate (PGD).
        zero_accuracy: Highest accuracy that counts as ~0 at the largest eps of a sweep.

    Returns:
        One sentence per failed check, naming the numbers.
    """
    flags: list[str] = []
    alone = results.get("standalone", {})

    chain = [("clean", results.get("clean")), ("PGD-20", alone.get("pgd20")), ("PGD-100", alone.get("pgd100"))]
    chain.append((results.get("attack", "worst case"), results.get("worst_case")))
    chain = [(label, acc) for label, acc in chain if acc is not None]
    for (weak, weak_acc), (strong, strong_acc) in itertools.pairwise(chain):
        if strong_acc > weak_acc + tolerance:
            flags.append(
                f"ordering: {strong} accuracy {strong_acc:.4f} is above {weak} accuracy {weak_acc:.4f}; "
                "the stronger evaluation must not do better (attack failure, randomness, or too few examples)"
            )

    white = {name: acc for name, acc in alone.items() if name in ATTACKS and ATTACKS[name].white_box}
    black = {name: acc for name, acc in alone.items() if name in ATTACKS and not ATTACKS[name].white_box}
    if white:
        best_white = min(white, key=white.get)
        for name, acc in black.items():
            if acc < white[best_white] - tolerance:
                flags.append(
                    f"gradient masking: {ATTACKS[name].label} (black box, no gradients) accuracy {acc:.4f} is below "
                    f"every white-box attack (strongest: {ATTACKS[best_white].label} {white[best_white]:.4f}); "
                    "gradient-based numbers on this model are not trustworthy"
                )

    sweep = sorted(results.get("eps_sweep", {}).items())
    if sweep and sweep[-1][1] > zero_accuracy:
        flags.append(
            f"eps sweep: accuracy {sweep[-1][1]:.4f} at the largest eps {sweep[-1][0]:.4g} does not fall to ~0; "
            "an attack with that much budget should break every image (gradient masking?)"
        )
    for (eps_lo, acc_lo), (eps_hi, acc_hi) in itertools.pairwise(sweep):
        if acc_hi > acc_lo + tolerance:
            flags.append(
                f"eps sweep: accuracy rises from {acc_lo:.4f} to {acc_hi:.4f} as eps grows from {eps_lo:.4g} to "
                f"{eps_hi:.4g}; a larger ball contains the smaller one (gradient masking?)"
            )

    for name, trace in results.get("loss_trace", {}).items():
        if len(trace) >= 2 and not trace[-1] > trace[0]:
            label = ATTACKS[name].label if name in ATTACKS else name
            flags.append(
                f"loss trace: the mean {label} loss does not increase over the attack ({trace[0]:.4g} at the first "
                f"step, {trace[-1]:.4g} at the last); its gradients are zero or useless (gradient masking?)"
            )
    return flags


def get_attack(name: str) -> AttackSpec:
    """The registered evaluation attack called ``name``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown evaluation attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name]


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
    :func:`robustmix.attacks.pgd.perturb`.

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
#: on the margin loss (papers use 20-30); APGD-CE and APGD-T (9 targets) with 100 iterations and
#: Square with 5000 queries, as in AutoAttack's standard version.
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
        AttackSpec("square", "Square", square_attack, {"queries": 5000}, white_box=False),
    )
}


def _survives(
    spec: AttackSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    batch_size: int,
    seed: int,
    trace: Tensor | None,
) -> Tensor:
    """Run ``spec`` in batches; bool ``[N]``: still classified correctly (fp32) at the point it found."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    survived = []
    for j, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size))):
        extra = {} if trace is None else {"loss_trace": trace}
        x_adv = spec(model, xb, yb, eps=eps, seed=seed + j, **extra)
        _check_in_ball(x_adv, xb, eps, spec.label)
        survived.append(_correct(model, x_adv, yb))
    return torch.cat(survived)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Bool ``[B]``: the eval-mode model, autocast off, predicts ``y``."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), model_mode(model, "eval"):
        return model(x).argmax(dim=1) == y


def _check_in_ball(x_adv: Tensor, x: Tensor, eps: float, label: str) -> None:
    """An attack leaving the ball or [0, 1] would report robustness it did not measure: fail loudly."""
    slack = 2 * torch.finfo(x.dtype).eps
    distance, lo, hi = torch.stack([(x_adv - x).abs().amax(), x_adv.amin(), x_adv.amax()]).tolist()
    if not (distance <= eps + slack and lo >= 0 and hi <= 1):
        raise RuntimeError(
            f"{label} returned points outside B(x, {eps:.4g}) and [0, 1]: L-inf distance {distance:.4g}, "
            f"pixels in [{lo:.4g}, {hi:.4g}]"
        )


def _num_classes(model: nn.Module, x: Tensor) -> int:
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    with torch.no_grad(), model_mode(model, "eval"):
        return model(x[:1]).shape[1]


def _check_eval_args(specs: list[AttackSpec], x: Tensor, eps: float, batch_size: int) -> None:
    # The rest of the batch checks need the number of classes, which may take a forward of x[:1].
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [N, ...], got {getattr(x, 'shape', x)!r}")
    if not specs:
        raise ValueError("attacks must name at least one attack")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must not repeat a name, got {names}")
    if isinstance(eps, Tensor) or not 0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0 (pixels in [0, 1]), got {eps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
