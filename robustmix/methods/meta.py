"""One-step lookahead (meta-learning) shared by the learned reweighters (CAAT, BiLAW).

A weight function ``w_phi`` is trained so that one SGD step of the model on the ``w_phi``-weighted
training loss lowers a loss on held-out data (Meta-Weight-Net style):

1. ``theta' = SGD_step(theta, grad_theta L_train(theta, w_phi))``, kept differentiable in ``phi``
   (``virtual_sgd_step``: the real optimizer's lr, momentum buffer, dampening, Nesterov and
   weight decay, exactly as ``torch.optim.SGD`` would step);
2. ``L_meta(theta')`` on a held-out batch (``functional_forward`` runs the model at ``theta'``);
3. ``phi <- Adam(phi, grad_phi L_meta)`` (``set_meta_gradients``, then the callback's Adam step).

Everything runs on the *unwrapped* model: no DDP collective fires and no parameter ``.grad`` of
the model is touched. Only the meta-gradients of ``phi`` are averaged across processes, so every
process keeps the same weight function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import SGD, Adam, Optimizer

from robustmix.checks import check_int
from robustmix.core.callbacks import Callback
from robustmix.core.context import StepContext
from robustmix.core.modes import BNMode, model_mode


def _torch_optimizer(optimizer: Optimizer) -> Optimizer:
    """The ``torch.optim`` optimizer inside Accelerate's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def virtual_sgd_step(
    model: nn.Module, loss: Tensor, optimizer: Optimizer, *, create_graph: bool = True
) -> dict[str, Tensor]:
    """The parameters one step of ``optimizer`` on ``loss`` would produce, without changing the model.

    Follows ``torch.optim.SGD`` operation for operation (weight decay, momentum buffer with
    dampening, Nesterov, ``maximize``), reading each parameter's hyperparameters from its group
    and its ``momentum_buffer`` from the optimizer state; a parameter without a gradient, or
    outside the optimizer, keeps its value (SGD skips it). With ``create_graph`` the result stays
    differentiable with respect to whatever ``loss`` depends on (e.g. the parameters of a weight
    net), which is the point of a lookahead.

    Args:
        model: The unwrapped model (no DDP wrapper) whose forward produced ``loss``.
        loss: Scalar training loss of ``model``'s current parameters.
        optimizer: The model's ``torch.optim.SGD`` (Accelerate's wrapper is looked through).
        create_graph: Keep the graph of the gradient (second-order lookahead); without it the
            step is first order in ``loss``'s other inputs.

    Returns:
        ``{name: tensor}`` for every parameter of ``model`` (as ``model.named_parameters()``),
            to pass to ``functional_forward``.

    Raises:
        TypeError: ``optimizer`` is not SGD (the lookahead would not match the real step).
    """
    sgd = _torch_optimizer(optimizer)
    if not isinstance(sgd, SGD):
        raise TypeError(f"the lookahead reproduces torch.optim.SGD steps; got {type(sgd).__name__}")
    groups = {id(p): group for group in sgd.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    stepped = [(name, p) for name, p in params.items() if p.requires_grad and id(p) in groups]
    grads = torch.autograd.grad(loss, [p for _, p in stepped], create_graph=create_graph, allow_unused=True)
    for (name, p), grad in zip(stepped, grads):
        if grad is None:
            continue
        group = groups[id(p)]
        # The same operations as torch.optim.SGD, so a lookahead with the real gradient is bitwise the real step.
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            buffer = sgd.state.get(p, {}).get("momentum_buffer")
            buffer = grad if buffer is None else buffer.mul(momentum).add(grad, alpha=1 - group["dampening"])
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        params[name] = p.add(grad, alpha=-group["lr"])
    return params


def functional_forward(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, *, bn_mode: BNMode = "train_frozen_bn"
) -> Tensor:
    """Logits ``[B, C]`` of ``model`` run with ``params`` (e.g. from ``virtual_sgd_step``) on ``x``.

    Args:
        model: The unwrapped model.
        params: ``{name: tensor}`` replacing its parameters; buffers are the model's own.
        x: Inputs ``[B, ...]``, pixels in [0, 1].
        bn_mode: ``"train_frozen_bn"`` (the default) normalizes with batch statistics, as the
            model trains, and leaves the real model's BatchNorm running statistics untouched: a
            virtual model must not change the real one. Every module's mode is restored after.
    """
    with model_mode(model, bn_mode):
        return functional_call(model, params, (x,), strict=False)


class VirtualModel(nn.Module):
    """``model`` run with the (detached) parameters of a virtual step: an attack target at ``theta'``.

    Attacks and eval-mode forwards see the virtual model as any other module: its mode is ``model``'s
    (``robustmix.core.modes.model_mode`` sets and restores it), its buffers are ``model``'s own, and no
    gradient reaches ``params`` or the weight net through it.

    Args:
        model: The unwrapped model.
        params: ``{name: tensor}`` from ``virtual_sgd_step``.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.params = {name: value.detach() for name, value in params.items()}

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.params, (x,), strict=False)


def set_meta_gradients(loss: Tensor, net: nn.Module) -> None:
    """Write ``grad_phi loss`` into ``net``'s ``.grad``, averaged across processes under DDP.

    ``torch.autograd.grad`` keeps the model's own ``.grad`` untouched (``loss`` reaches the model's
    parameters through the virtual step). Averaging the meta-gradients keeps the weight net the same
    on every process; call it on every process at the same step.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        grads = list(flat.split([g.numel() for g in grads]))
    for p, g in zip(params, grads):
        p.grad = g.view_as(p)


