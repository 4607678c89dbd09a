"""Fashion-MNIST: the checked IDX reader, where the files are found, the splits, and recipes on the data set."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robustmix import data as data_module
from robustmix.cli.presets import PRESETS
from robustmix.cli.recipe import base_parser, parse_args
from robustmix.data import DEBIAN_FASHION_MNIST, get_split, load_dataset, load_split
from robustmix.data.idx import IDX_FILES, read_idx, read_idx_split
from robustmix.evaluation.run import split_size
from tests.conftest import REPO, crash_then_resume, launch_two_processes, load_recipe

REAL = Path(DEBIAN_FASHION_MNIST)


def idx_bytes(values: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: magic (0, 0, dtype code, ndim), big-endian uint32 dimensions, the values."""
    header = bytes([0, 0, code, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + values.tobytes()


def write_idx_folder(folder: Path, n_train: int = 60, n_test: int = 20, *, gz: bool = False, seed: int = 0) -> Path:
    """The four standard files with random 28x28 images and balanced labels; image i of class c has pixel
    [0, 0] = i % 256 and [0, 1] = c, so tests can tell which example they got."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 0, 1] = labels
        for stem, values in zip(IDX_FILES[split], (images, labels)):
            raw = idx_bytes(values)
            (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


@pytest.fixture
def fashion_folder(tmp_path) -> Path:
    return write_idx_folder(tmp_path / "fashion")


@pytest.fixture
def no_system_copy(monkeypatch):
    """Tests about the search order must not find a Debian copy installed on this machine."""
    spec = data_module.DATASETS["fashion-mnist"]
    monkeypatch.setitem(data_module.DATASETS, "fashion-mnist", data_module.dataclasses.replace(spec, idx_folders=()))


# ---------------------------------------------------------------------- the IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(values)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    assert np.array_equal(read_idx(path, ndim=3), values)


def test_read_idx_reads_big_endian_values(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "f").write_bytes(idx_bytes(values, code=0x0C))
    out = read_idx(tmp_path / "f", ndim=1, dtype=np.int32)
    assert out.tolist() == [1, -2, 70000] and out.dtype == np.dtype(np.int32)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"\x01" + raw[1:], "not an IDX file"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX dtype code 0x07"),
        (lambda raw: raw[:2] + b"\x0c" + raw[3:], "expected uint8"),
        (lambda raw: raw[:3] + b"\x02" + raw[4:], "has 2 dimensions, expected 3"),
        (lambda raw: raw[:-1], "truncated or corrupt"),
        (lambda raw: raw + b"\x00", "truncated or corrupt"),
        (lambda raw: raw[:6], "truncated header"),
        (lambda raw: b"", "not an IDX file"),
        (lambda raw: gzip.compress(raw)[:-12], "corrupt or truncated gzip"),
    ],
)
def test_read_idx_names_the_file_it_rejects(tmp_path, mutate, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))))
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path, ndim=3)
    assert str(path) in str(err.value)


def test_split_checks_counts_sizes_and_labels(tmp_path):
    folder = write_idx_folder(tmp_path / "a")
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(59, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"holds 60 images but .*train-labels-idx1-ubyte 59 labels"):
        read_idx_split(folder, "train", image_size=28, num_classes=10)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(60, 10, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got up to 10"):
        read_idx_split(folder, "train", image_size=28, num_classes=10)
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 32, 32), dtype=np.uint8)))
    with pytest.raises(ValueError, match="images are 32x32, expected 28x28"):
        read_idx_split(folder, "test", image_size=28, num_classes=10)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte .or t10k-labels-idx1-ubyte.gz. is missing"):
        read_idx_split(folder, "test", image_size=28, num_classes=10)


# ---------------------------------------------------------------------- the splits


@pytest.mark.parametrize("gz", [False, True])
def test_splits_from_a_local_folder(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "f", gz=gz)
    train, val, test = (
        load_dataset("fashion-mnist", s, path=str(folder), val_size=10) for s in ("train", "validation", "test")
    )
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    assert train.image_shape == (1, 28, 28) and train.images.dtype == torch.uint8 and train.num_classes == 10
    # index = position in the source file (pixel [0, 0] encodes it), label = the file's label (pixel [0, 1])
    for split in (train, val, test):
        assert torch.equal(split.images[:, 0, 0, 0].long(), split.index % 256)
        assert torch.equal(split.images[:, 0, 0, 1].long(), split.labels)
    assert sorted(train.index.tolist() + val.index.tolist()) == list(range(60))  # disjoint, covering
    assert val.labels.bincount(minlength=10).tolist() == [1] * 10  # stratified
    assert test.index.tolist() == list(range(20))  # the test file untouched, in order


def test_hold_out_is_fixed_by_its_seed(fashion_folder):
    load = lambda seed: load_dataset("fashion-mnist", "validation", path=str(fashion_folder), val_size=10, seed=seed)  # noqa: E731
    assert torch.equal(load(0).index, load(0).index)
    assert not torch.equal(load(0).index, load(1).index)


def test_get_split_gives_float_tensors(fashion_folder):
    x, y = get_split("fashion-mnist", "test", path=str(fashion_folder))
    assert x.dtype == torch.float32 and x.shape == (20, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert y.tolist() == [i % 10 for i in range(20)]


def test_search_order_path_then_system_folder_then_hub(tmp_path, monkeypatch):
    system = write_idx_folder(tmp_path / "system", n_train=40, n_test=10)
    given = write_idx_folder(tmp_path / "given", n_train=60, n_test=20)
    spec = data_module.DATASETS["fashion-mnist"]
    monkeypatch.setitem(
        data_module.DATASETS, "fashion-mnist", data_module.dataclasses.replace(spec, idx_folders=(str(system),))
    )
    assert len(load_dataset("fashion-mnist", "test", path=str(given))) == 20
    assert len(load_dataset("fashion-mnist", "test")) == 10
    monkeypatch.setitem(
        data_module.DATASETS,
        "fashion-mnist",
        data_module.dataclasses.replace(spec, idx_folders=(str(tmp_path / "x"),)),
    )
    # Offline (conftest sets HF_HUB_OFFLINE) and no local copy: one error naming every way to get the data.
    with pytest.raises(ValueError, match="zalando-datasets/fashion_mnist from the Hub") as err:
        load_dataset("fashion-mnist", "test")
    assert "--data-path" in str(err.value) and str(tmp_path / "x") in str(err.value)


def test_debian_hint_when_nothing_is_found(no_system_copy, monkeypatch):
    spec = data_module.DATASETS["fashion-mnist"]
    monkeypatch.setitem(
        data_module.DATASETS,
        "fashion-mnist",
        data_module.dataclasses.replace(spec, idx_folders=(DEBIAN_FASHION_MNIST,)),
    )
    monkeypatch.setattr(data_module, "find_idx_files", lambda folder, split: None)
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


def test_a_corrupt_file_is_named(fashion_folder):
    path = fashion_folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: .* bytes of data"):
        load_dataset("fashion-mnist", "test", path=str(fashion_folder))


def test_idx_folder_rejects_column_options(fashion_folder):
    with pytest.raises(ValueError, match="holds IDX files"):
        load_dataset("fashion-mnist", "test", path=str(fashion_folder), image_column="img")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files():
    train, val, test = (load_dataset("fashion-mnist", s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    assert test.labels.bincount().tolist() == [1000] * 10 and val.labels.bincount().tolist() == [500] * 10
    x = train.images.float() / 255
    spec = data_module.DATASETS["fashion-mnist"]
    full = torch.cat([x, val.images.float() / 255])
    assert full.mean().item() == pytest.approx(spec.mean[0], abs=1e-4)
    assert full.std().item() == pytest.approx(spec.std[0], abs=1e-4)


# ---------------------------------------------------------------------- recipes on Fashion-MNIST


def test_preset_is_the_benchmark_protocol():
    args = parse_args(base_parser("t"), ["--preset", "fashion-mnist"])
    assert (args.dataset, args.eps, args.attack_steps, args.model) == ("fashion-mnist", 0.1, 5, "test_resnet")
    assert args.step_size == pytest.approx(args.eps / 4)
    assert args.eval_every == args.epochs  # validated once, after the last step
    assert PRESETS["fashion-mnist"]["threads"] == 1


def _flags(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "fashion-mnist", "--data-path", str(folder), "--val-size", "10", "--batch-size", "16",
        "--epochs", "1", "--attack-steps", "1", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def test_recipe_trains_on_a_fixed_subset_and_records_it(fashion_folder, tmp_path):
    recipe = load_recipe("pgd_at")
    metrics = recipe.main(_flags(fashion_folder, tmp_path / "run", "--train-size", "30", "--max-steps", "2"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["sizes"] == {"train": 30, "validation": 10}
    assert (config["data"]["train_size"], config["data"]["val_size"]) == (30, 10)
    assert config["data"]["image_shape"] == [1, 28, 28]
    assert metrics["test"]["n"] == 20 and metrics["attack"]["eps"] == 0.1
    # The train split of the run folder is the subset it trained on, not the whole training split.
    assert split_size(tmp_path / "run", "train") == 30
    recorded = load_split(
        "fashion-mnist", "train", path=str(fashion_folder), val_size=10, split_seed=0, train_size=30
    ).index.tolist()
    whole = load_split("fashion-mnist", "train", path=str(fashion_folder), val_size=10, split_seed=0)
    assert len(whole) == 50 and set(recorded) < set(whole.index.tolist())


def test_train_size_subset_is_stratified_and_meta_comes_from_the_rest(fashion_folder, tmp_path, monkeypatch):
    seen = {}
    recipe = load_recipe("caat")

    def capture(args, info):
        seen["train"], seen["meta"] = info.train_data, info.meta_data
        raise SystemExit(0)

    monkeypatch.setattr(recipe, "build_callbacks", capture)
    with pytest.raises(SystemExit):
        recipe.main(_flags(fashion_folder, tmp_path / "caat", "--train-size", "20", "--meta-size", "10"))
    train, meta = seen["train"], seen["meta"]
    assert len(train) == 20 and train.labels.bincount(minlength=10).tolist() == [2] * 10
    assert len(meta) == 10 and not set(meta.index.tolist()) & set(train.index.tolist())


def test_train_size_too_large_is_a_flag_error(fashion_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        load_recipe("pgd_at").main(_flags(fashion_folder, tmp_path / "r", "--train-size", "50"))
    assert err.value.code == 2
    assert "--train-size: train_size must be < 50" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_corrupt_data_stops_the_recipe_before_any_work(fashion_folder, tmp_path, capsys):
    path = fashion_folder / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SystemExit) as err:
        load_recipe("pgd_at").main(_flags(fashion_folder, tmp_path / "r"))
    assert err.value.code == 2
    assert "train-labels-idx1-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resume_after_a_crash_on_fashion_mnist_is_exact(fashion_folder, tmp_path, monkeypatch):
    recipe = load_recipe("pgd_at")
    common = ("--train-size", "40", "--epochs", "2", "--checkpoint-every-steps", "2")
    recipe.main(_flags(fashion_folder, tmp_path / "straight", *common))
    crash_then_resume(recipe, _flags(fashion_folder, tmp_path / "resumed", *common), 3, monkeypatch)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_fashion_mnist_under_two_cpu_processes(fashion_folder, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(REPO / "recipes" / "pgd_at.py", *_flags(fashion_folder, out, "--max-steps", "2"), timeout=600)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_processes"], config["global_batch_size"]) == (2, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 20 and metrics["best"]["val_n"] == 10  # each example once across ranks
