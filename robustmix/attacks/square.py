"""L-inf Square attack of Andriushchenko et al. (ECCV 2020): random search on the margin, no gradients.

Square only reads the model's logits, so a model that hides its gradients (non-differentiable
preprocessing, saturated softmax, ...) does not fool it: when Square beats the gradient attacks,
the model masks its gradients. Each iteration proposes, per image, a square window set to
``x +- eps`` (one sign per channel) on top of the best point so far and keeps it when the margin
``z_y - max_{k != y} z_k`` decreases. The window's side shrinks along a fixed schedule of the
fraction ``p`` of pixels it covers (``square_p``).

Settings as in AutoAttack's standard version (fra31/auto-attack): 5000 queries, ``p_init = 0.8``, one
run, and the schedule's thresholds read on the iteration itself (``resc_schedule=False`` there).
Two details differ from AutoAttack's code: a window's corner is uniform over every position where
it fits (AutoAttack's never touches the last row or column), and a window whose signs would leave the
image unchanged gets other signs, as in the authors' original code (AutoAttack spends the query).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmix.attacks.objectives import cw_margin
from robustmix.attacks.pgd import check_eps
from robustmix.checks import check_int
from robustmix.core.modes import BNMode, model_mode

#: Iterations after which ``p`` halves once more (on the 10,000-query scale when the schedule is rescaled).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
#: Examples already misclassified drop out of the batch every this many iterations: fewer queries
#: for them, at one host sync per block.
_BLOCK = 100
#: Channel subsets are drawn as the bits of one int64.
_MAX_CHANNELS = 62


def square_p(iteration: int, queries: int, p_init: float, rescale: bool = False) -> float:
    """Fraction of the image a square window covers at ``iteration`` (0-based) of ``queries``.

    ``p_init`` halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000. As in
    AutoAttack's standard version these thresholds apply to the iteration itself, whatever the
    budget: with 5000 queries ``p`` ends at ``p_init / 128`` (after iteration 4000). With ``rescale``
    the iteration is first mapped to a 10,000-query range (the reference's ``resc_schedule=True``),
    so every budget runs the whole schedule: with 5000 queries each halving comes at half the
    iteration and ``p`` ends at ``p_init / 512``.
    """
    if rescale:
        iteration = int(iteration / queries * 10000)
    return p_init / 2 ** sum(iteration > threshold for threshold in _P_HALVINGS)


def square_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    seed: int = 0,
    bn_mode: BNMode = "eval",
) -> Tensor:
    """Score-based L-inf Square attack (untargeted, margin loss), run under ``torch.no_grad``.

    Starts from vertical stripes (each column of each channel at ``x + eps`` or ``x - eps``), then
    runs ``queries`` iterations of one forward each for the images not yet misclassified.

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, C, H, W]`` and returning logits ``[B, K]``;
            it is only called forward.
        x: Clean images ``[B, C, H, W]``, pixels in [0, 1].
        y: Labels ``[B]`` (int64).
        eps: L-inf radius in pixels.
        queries: Iterations after the initial query (the reference's ``n_queries``).
        p_init: Initial fraction of the pixels a window covers, in (0, 1]; 0.8 for L-inf.
        rescale_schedule: Stretch the ``p`` schedule over ``queries`` (see ``square_p``). AutoAttack's
            ``SquareAttack`` does by default; its standard version turns it off.
        seed: Seed of the random windows and signs (a generator on ``x``'s device).
        bn_mode: BatchNorm/dropout mode of the queries (eval by default).

    Returns:
        ``x_adv [B, C, H, W]`` in ``B(x, eps)`` and [0, 1]: the point of lowest margin found, or
            the first misclassified one.
    """
    _check_square(x, y, eps, queries, p_init)
    eps = float(eps)
    batch, _, height, width = x.shape
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad(), model_mode(model, bn_mode):
        x_best = (x + eps * _random_signs((batch, x.shape[1], 1, width), generator, x)).clamp(0.0, 1.0)
        margin = _margin(model, x_best, y)
        active = torch.arange(batch, device=x.device)
        for block_start in range(0, queries, _BLOCK):
            x_a, y_a, x_best_a, margin_a = x[active], y[active], x_best[active], margin[active]
            for i in range(block_start, min(block_start + _BLOCK, queries)):
                p = square_p(i, queries, p_init, rescale_schedule)
                side = min(max(round(math.sqrt(p * height * width)), 1), height, width)
                x_new = square_proposal(x_a, x_best_a, side, eps, generator)
                margin_new = _margin(model, x_new, y_a)
                # Misclassified images (margin <= 0) stay where they are.
                accept = (margin_a > 0) & (margin_new < margin_a)
                x_best_a = torch.where(accept[:, None, None, None], x_new, x_best_a)
                margin_a = torch.where(accept, margin_new, margin_a)
            x_best[active], margin[active] = x_best_a, margin_a
            active = active[margin_a > 0]
            if active.numel() == 0:
                break
    return x_best


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{k != y} z_k`` per sample, float32; <= 0 means misclassified."""
    return -cw_margin(model(x), y)


def _random_signs(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    signs = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * signs - 1).to(like.dtype)


def square_proposal(x: Tensor, x_best: Tensor, side: int, eps: float, generator: torch.Generator) -> Tensor:
    """``x_best`` with one random ``side x side`` window per image set to ``x +- eps`` (a sign per channel)."""
    batch, channels, height, width = x.shape
    top = torch.randint(0, height - side + 1, (batch, 1, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, width - side + 1, (batch, 1, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(height, device=x.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, 1, width)
    window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    signs = _random_signs((batch, channels, 1, 1), generator, x)
    x_new = torch.where(window, (x + eps * signs).clamp(0.0, 1.0), x_best)
    # A window that already holds these signs would waste the query. The reference redraws the
    # signs until they differ; flipping a uniformly random non-empty subset of the channels draws
    # from the same distribution in one pass (the unchanged sign vector is the only rejected one).
    unchanged = (x_new == x_best).flatten(1).all(dim=1)
    signs = torch.where(unchanged[:, None, None, None], signs * nonempty_flips(batch, channels, generator, x), signs)
    return torch.where(window, (x + eps * signs).clamp(0.0, 1.0), x_best)


def nonempty_flips(batch: int, channels: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``[B, C, 1, 1]`` of -1 (flip) / +1, the flipped set uniform over the non-empty subsets of channels."""
    # The bits of an integer uniform in [1, 2^C) mark a uniformly random non-empty subset.
    subset = torch.randint(1, 2**channels, (batch, 1), generator=generator, device=like.device)
    flip = (subset >> torch.arange(channels, device=like.device)) & 1
    return (1 - 2 * flip).to(like.dtype).view(batch, channels, 1, 1)


def _check_square(x: Tensor, y: Tensor, eps: float, queries: int, p_init: float) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty float batch of images [B, C, H, W], got {getattr(x, 'shape', x)!r}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [B] = [{x.shape[0]}], got {list(y.shape)}")
    if isinstance(eps, Tensor):
        raise ValueError(f"eps must be a number of pixels, got a tensor {eps!r}")
    check_eps(float(eps))
    check_int("queries", queries, 0)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if x.shape[1] > _MAX_CHANNELS:
        raise ValueError(f"square_attack supports images with at most {_MAX_CHANNELS} channels, got {x.shape[1]}")
