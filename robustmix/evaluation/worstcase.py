"""The per-example worst case over several evaluation attacks, and the sanity flags that say when to distrust it.

``worst_case`` runs a list of attacks the way AutoAttack does (an example is attacked only while it is still
classified correctly) and decides every example with the fp32 model at the point the attack found.
``sanity_flags`` reads the numbers and says when they cannot be trusted: a stronger attack doing worse than a
weaker one, a black-box attack beating the white-box ones, no collapse at a large eps, or a PGD loss that does not
rise. Everything here works on tensors in memory; ``robustmix.evaluation.run`` applies it to a run folder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustmix.checks import check_int, check_number
from robustmix.core.modes import model_mode
from robustmix.core.validation import check_batch, check_model_input
from robustmix.evaluation.attacks import ATTACKS, AttackSpec, get_attack
from robustmix.stages.margins import probability_margin


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

    See ``worst_case`` for the arguments; clean-misclassified examples count as not robust.
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
    after_attack: Callable[[AttackSpec], None] | None = None,
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
        attacks: Names in ``ATTACKS`` or specs (e.g. a registry spec with a smaller budget via
            ``with_budget``).
        eps: L-inf radius in pixels (8/255 on CIFAR-10).
        standalone: Also run every attack on every clean-correct example (see above).
        batch_size: Examples per attack call.
        seed: Seed of the attacks' randomness; batch ``j`` uses ``seed + j``.
        record_loss: For PGD-type attacks, also return the mean attack loss per iteration, read
            from the logits the attack computes anyway.
        after_attack: Called with each attack's spec once it has run (e.g. to advance a progress bar).

    Returns:
        A dict with ``"attack"`` (the combination's name, e.g. "worst case over APGD-CE, APGD-T,
            Square"), ``"attacks"`` (names), ``"eps"``, ``"n"`` (examples), ``"clean"`` (clean
            accuracy), ``"cumulative"`` (per name: accuracy against that attack and every earlier
            one, as AutoAttack prints it), ``"standalone"`` (per name: accuracy against that attack
            alone; only with ``standalone=True``), ``"worst_case"`` (accuracy against all), ``"robust"``
            (bool ``[N]`` on the CPU: robust against all) and, with ``record_loss``, ``"loss_trace"``
            (per PGD-type name: the mean loss before each step, a list of ``steps`` floats);
            ``"attacked"`` (per name: how many examples the attack ran on) and ``"per_example"``, on the
            CPU: ``"correct"`` (bool ``[N]``, clean), ``"cumulative"`` and, with ``standalone=True``,
            ``"standalone"`` (per name: bool ``[N]`` behind the accuracies), ``"margin_clean"`` and
            ``"margin_adv"`` (float ``[N]``: the fp32 probability margin ``p_y - max_{k != y} p_k`` in
            [-1, 1] at ``x`` and the lowest at ``x`` or at any point an attack found). Accuracies are
            fractions in [0, 1].

    Raises:
        TypeError: ``x`` or ``y`` is not a tensor, or ``eps`` is not a number.
        ValueError: An unknown or repeated attack, a bad batch, a negative ``eps``, a ``batch_size`` below 1, or
            a model with fewer classes than an attack needs.
    """
    specs = [get_attack(a) if isinstance(a, str) else a for a in attacks]
    _check_eval_args(specs, x, y, eps, batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under inference_mode cannot enter autograd.
        x, y = (t.detach().clone() if t.is_inference() else t.detach() for t in (x, y))
        check_model_input(model, x)
        num_classes = _num_classes(model, x)
        check_batch(x, y, num_classes)
        for spec in specs:
            if num_classes < spec.min_classes:
                raise ValueError(
                    f"{spec.label} needs at least {spec.min_classes} classes, the model has {num_classes}"
                )

        judged = [_judge(model, xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
        correct = torch.cat([ok for ok, _ in judged])
        margin_clean = torch.cat([margin for _, margin in judged])
        margin_adv = margin_clean.clone()
        robust = correct.clone()
        n = x.shape[0]
        results: dict[str, Any] = {
            "attack": combination_name(specs),
            "attacks": [spec.name for spec in specs],
            "eps": float(eps),
            "n": n,
            "clean": correct.float().mean().item(),
            "cumulative": {},
            "attacked": {},
        }
        per_example: dict[str, Any] = {"correct": correct.cpu(), "cumulative": {}}
        if standalone:
            results["standalone"] = {}
            per_example["standalone"] = {}
        if record_loss:
            results["loss_trace"] = {}
        for spec in specs:
            # One host sync per attack to pick its examples; none inside the attacks.
            todo = (correct if standalone else robust).nonzero().squeeze(1)
            trace = None
            if record_loss and spec.traces_loss:
                trace = torch.zeros(spec.kwargs["steps"], device=x.device)
            survived, margin = _survives(spec, model, x[todo], y[todo], eps, batch_size, seed, trace)
            attack_robust = torch.zeros_like(correct)
            attack_robust[todo] = survived
            margin_adv[todo] = torch.minimum(margin_adv[todo], margin)
            robust &= attack_robust
            if standalone:
                results["standalone"][spec.name] = attack_robust.float().mean().item()
                per_example["standalone"][spec.name] = attack_robust.cpu()
            results["cumulative"][spec.name] = robust.float().mean().item()
            # A copy: ``robust`` changes in place with the next attack (and .cpu() of a CPU tensor is the tensor).
            per_example["cumulative"][spec.name] = robust.to("cpu", copy=True)
            results["attacked"][spec.name] = todo.numel()
            if trace is not None and todo.numel() > 0:
                results["loss_trace"][spec.name] = (trace / todo.numel()).tolist()
            if after_attack is not None:
                after_attack(spec)
        results["worst_case"] = robust.float().mean().item()
        results["robust"] = robust.cpu()
        results["per_example"] = per_example | {"margin_clean": margin_clean.cpu(), "margin_adv": margin_adv.cpu()}
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
    attack drives accuracy to ~0 there, which ``sanity_flags`` checks.
    """
    return {
        float(eps): robust_accuracy(model, x, y, attack, eps=eps, batch_size=batch_size, seed=seed)
        for eps in eps_values
    }


def sanity_flags(results: Mapping[str, Any], *, tolerance: float = 0.01, zero_accuracy: float = 0.05) -> list[str]:
    """Warnings about an evaluation that cannot be trusted; empty when every check passes.

    Checks what ``results`` holds (a ``worst_case`` result, optionally with ``"eps_sweep"``
    from ``eps_sweep``):

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


def combination_name(specs: Sequence[AttackSpec]) -> str:
    """The name of a worst case in reports, e.g. "worst case over APGD-CE, Square"."""
    return "worst case over " + ", ".join(spec.label for spec in specs)


def _survives(
    spec: AttackSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    batch_size: int,
    seed: int,
    trace: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Run ``spec`` in batches; at the point it found, ``_judge`` of each example (bool ``[N]``, float ``[N]``)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device), torch.zeros(0, device=x.device)
    judged = []
    for j, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size))):
        extra = {} if trace is None else {"loss_trace": trace}
        x_adv = spec(model, xb, yb, eps=eps, seed=seed + j, **extra)
        _check_in_ball(x_adv, xb, eps, spec.label)
        judged.append(_judge(model, x_adv, yb))
    return torch.cat([ok for ok, _ in judged]), torch.cat([margin for _, margin in judged])


def _judge(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The eval-mode model with autocast off: predicts ``y`` (bool ``[B]``), and its probability margin (``[B]``)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), model_mode(model, "eval"):
        logits = model(x)
        return logits.argmax(dim=1) == y, probability_margin(logits, y)


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


def _check_eval_args(specs: list[AttackSpec], x: Tensor, y: Tensor, eps: float, batch_size: int) -> None:
    # The rest of the batch checks need the number of classes, which may take a forward of x[:1].
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a floating-point tensor of pixels in [0, 1], got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be an integer tensor of class indices [N], got {type(y).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [N, ...], got {getattr(x, 'shape', x)!r}")
    if not specs:
        raise ValueError("attacks must name at least one attack")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must not repeat a name, got {names}")
    check_number("eps", eps)
    check_int("batch_size", batch_size, 1)