class MetaBatches:
    """Endless random batches of a held-out (meta) split, reproducible from a seed and a counter.

    Batch ``n`` of process ``r`` is drawn without replacement from a generator seeded by
    ``(seed, r, n)``, so the stream resumes exactly from ``state_dict`` and processes see
    different batches (their meta-gradients are averaged).

    Args:
        images: Meta split images ``[M, ...]``, pixels in [0, 1], on any device.
        labels: Labels ``[M]`` (int64).
        batch_size: Examples per batch (at most ``M``).
        seed: Seed of the draws (>= 0).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, seed: int = 0) -> None:
        if labels.shape != (images.shape[0],) or images.shape[0] == 0:
            raise ValueError(
                f"need images [M, ...] and labels [M] with M >= 1, got {list(images.shape)} and {list(labels.shape)}"
            )
        if not 1 <= batch_size <= images.shape[0]:
            raise ValueError(f"batch_size must be in [1, {images.shape[0]}] (the meta split's size), got {batch_size}")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.draws = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = int(np.random.SeedSequence([self.seed, rank, self.draws]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(self.labels), generator=generator)[: self.batch_size]
        self.draws += 1
        chosen = chosen.to(self.labels.device)
        return self.images[chosen], self.labels[chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])

    def __repr__(self) -> str:
        return f"MetaBatches(size={len(self.labels)}, batch_size={self.batch_size}, seed={self.seed})"


def _optimizer_state(optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with string keys, as checkpoints store callback state."""
    state = optimizer.state_dict()
    return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def _load_optimizer_state(optimizer: Optimizer, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(
        {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
    )


class LookaheadReweighter(Callback):
    """Base of callbacks whose weight net is meta-learned by a one-step lookahead every ``meta_every`` steps.

    Holds the weight net, its Adam optimizer, the meta batches and the model's optimizer (taken
    from the trainer at ``on_fit_start``, or given). A subclass computes its weights in
    ``__call__`` and calls ``maybe_meta_step`` first, so the step's weights come from the
    updated net (Meta-Weight-Net's order). The step number is ``ctx.step``: pass ``step=`` to the
    ``AdversarialStep`` in your own loop.

    Args:
        net: The weight net ``phi``.
        meta_batches: Held-out ``(x, y)`` batches, cycled when exhausted (e.g. ``MetaBatches``).
        meta_every: Run the lookahead when ``ctx.step % meta_every == 0`` (>= 1).
        meta_lr: Adam learning rate of ``phi``.
        meta_weight_decay: Adam's (L2) weight decay of ``phi``, 0 by default.
        optimizer: The model's SGD optimizer; by default the trainer's.
    """

    accumulates = False  # the lookahead takes the model's optimizer step on one batch

    def __init__(
        self,
        net: nn.Module,
        meta_batches: Iterable[tuple[Tensor, Tensor]],
        *,
        meta_every: int,
        meta_lr: float,
        meta_weight_decay: float = 0.0,
        optimizer: Optimizer | None = None,
    ) -> None:
        check_int("meta_every", meta_every, 1)
        if not (0 < meta_lr < float("inf")):
            raise ValueError(f"meta_lr must be a positive number, got {meta_lr}")
        if not (0 <= meta_weight_decay < float("inf")):
            raise ValueError(f"meta_weight_decay must be a finite number >= 0, got {meta_weight_decay}")
        self.net, self.meta_batches, self.meta_every, self.meta_lr = net, meta_batches, meta_every, meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.meta_optimizer = Adam(net.parameters(), lr=meta_lr, weight_decay=meta_weight_decay)
        self.optimizer = optimizer
        self._meta_iter: Iterator[tuple[Tensor, Tensor]] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if trainer is not None and self.optimizer is None:
            self.optimizer = trainer.optimizer

    def maybe_meta_step(self, ctx: StepContext) -> None:
        """Run ``meta_loss`` and one Adam step of the net when this step is a lookahead step."""
        if ctx.step % self.meta_every != 0:
            return
        if self.optimizer is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the model's optimizer for its lookahead: pass optimizer= "
                "or train with robustmix's Trainer"
            )
        x_meta, y_meta = self._next_meta_batch(ctx.inputs.device)
        loss = self.meta_loss(ctx, x_meta, y_meta)
        set_meta_gradients(loss, self.net)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        ctx.extras[f"{type(self).__name__}_meta_loss"] = loss.detach()

    def place(self, device: torch.device) -> None:
        """Move the net and its Adam state to ``device`` (state restored from a checkpoint arrives on the CPU)."""
        self.net.to(device)
        for values in self.meta_optimizer.state.values():
            for key, value in values.items():
                if isinstance(value, Tensor) and key != "step":
                    values[key] = value.to(device)

    def meta_loss(self, ctx: StepContext, x_meta: Tensor, y_meta: Tensor) -> Tensor:
        """The outer loss of the virtual model on the meta batch, differentiable in the net."""
        raise NotImplementedError

    def _next_meta_batch(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._meta_iter is None:
            self._meta_iter = iter(self.meta_batches)
        try:
            x, y = next(self._meta_iter)
        except StopIteration:  # a finite loader: start it over
            self._meta_iter = iter(self.meta_batches)
            x, y = next(self._meta_iter)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        state = {"net": self.net.state_dict(), "meta_optimizer": _optimizer_state(self.meta_optimizer)}
        if hasattr(self.meta_batches, "state_dict"):
            state["meta_batches"] = self.meta_batches.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        _load_optimizer_state(self.meta_optimizer, state["meta_optimizer"])
        if "meta_batches" in state:
            self.meta_batches.load_state_dict(state["meta_batches"])
            self._meta_iter = None
