"""Adversarial training in a user's own Accelerate loop: the lines marked ``# robustmix`` are all it takes.

Run it on one process or several: ``accelerate launch --cpu --num_processes 2 docs/examples/accelerate_loop.py``.
"""

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from robustmix import AdversarialCE, AdversarialStep, PGDAttack, sync_buffers  # robustmix
from robustmix.data import load_dataset
from robustmix.models import create_model


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--save", default=None, help="write the final weights here (one file per rank)")
    args = parser.parse_args(argv)

    set_seed(0)
    accelerator = Accelerator()
    data = load_dataset("digits", "train")
    images, labels = data.tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=32, shuffle=True)
    model = create_model(args.model, num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.025, steps=3), AdversarialCE()])  # robustmix

    model.train()
    done = 0
    while done < args.steps:
        for x, y in loader:
            loss, _ = step(model, x, y)  # robustmix
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            done += 1
            if done == args.steps:
                break
    sync_buffers(model)  # robustmix: BatchNorm statistics agree on every rank
    if args.save:
        weights = accelerator.unwrap_model(model).state_dict()
        torch.save(weights, f"{args.save}.rank{accelerator.process_index}.pt")
    accelerator.end_training()  # several processes: leave the process group before the interpreter exits
    return model


if __name__ == "__main__":
    main()
