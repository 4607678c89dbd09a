"""Adversarial training in a plain PyTorch loop: the lines marked ``# robustmix`` are all it takes."""

import torch
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, PGDAttack  # robustmix


def train(
    model: nn.Module, loader, epochs: int = 1, lr: float = 0.05, eps: float = 0.1, attack_steps: int = 5
) -> list[float]:
    """Train ``model`` (pixels in [0, 1] in, logits out) with PGD-AT; returns the loss of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    step = AdversarialStep([PGDAttack(eps=eps, step_size=eps / 4, steps=attack_steps), AdversarialCE()])  # robustmix
    losses = []
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss, _ = step(model, images, labels)  # robustmix
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses
