"""ADA-Lab with PyTorch Lightning on the embedded digits, validated with PGD-20 every epoch.

python docs/examples/lightning_train.py                   # about 3 minutes on 2 CPU cores
python docs/examples/lightning_train.py --devices 2       # DDP, 2 processes (gloo on CPUs)
python docs/examples/lightning_train.py --resume          # continue from the last checkpoint
"""

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch

from robustmix import AdaLabLabels, AdversarialCE, AdversarialStep, MAILWeights, PGDAttack, ProbabilityMargin
from robustmix.cli.optim import warmup_cosine
from robustmix.data import load_dataset
from robustmix.integrations.lightning import AdversarialModule
from robustmix.models import create_model
from robustmix.stages.anti import AdversarysAdversary


def sgd_with_warmup_cosine(module: AdversarialModule) -> dict:
    """The recipes' optimizer and schedule: SGD, a linear warm-up over a quarter of the steps, then cosine."""
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    total = module.trainer.estimated_stepping_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> AdversarialModule:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="test_resnet", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: the epochs)")
    parser.add_argument("--devices", type=int, default=1, help="processes; more than one trains with DDP")
    parser.add_argument("--output-dir", default="runs/lightning-adalab-digits")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    train, val = load_dataset("digits", "train"), load_dataset("digits", "validation")
    batch_size = 128 // args.devices  # the global batch stays 128
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)

    eps, burn_in = 0.1, args.epochs // 3
    step = AdversarialStep([
        PGDAttack(eps=eps, step_size=0.04, steps=5),                     # x_adv
        AdversarysAdversary(1, eps / 2, burn_in_epochs=burn_in),         # x_aa: one descent step from x_adv
        ProbabilityMargin("adv"),                                        # margin of x_adv
        AdaLabLabels(0.5, 1.0, burn_in_epochs=burn_in),                  # soft label towards p(x_aa)
        MAILWeights(burn_in_epochs=burn_in),                             # low margin, more weight (about 5:1)
        AdversarialCE(),
    ])  # fmt: skip
    model = create_model(args.model, num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))
    module = AdversarialModule(model, step, sgd_with_warmup_cosine)

    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator="auto",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        default_root_dir=args.output_dir,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=Path(args.output_dir) / "checkpoints", save_last=True)],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader, val_loader, ckpt_path="last" if args.resume else None)
    return module


if __name__ == "__main__":
    main()
