"""timm's train.py loop, made adversarial: the lines marked ``# robustmix`` are all it changes.

``train_one_epoch`` follows timm's own (``train.py``): timm's optimizer and scheduler factories, per-update
``step_update``, per-epoch ``step``, a model EMA. The data comes from the embedded digits here; in timm's
script, keep ``create_loader`` but with ``mean=(0,) * C, std=(1,) * C`` (pixels stay in [0, 1]) and
without mixup, cutmix or random erasing (``--mixup 0 --cutmix 0 --reprob 0``).

    python docs/examples/timm_train.py --epochs 3
"""

import argparse

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3

from robustmix import AdaLabLabels, AdversarialCE, AdversarialStep, MAILWeights, PGDAttack, ProbabilityMargin
from robustmix.data import load_dataset
from robustmix.models import create_model  # robustmix: normalization inside the model
from robustmix.stages.anti import AdversarysAdversary  # robustmix


def train_one_epoch(epoch, model, loader, optimizer, step, lr_scheduler, num_epochs, model_ema=None):
    losses = AverageMeter()
    model.train()
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    step.fire("on_epoch_start", None, epoch)  # robustmix
    for images, target in loader:
        loss, _ctx = step(  # robustmix: replaces loss_fn(model(images), target)
            model, images, target, epoch=epoch, step=num_updates, total_epochs=num_epochs,
            total_steps=num_epochs * updates_per_epoch,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step.fire("on_after_optimizer_step", None, optimizer)  # robustmix: AWP takes its perturbation off here
        num_updates += 1
        losses.update(loss.item(), images.size(0))
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
    step.fire("on_epoch_end", None, epoch)  # robustmix
    return {"loss": losses.avg}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="test_resnet", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=None, help="train on the first N digits (default: all)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    images, labels = load_dataset("digits", "train").tensors()
    data = torch.utils.data.TensorDataset(images[: args.train_size], labels[: args.train_size])
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, drop_last=True)
    model = create_model(args.model, num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=1, step_on_epochs=False,
        updates_per_epoch=len(loader),
    )  # fmt: skip
    model_ema = ModelEmaV3(model, decay=0.998)

    # robustmix: ADA-Lab (plain PGD-AT for the first third of the epochs); imported above, after timm's
    eps, burn_in = 0.1, num_epochs // 3
    step = AdversarialStep([  # robustmix
        PGDAttack(eps=eps, step_size=0.04, steps=5),
        AdversarysAdversary(1, eps / 2, burn_in_epochs=burn_in),
        ProbabilityMargin("adv"),
        AdaLabLabels(0.5, 1.0, burn_in_epochs=burn_in),
        MAILWeights(burn_in_epochs=burn_in),
        AdversarialCE(),
    ])  # fmt: skip
    history = []
    for epoch in range(num_epochs):
        history.append(train_one_epoch(epoch, model, loader, optimizer, step, lr_scheduler, num_epochs, model_ema))
        lr_scheduler.step(epoch + 1)
    return history


if __name__ == "__main__":
    for epoch, metrics in enumerate(main()):
        print(f"epoch {epoch}: loss {metrics['loss']:.4f}")
