"""Projected gradient attacks in pixel space: PGD (L-inf, L2), FGSM with random start, and descent.

Every function here keeps the ground rules of robustmix:

- images are pixels in [0, 1] and ``eps`` is in pixel units; results stay in ``B(x, eps)``
  intersected with [0, 1];
- gradients come from ``torch.autograd.grad`` with respect to the perturbed input only, so no
  parameter ``.grad`` is touched and no DDP all-reduce fires;
- the model runs in the requested BatchNorm/dropout mode (eval by default) and every module's
  mode is restored afterwards, also on an exception;
- gradients are enabled inside, so attacks work when called under ``torch.no_grad()`` or
  ``torch.inference_mode()``;
- the attack loss is multiplied by ``loss_scale`` before differentiating, so input gradients do
  not underflow under fp16 autocast (sign and normalized L2 steps are invariant to the scale);
- every call runs exactly ``steps`` iterations: no data-dependent early exit, no host sync in the
  loop, so all DDP ranks do the same work.

The fast path (``compile_backend``) runs each iteration (forward, input gradient, loss scaling, sign
step, projection, clamp) as one ``torch.compile`` unit with static shapes, and on CUDA replays it as a
CUDA graph. Without it the loop is eager all through, also for a model compiled in place
(``model.compile()``, see ``eager_model``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from robustmix.attacks.objectives import get_objective
from robustmix.checks import check_int, is_number
from robustmix.core.modes import BNMode, check_bn_mode, model_mode

Norm = Literal["linf", "l2"]
Start = Literal["uniform", "normal", "none"]
#: Called before each step with ``(iteration, logits [B, C] detached, x_k [B, ...])``; it sees
#: the logits the attack computed anyway, so observing costs no forward pass.
Observer = Callable[[int, Tensor, Tensor], None]

NORMS = ("linf", "l2")
STARTS = ("uniform", "normal", "none")
#: Power of two: multiplying by it is exact in every float format.
DEFAULT_LOSS_SCALE = 2.0**10


def check_eps(eps: float, norm: Norm = "linf", name: str = "eps") -> None:
    """Check a budget in pixels: a finite number >= 0, and at most 1 for L-inf.

    An L-inf radius above 1 lets every pixel take any value: it is a budget in 0-255 units by mistake
    (``8`` meant ``8/255``). L2 radii above 1 are legitimate (ImageNet's L2 budget is 3).

    Raises:
        ValueError: naming ``name`` (the command line's hint for an L-inf radius above 1).
    """
    if not 0 <= eps < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0 (pixels in [0, 1]), got {eps}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"{name} is an L-inf radius in pixels in [0, 1], got {eps}; for 8/255 write 8/255")


def _per_sample(value: float | Tensor, x: Tensor, name: str, maximum: float = float("inf")) -> Tensor | float:
    """Check a scalar or ``[B]`` budget (finite, >= 0, <= ``maximum``) and shape it to broadcast against ``x``."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.shape != (x.shape[0],):
                raise ValueError(f"per-sample {name} must have shape [B] = [{x.shape[0]}], got {list(value.shape)}")
            # One host read for every condition: on CUDA every read is a synchronization.
            if not bool((torch.isfinite(value) & (value >= 0) & (value <= maximum)).all()):
                at_most = f", and <= {maximum:g}: an L-inf radius in pixels in [0, 1]" if maximum < 1e300 else ""
                raise ValueError(f"{name} must be finite and >= 0 for every sample{at_most}")
            return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if value > maximum:
        raise ValueError(f"{name} is an L-inf radius in pixels in [0, 1], got {value}; for 8/255 write 8/255")
    return value


def flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm of ``[B, ...]``, shaped ``[B, 1, ...]`` for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def autograd_input(t: Tensor) -> Tensor:
    """``t`` detached, and cloned if it was made under ``inference_mode`` (such tensors cannot enter autograd)."""
    return t.detach().clone() if t.is_inference() else t.detach()


def project(x_new: Tensor, x: Tensor, eps: Tensor | float, norm: Norm) -> Tensor:
    """Project ``x_new`` onto ``B(x, eps)`` (L-inf or L2) intersected with [0, 1]."""
    if norm == "linf":
        x_new = torch.maximum(torch.minimum(x_new, x + eps), x - eps)
    else:
        delta = x_new - x
        # reciprocal * eps (what `float / tensor` computes): a float and a [B] budget give identical points.
        delta = delta * torch.clamp((flat_norm(delta) + 1e-12).reciprocal() * eps, max=1.0)
        x_new = x + delta
    # Clamping to [0, 1] moves every coordinate towards x (which is in [0, 1]): the norm only shrinks.
    return x_new.clamp(0.0, 1.0)


def random_start(
    x: Tensor, eps: Tensor | float, norm: Norm, start: Start, generator: torch.Generator | None = None
) -> Tensor:
    """Starting point of an attack, inside ``B(x, eps)`` and [0, 1].

    ``"uniform"``: uniform in the L-inf box, or uniform in the L2 ball; ``"normal"``:
    ``x + 0.001 * N(0, I)`` (TRADES); ``"none"``: ``x`` itself.
    """
    if start == "none":
        return x.clone()
    if start == "normal":
        noise = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif norm == "linf":
        noise = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / (flat_norm(direction) + 1e-12)
        u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = u.pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
        noise = direction * radius * eps
    return project(x + noise, x, eps, norm)


def eager_model() -> contextlib.AbstractContextManager:
    """Inside: a model compiled in place (``model.compile()``) runs its eager forward and backward.

    The eager attack loop differentiates with respect to the input only. Through a compiled model, the compiled
    backward computes every weight's gradient as well (one graph for all of them), which the attack throws away;
    on CUDA with channels_last weights, PyTorch's compiled ``convolution_backward`` also fails its stride check
    (its meta kernel predicts contiguous weight gradients where cuDNN returns channels_last ones, pytorch#171622):
    the fast path's eager short last batch crashed there on an H100, and a fast run's validation attack takes the
    same path.
    Eager autograd computes the input gradient alone. A no-op inside a compiled region, and on torch < 2.6.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


def check_loss_scale(loss_scale: float) -> None:
    """``loss_scale`` must be a finite number > 0: 0 or NaN would zero or poison every gradient step."""
    if not is_number(loss_scale):
        raise TypeError(f"loss_scale must be a number, got {type(loss_scale).__name__}")
    if not 0 < loss_scale < float("inf"):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale}")


def _iteration(
    model: nn.Module,
    x_k: Tensor,
    x: Tensor,
    y: Tensor,
    reference: Tensor | None,
    eps: Tensor,
    step_size: Tensor,
    scale: float,
    objective: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    norm: Norm,
) -> tuple[Tensor, Tensor]:
    """One attack iteration from ``x_k`` as a pure function: the unit the fast path compiles.

    The input gradient comes from ``torch.func.grad``, which dynamo traces into the forward's graph
    (``torch.autograd.grad`` would break the graph there), so the loss scaling, sign step, projection and
    clamp fuse with the backward's last kernels. ``model.forward`` is called directly: forward hooks of
    ``model`` itself would be traced into the graph (robustmix's pass counter registers a new one every
    step, which would recompile every step); those of its submodules run as usual.

    Returns:
        The next iterate ``[B, ...]`` and the logits of ``x_k`` ``[B, C]``, both detached.
    """

    def scaled_objective(z: Tensor) -> tuple[Tensor, Tensor]:
        logits = model.forward(z)
        return objective(logits, y, reference).sum() * scale, logits

    grad, logits = torch.func.grad(scaled_objective, has_aux=True)(x_k)
    return _ascend(x_k, grad, x, eps, step_size, norm), logits.detach()


def _ascend(x_k: Tensor, grad: Tensor, x: Tensor, eps: Tensor, step_size: Tensor, norm: Norm) -> Tensor:
    """The next iterate ``[B, ...]``: a sign (L-inf) or normalized (L2) step along ``grad``, projected onto
    ``B(x, eps)`` and [0, 1]; both loops' update (the compiled one traces it into its graph)."""
    # fp16 overflow would turn into NaN and poison the iterate; such coordinates do not move.
    grad = torch.nan_to_num(grad, nan=0.0)
    step = step_size * grad.sign() if norm == "linf" else step_size * grad / (flat_norm(grad) + 1e-12)
    return project(x_k + step, x, eps, norm)


@functools.cache
def compiled_iteration(backend: str, cuda_graphs: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """``_iteration`` under ``torch.compile`` with static shapes; one per backend and graph setting.

    Every batch size, model, objective and budget form gets its own graph (dynamo's guards); the
    callers compile only their full batch size, so an epoch costs one graph per attack, not two.
    With ``cuda_graphs`` (inductor only) the compiled iteration is recorded once as a CUDA graph and
    replayed: one launch per iteration instead of one per kernel.
    """
    if cuda_graphs:
        return torch.compile(_iteration, backend=backend, mode="reduce-overhead", dynamic=False)
    return torch.compile(_iteration, backend=backend, dynamic=False)


def _compiled_loop(
    model: nn.Module,
    x_k: Tensor,
    x: Tensor,
    y: Tensor,
    reference: Tensor | None,
    *,
    eps: Tensor | float,
    step_size: Tensor | float,
    steps: int,
    scale: float,
    objective: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    norm: Norm,
    observer: Observer | None,
    backend: str,
    check_labels: bool,
) -> Tensor:
    """``steps`` compiled iterations from ``x_k``; no host read in the loop."""
    # CUDA graphs replay recorded kernel launches; on a CPU nothing is launched (inductor calls its C++
    # kernels directly), so there is nothing to record and inductor would skip them with a warning.
    cuda_graphs = x.is_cuda and backend == "inductor"
    iteration = compiled_iteration(backend, cuda_graphs)
    # Budgets as device tensors: a graph input that changes needs no recompile, and a fill needs no host sync.
    eps, step_size = (
        v if isinstance(v, Tensor) else torch.full((), v, device=x.device, dtype=x.dtype) for v in (eps, step_size)
    )
    if x_k.stride() != x.stride():
        # The start in x's memory layout (channels_last on CUDA): the first iteration's graph serves every other one.
        x_k = torch.empty_like(x).copy_(x_k)
    for k in range(steps):
        if cuda_graphs:
            # Every iteration replays the same graph (otherwise each position in the loop records its own).
            torch.compiler.cudagraph_mark_step_begin()
        # torch.func.grad ignores an outer no_grad; without it the compiled graph would also record a second
        # derivative through the weights, and keep its activations for a backward that never comes.
        with torch.no_grad():
            x_next, logits = iteration(model, x_k, x, y, reference, eps, step_size, scale, objective, norm)
        if check_labels and k == 0 and not bool((y < logits.shape[1]).all()):
            raise ValueError(f"y holds a label >= the model's {logits.shape[1]} classes")
        if observer is not None:
            # A CUDA graph's outputs are overwritten by its next replay: the observer gets its own copy.
            observer(k, logits.clone() if cuda_graphs else logits, x_k)
        # The next step begins a new replay, which invalidates this one's outputs: the iterate that feeds it is a
        # copy (one image batch per step, outside the graph).
        x_k = x_next.clone() if cuda_graphs else x_next
    return x_k


def check_attack_inputs(x: Tensor, y: Tensor, steps: int, norm: str, start: str) -> None:
    """Check an attack's batch and options: ``x`` a non-empty float batch ``[B, ...]``, ``y`` int64 ``[B]``,
    ``steps`` an integer >= 0, ``norm`` in ``NORMS`` and ``start`` in ``STARTS``.

    Raises:
        TypeError: ``x`` or ``y`` of the wrong type or dtype.
        ValueError: a shape, ``steps``, ``norm`` or ``start`` out of range.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of pixels in [0, 1], got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {list(x.shape)}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64:
        raise TypeError(f"y must be an int64 tensor of labels, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [B] = [{x.shape[0]}], got {list(y.shape)}")
    check_int("steps", steps, 0)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step_size: float | Tensor,
    steps: int,
    norm: Norm = "linf",
    loss: str = "ce",
    start: Start = "uniform",
    descend: bool = False,
    x_init: Tensor | None = None,
    reference: Tensor | None = None,
    bn_mode: BNMode = "eval",
    observer: Observer | None = None,
    loss_scale: float = DEFAULT_LOSS_SCALE,
    generator: torch.Generator | None = None,
    check_values: bool = True,
    compile_backend: str | None = None,
) -> Tensor:
    """Projected gradient ascent (or descent) of a per-sample loss around ``x``.

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, ...]`` and returning logits ``[B, C]``.
            Under DDP pass the unwrapped module.
        x: Clean images ``[B, ...]``, pixels in [0, 1].
        y: Labels ``[B]`` (int64).
        eps: Radius of the ball around ``x``, in pixels; a float or per-sample ``[B]``.
        step_size: Step length in pixels (L-inf: per coordinate; L2: of the whole step); a float
            or per-sample ``[B]``.
        steps: Number of gradient steps (exactly this many forwards and backwards).
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalized gradient steps).
        loss: Objective name in ``robustmix.attacks.objectives.OBJECTIVES``: ``"ce"``,
            ``"kl"`` (TRADES; needs ``reference`` clean logits), ``"cw"``, ``"dlr"``.
        start: Start point when ``x_init`` is not given: uniform in the ball, ``0.001 * N(0, I)``,
            or none.
        descend: Minimize the objective instead (anti-adversaries, the adversary's adversary).
        x_init: Explicit start (e.g. ``x_adv`` for the adversary's adversary); projected first.
        reference: Extra input of the objective (clean logits for ``"kl"``).
        bn_mode: BatchNorm/dropout mode during the attack: ``"eval"``, ``"train"``, or
            ``"train_frozen_bn"``.
        observer: Called before every step with the iteration, detached logits and iterate.
        loss_scale: Multiplier of the summed loss before differentiation (fp16 safety).
        generator: Random generator for the start (same device as ``x``).
        check_values: Check the values of ``x`` (finite, in [0, 1]) and ``y`` (in ``[0, C)``) first:
            one host read before the loop and one at the first forward (each a synchronization on
            CUDA). Callbacks pass ``False``: ``AdversarialStep`` has checked the batch once already.
        compile_backend: Run every iteration as one ``torch.compile`` unit with this backend
            (``"inductor"`` for speed), with static shapes: each new batch size compiles once more; on
            CUDA with inductor the iteration is replayed as a CUDA graph. Needs ``bn_mode="eval"`` (a
            train-mode BatchNorm updates its statistics in place, which ``torch.func.grad`` cannot
            trace). Forward hooks of ``model`` itself do not run (see ``_iteration``). ``None``: eager.

    Returns:
        The perturbed images ``[B, ...]``, detached, same dtype and device as ``x``.

    Raises:
        TypeError, ValueError: naming the bad argument, before any forward (a label ``>= C`` is only
            found by the first forward, which needs ``C``).
    """
    check_attack_inputs(x, y, steps, norm, start)
    check_loss_scale(loss_scale)
    if compile_backend is not None and bn_mode != "eval":
        raise ValueError(
            f"the compiled attack iteration needs bn_mode='eval', got {bn_mode!r}: a train-mode BatchNorm updates "
            "its running statistics in place, which torch.func.grad cannot trace"
        )
    if check_values and not bool((torch.isfinite(x) & (x >= 0) & (x <= 1)).all() & (y >= 0).all()):
        raise ValueError("x must hold finite pixels in [0, 1] and y labels >= 0 (found NaN/inf, a pixel out of range "
                         "or a negative label)")  # fmt: skip
    objective = get_objective(loss)
    check_bn_mode(bn_mode)
    eps = _per_sample(eps, x, "eps", maximum=1.0 if norm == "linf" else float("inf"))
    step_size = _per_sample(step_size, x, "step_size")
    sign = -1.0 if descend else 1.0

    # inference_mode(False) + clone: inputs made under inference_mode cannot enter autograd.
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, bn_mode):
        x = x.detach().clone() if x.is_inference() else x.detach()
        y = y.clone() if y.is_inference() else y
        if reference is not None and reference.is_inference():
            reference = reference.clone()
        if x_init is None:
            x_k = random_start(x, eps, norm, start, generator)
        else:
            x_k = project(x_init.detach().clone(), x, eps, norm)
        if compile_backend is not None:
            return _compiled_loop(
                model, x_k, x, y, reference, eps=eps, step_size=step_size, steps=steps, scale=sign * loss_scale,
                objective=objective, norm=norm, observer=observer, backend=compile_backend, check_labels=check_values,
            ).detach()  # fmt: skip
        with eager_model():
            x_k = _eager_loop(model, x_k, x, y, reference, eps, step_size, steps, sign * loss_scale, objective, norm,
                              observer, check_values)  # fmt: skip
    return x_k.detach()


def _eager_loop(
    model: nn.Module,
    x_k: Tensor,
    x: Tensor,
    y: Tensor,
    reference: Tensor | None,
    eps: Tensor,
    step_size: Tensor,
    steps: int,
    scale: float,
    objective: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    norm: Norm,
    observer: Observer | None,
    check_labels: bool,
) -> Tensor:
    """``steps`` eager iterations from ``x_k``; the input gradient from ``torch.autograd.grad``."""
    for k in range(steps):
        x_k.requires_grad_(True)
        logits = model(x_k)
        if check_labels and k == 0 and not bool((y < logits.shape[1]).all()):
            raise ValueError(f"y holds a label >= the model's {logits.shape[1]} classes")
        if observer is not None:
            observer(k, logits.detach(), x_k.detach())
        objective_sum = objective(logits, y, reference).sum() * scale
        (grad,) = torch.autograd.grad(objective_sum, x_k)
        x_k = _ascend(x_k.detach(), grad, x, eps, step_size, norm)
    return x_k


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step_size: float | Tensor,
    steps: int,
    norm: Norm = "linf",
    loss: str = "ce",
    start: Start = "uniform",
    reference: Tensor | None = None,
    bn_mode: BNMode = "eval",
    observer: Observer | None = None,
    loss_scale: float = DEFAULT_LOSS_SCALE,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> Tensor:
    """Projected gradient descent attack (Madry et al. 2018): ascend ``loss`` for ``steps`` steps.

    See ``perturb`` for the arguments. Returns ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1].
    """
    return perturb(
        model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss, start=start,
        reference=reference, bn_mode=bn_mode, observer=observer, loss_scale=loss_scale, generator=generator,
        check_values=check_values,
    )  # fmt: skip


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step_size: float | Tensor | None = None,
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> Tensor:
    """FGSM with a uniform random start ("fast AT", Wong et al. 2020), L-inf.

    One signed gradient step of ``step_size`` (default ``1.25 * eps``) from a uniform start in
    the ``eps`` box, projected back to ``B(x, eps)`` and [0, 1].
    """
    if step_size is None:
        step_size = 1.25 * eps
    return perturb(
        model, x, y, eps=eps, step_size=step_size, steps=1, norm="linf", loss="ce", start="uniform",
        bn_mode=bn_mode, loss_scale=loss_scale, generator=generator, check_values=check_values,
    )  # fmt: skip
