"""Entry point of the processes ``launch_two_processes`` starts: runs a worker script as ``__main__``, then destroys
the process group the script left alive, before interpreter finalization.

Worker scripts that create their own Accelerator (a user's loop, Hugging Face ``Trainer``, raw DDP) end with their
gloo process group alive; torch then tears it down during finalization, where gloo's threads can abort the process
(SIGABRT, "terminate called without an active exception") after the script succeeded. The library does this for
the process groups it creates (``robustmix.training.distributed.destroy_process_group_at_exit``); a user's script is
the user's to close, and here the tests close theirs.

    python -m accelerate.commands.launch ... tests/distributed_entry.py SCRIPT [ARGS...]
"""

import runpy
import sys
from pathlib import Path

import torch.distributed as dist

if __name__ == "__main__":
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(script.parent)  # as if the script were run itself
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
