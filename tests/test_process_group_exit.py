"""Processes leave their process group before interpreter finalization: the library for the groups it creates, the
tests' launcher for the worker scripts that create their own."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, launch_two_processes

#: One gloo process (world size 1): a checker registered first runs last at exit and reports whether the group
#: was still alive after robustmix's handler ran.
EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, socket, sys
    import torch.distributed as dist
    from robustmix.training.distributed import destroy_process_group_at_exit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    atexit.register(lambda: print("alive at exit:", dist.is_initialized()))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if sys.argv[1] == "hook":
        destroy_process_group_at_exit()
        destroy_process_group_at_exit()  # registered once however often it is asked
    elif sys.argv[1] == "destroyed":  # the user destroyed it already: the handler leaves it alone
        destroy_process_group_at_exit()
        dist.destroy_process_group()
    """
)


@pytest.mark.parametrize(("mode", "alive"), [("hook", False), ("destroyed", False), ("none", True)])
def test_the_process_group_is_destroyed_before_finalization(tmp_path, mode, alive):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, timeout=120, cwd=REPO, check=True
    )
    assert result.stdout.strip() == f"alive at exit: {alive}", result.stderr[-2000:]


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    total = torch.tensor([accelerator.process_index + 1.0])
    dist.all_reduce(total)
    open(sys.argv[1] + f".rank{accelerator.process_index}", "w").write(f"{__name__} {total.item()}")
    """
)


@pytest.mark.distributed
def test_launched_scripts_run_as_main_with_their_arguments(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch_two_processes(script, str(tmp_path / "out"))
    for rank in range(2):
        assert (tmp_path / f"out.rank{rank}").read_text() == "__main__ 3.0"
