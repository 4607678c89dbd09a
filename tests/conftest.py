"""Shared test set-up: offline Hub, one intra-op thread, and the tiny local dataset recipes train on."""

import os

# Before anything imports huggingface_hub: no test may reach the Hub. Loaders are exercised on
# datasets the tests build and save locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from robustmix.data import ImageDataset, load_dataset
from tests.trainers import subset

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` by path: recipes are scripts, not a package."""
    return _load_script("recipes", name)


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` by path: benchmarks are scripts, not a package."""
    return _load_script("benchmarks", name)


@functools.cache
def training_recipes() -> tuple[str, ...]:
    """Every training recipe's name, from the one list of them: ``RECIPES`` of ``recipes/compare.py``."""
    return load_recipe("compare").RECIPES


def _load_script(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test batches are small: they gain nothing from intra-op threads, and on a busy 2-core machine two threads
    spin-wait (measured: a 2 s model fit took 13 s with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A local dataset folder (``save_to_disk``): 100 training and 20 test digits as grayscale PNGs."""
    images, labels = load_dataset("digits", "test").tensors()
    pil = [PIL.Image.fromarray(np.asarray(image[0] * 255, dtype=np.uint8), mode="L") for image in images[:120]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    splits = {"train": slice(0, 100), "test": slice(100, 120)}
    folder = tmp_path_factory.mktemp("tiny")
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"image": pil[part], "label": labels[part].tolist()}, features=features)
            for split, part in splits.items()
        }
    ).save_to_disk(folder)
    return str(folder)


def quick_flags(tiny: str, output_dir: Path, *extra: str) -> list[str]:
    # 90 training examples after the 10% validation hold-out: 6 steps of 16 (the last one 10) per epoch.
    return ["--dataset", tiny, "--batch-size", "16", "--epochs", "2", "--output-dir", str(output_dir), *extra]


def launch_two_processes(script: str | Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script args`` as 2 gloo CPU processes under ``accelerate launch`` and check it succeeded.

    Accelerate 1.x runs ``--cpu --num_processes 2`` as ONE process; gloo ranks need the torchrun
    launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU`` set. The repository root goes on the path
    so worker scripts can import ``tests.conftest``. Each process starts in ``tests/distributed_entry.py``,
    which runs ``script`` and then destroys the process group it left alive (see there why).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": str(REPO),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(port), str(REPO / "tests" / "distributed_entry.py"), str(script), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def crash_then_resume(recipe, argv: list[str], crash_at_step: int, monkeypatch) -> None:
    """Run ``recipe.main(argv)`` until a KeyboardInterrupt ("power cut") before step ``crash_at_step + 1``, then
    once more with ``--resume latest``: what a user does after a crash."""
    crash_at(monkeypatch, crash_at_step)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(argv)
    monkeypatch.undo()
    recipe.main([*argv, "--resume", "latest"])


def crash_at(monkeypatch, step: int) -> None:
    """Make ``Trainer`` die (KeyboardInterrupt, a power cut) before training step ``step``."""
    from robustmix.training.trainer import Trainer

    real = Trainer._train_step

    def train_step(self, batch):
        if self.global_step == step:
            raise KeyboardInterrupt("power cut")
        real(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataset, ImageDataset]:
    """40 training and 12 validation digits: three steps of 16 (the last one 8) per epoch."""
    return subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)
