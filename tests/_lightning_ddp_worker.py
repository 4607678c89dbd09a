"""Run docs/examples/lightning_train.py (every process runs this file under Lightning's DDP launcher) and save
each process's final weights as ``<save>.rank<r>.pt``: ``python tests/_lightning_ddp_worker.py SAVE ARGS...``."""

import importlib.util
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "lightning_train.py"

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    save, *args = sys.argv[1:]
    module = example.main(args)
    torch.save(module.model.state_dict(), f"{save}.rank{module.global_rank}.pt")
