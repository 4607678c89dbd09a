"""Image classification datasets as tensors in [0,1], with a stable per-example index.

Registry datasets (CIFAR-10/100, SVHN, Fashion-MNIST) come from the Hugging Face Hub or from a local copy with the
same schema, and any local `load_from_disk` folder, parquet file/folder or image folder loads through the same
conversion code. Fashion-MNIST also reads the four standard IDX files from a local folder or from Debian's
`dataset-fashion-mnist` package, without network. The embedded default, `digits`, is scikit-learn's handwritten
digits upsampled to 32x32 and needs no network.

Every split except `test` is carved out of the source's train split: `validation` is a fixed, seeded, stratified
hold-out, so model selection never touches the test split. Local data without a test split of its own gets one only
when asked (`test_size`): a fixed stratified hold-out of its train split, never the train split itself. Pass the
same `val_size`, `test_size` and `seed` for every split of one run, or the splits overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import sklearn.datasets
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robustmix.checks import check_int
from robustmix.data.idx import find_idx_files, read_idx_split

if TYPE_CHECKING:  # Hugging Face `datasets` is imported where it is used: digits and IDX files never need it
    import datasets

SPLITS = ("train", "validation", "test")
CIFAR_PAD = 4
_DECODE_CHUNK = 1000
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
#: Seed of the test hold-out (`test_size`): fixed, so every run and every seed tests on the same examples.
TEST_SPLIT_SEED = 0
#: Test images that may equal a training or validation image, as a fraction of the test split, before
#: `check_disjoint` refuses the split. Benchmarks hold a few byte-identical duplicates across their official splits
#: (Barz and Denzler 2020 count near-duplicates of 3.3% of CIFAR-10's and 10% of CIFAR-100's test images); a test
#: split made of training data shares most of its images.
MAX_SHARED_FRACTION = 0.01


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and what its examples look like.

    Attributes:
        repo: Hugging Face Hub repository id; None for a dataset embedded in the library.
        config: Hub configuration name, or None for the default one.
        image_column: Column holding the images.
        label_column: Column holding the integer class labels.
        num_classes: Number of classes; labels lie in [0, num_classes).
        in_chans: Channels after conversion (3 converts grayscale/RGBA/palette images to RGB, 1 to grayscale).
        image_size: Height and width in pixels.
        mean: Per-channel mean of the train split, pixels in [0,1] (for the model's Normalize wrapper).
        std: Per-channel standard deviation of the train split, pixels in [0,1].
        val_size: Number of examples held out from the train split as the validation split.
        augment: Whether `augment_cifar` (random crop and horizontal flip) suits this data; flips turn digits into
            other glyphs, so digit datasets say False.
        idx_folders: Folders searched, in order, for the four standard IDX files when no local path is given,
            before the Hub (e.g. where a system package installs them); empty for datasets not shipped as IDX.
    """

    repo: str | None
    config: str | None
    image_column: str
    label_column: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_size: int
    augment: bool
    idx_folders: tuple[str, ...] = ()


#: Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        repo="uoft-cs/cifar10",
        config=None,
        image_column="img",
        label_column="label",
        num_classes=10,
        in_chans=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        val_size=1000,
        augment=True,
    ),
    "cifar100": DatasetSpec(
        repo="uoft-cs/cifar100",
        config=None,
        image_column="img",
        label_column="fine_label",
        num_classes=100,
        in_chans=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        val_size=1000,
        augment=True,
    ),
    "svhn": DatasetSpec(
        repo="ufldl-stanford/svhn",
        config="cropped_digits",
        image_column="image",
        label_column="label",
        num_classes=10,
        in_chans=3,
        image_size=32,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        val_size=1000,
        augment=False,
    ),
    # Zalando's Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images, the same IDX files as MNIST.
    # Mean and std of all 60,000 training images. The 5,000 validation images make the selection between
    # methods or settings precise to about +-0.6 points of accuracy (binomial standard error at 85%).
    "fashion-mnist": DatasetSpec(
        repo="zalando-datasets/fashion_mnist",
        config=None,
        image_column="image",
        label_column="label",
        num_classes=10,
        in_chans=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        val_size=5000,
        augment=False,
        idx_folders=(DEBIAN_FASHION_MNIST,),
    ),
    # Mean and std measured on the default train split after upsampling; val_size is 10% of the 1,797 images.
    "digits": DatasetSpec(
        repo=None,
        config=None,
        image_column="image",
        label_column="label",
        num_classes=10,
        in_chans=1,
        image_size=32,
        mean=(0.3050,),
        std=(0.3236,),
        val_size=180,
        augment=False,
    ),
}


@dataclass(eq=False, repr=False)
class ImageDataset(Dataset):
    """Images, labels and per-example ids held in memory.

    Attributes:
        images: [N, C, H, W], uint8 pixels in 0..255 or float32 pixels in [0,1].
        labels: [N] int64 class labels in [0, num_classes).
        index: [N] int64 stable per-example ids, used to key per-example state (soft-label tables, histories).
        num_classes: Number of classes.
        name: Registry name or local path the data came from.
        split: "train", "validation" or "test".
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    num_classes: int
    name: str
    split: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(
                f"images must be uint8 or float32 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = len(self.images)
        for field, values in (("labels", self.labels), ("index", self.index)):
            if values.dtype != torch.int64 or tuple(values.shape) != (n,):
                raise ValueError(f"{field} must be int64 [{n}], got {values.dtype} {tuple(values.shape)}")
        _check_labels(self.labels, self.num_classes)
        if self.images.dtype == torch.float32 and n > 0 and (self.images.min() < 0 or self.images.max() > 1):
            raise ValueError("float32 images must hold pixels in [0,1]; normalization belongs inside the model")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, size={len(self)}, "
            f"image_shape={self.image_shape}, dtype={self.images.dtype}, num_classes={self.num_classes})"
        )

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """One example: "image" float32 [C, H, W] in [0,1], "label" and "index" int64 scalars."""
        return {"image": _to_float(self.images[i]), "label": self.labels[i], "index": self.index[i]}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All examples at once: images float32 [N, C, H, W] in [0,1] and labels int64 [N].

        Float32 storage is returned without a copy.
        """
        return _to_float(self.images), self.labels

    def hold_out(self, size: int, split: str, *, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """Split off a fixed, seeded, stratified subset of `size` examples (e.g. a clean meta set for meta-learning).

        Returns:
            The remaining examples and the held-out ones (named `split`); both keep their `index` values.
        """
        keep, held = _hold_out(self.labels.cpu().numpy(), size, seed)

        def subset(positions: np.ndarray, name: str) -> ImageDataset:
            rows = torch.as_tensor(positions, dtype=torch.long, device=self.labels.device)
            return dataclasses.replace(
                self, images=self.images[rows], labels=self.labels[rows], index=self.index[rows], split=name
            )

        return subset(keep, self.split), subset(held, split)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same examples with tensors on `device`; a GPU-resident dataset skips per-batch host-to-device copies."""
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device), index=self.index.to(device)
        )


def load_dataset(
    name: str,
    split: str = "train",
    *,
    path: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    num_classes: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load one split of a registry dataset or of a local dataset.

    Registry names (see `DATASETS`) load from the Hub, or from `path` when given: a local copy with the same schema,
    saved with `DatasetDict.save_to_disk` or as parquet files named per split. Any other `name` must be an existing
    local path: a `load_from_disk` folder, a parquet file or folder, or an image folder (`class_name/image.png`
    under optional `train/` and `test/` folders). A single parquet file, a saved `Dataset` (one split) or a
    folder without a test split is a train split with no test split: its `test` split needs `test_size`, which
    holds that many examples of the train split out as the test split (stratified, fixed: `TEST_SPLIT_SEED`,
    whatever `seed`), before validation is held out of the rest. Images are decoded once, to uint8 tensors. A
    local dataset is grayscale (one channel) when every image of every one of its splits is (modes 1, L, LA, I,
    I;16, F); a single color image anywhere makes every split RGB, so train and test always have the same channels.

    `fashion-mnist` looks, in this order, in `path` for the four standard IDX files (`train-images-idx3-ubyte`,
    `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzipped or not: the
    layout of Zalando's repository and of torchvision's `FashionMNIST/raw`), in `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist` package), then on the Hub (`zalando-datasets/fashion_mnist`). Every IDX file
    is checked (magic number, dtype, dimensions, length, image and label counts, label range) before use.

    Index: for train and validation, an example's position in the source's train split before the hold-out; for
    test, its position in the test split (in the train split when `test_size` holds it out).

    `digits`, the embedded default, is scikit-learn's 1,797 handwritten 8x8 digits: pixels (0..16) divided by 16,
    upsampled bilinearly to 1x32x32 (align_corners=False), clamped to [0,1] and stored as float32. Its split is
    fixed and stratified: `train_test_split(random_state=0)` takes 20% as test, then `val_size` of the remaining
    images, kept in original order, become validation (`random_state=seed`). The defaults give 1,257 train /
    180 validation / 360 test images. Its index differs: for train, the position within the train split
    (0..1256, so per-example tables can be dense); for validation and test, the position in the original
    1,797-image array.

    Args:
        name: Registry name or local dataset path.
        split: "train", "validation" (held out from the source's train split) or "test".
        path: Local copy of a registry dataset, read instead of the Hub; not accepted for `digits`.
        image_column: Image column; defaults to the registry's, or "image" for local data.
        label_column: Label column; defaults to the registry's, or "label" for local data.
        num_classes: Number of classes; defaults to the registry's, else a ClassLabel feature's, else the largest
            label over all source splits plus one.
        val_size: Examples held out for validation; defaults to the registry's (1000 for CIFAR and SVHN, 180 for
            digits), or 10% of the train split (at least one example per class) for local data. 0 disables the
            hold-out.
        test_size: Examples of the train split held out as the test split, for data without a test split of its
            own; refused for data with one.
        seed: Seed of the stratified validation hold-out.

    Returns:
        The split as an `ImageDataset`.

    Raises:
        ValueError: Unknown name or split, missing path, column or split, a test split asked of data without one
            and no `test_size` (or `test_size` for data with one), a folder without data files, non-integer
            labels, labels outside [0, num_classes), a train split of a single class, images of different sizes,
            an image that cannot be decoded (its split and row named), too few examples for the hold-outs, a
            corrupt or truncated IDX file (named), or a registry dataset that is neither local nor reachable on
            the Hub.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if split == "validation" and val_size == 0:
        raise ValueError("split 'validation' needs val_size > 0")
    spec = DATASETS.get(name)
    if spec is None and not Path(name).exists():
        raise ValueError(
            f"unknown dataset {name!r}: neither a registry name {sorted(DATASETS)} nor an existing local path"
        )
    if spec is not None and spec.repo is None:
        options = {
            "path": path,
            "image_column": image_column,
            "label_column": label_column,
            "num_classes": num_classes,
            "test_size": test_size,
        }
        given = [option for option, value in options.items() if value is not None]
        if given:
            raise ValueError(f"{name!r} is embedded in the library; {given} do not apply to it")
        return _load_digits(split, spec.val_size if val_size is None else val_size, seed)

    if spec is not None and spec.idx_folders:
        folder = _idx_folder(name, spec, path)
        if folder is not None:
            if image_column or label_column or (num_classes not in (None, spec.num_classes)) or test_size:
                raise ValueError(
                    f"{folder} holds IDX files: image_column, label_column, num_classes and test_size do not apply"
                )
            return _load_idx(name, spec, folder, split, spec.val_size if val_size is None else val_size, seed)

    if spec is None:
        source = _read_local(name)
        image_column = image_column or "image"
        label_column = label_column or "label"
    else:
        source = _from_hub(name, spec) if path is None else _read_local(path)
        image_column = image_column or spec.image_column
        label_column = label_column or spec.label_column
        num_classes = num_classes or spec.num_classes

    import datasets  # here, not at the top: digits and IDX files never need it

    check_int("test_size", test_size, 1, optional=True)
    has_test = not isinstance(source, datasets.Dataset) and "test" in source
    if test_size is not None and has_test:
        raise ValueError(
            f"{name!r} has a test split of its own; test_size (--test-from-train) holds one out only of data "
            "without one"
        )
    if split == "test" and not has_test and test_size is None:
        splits = ["train"] if isinstance(source, datasets.Dataset) else list(source)
        raise ValueError(
            f"{name!r} has no test split (its splits: {splits}; a single parquet file or saved Dataset is one train "
            "split), and its training data cannot be its test split: pass test_size=N (recipes: --test-from-train "
            "N) to hold out N of its examples, stratified and fixed, as the test split, or add a test split (a "
            "'test' split saved with DatasetDict.save_to_disk, test.parquet beside train.parquet, a test/ folder)"
        )
    source_split = "test" if split == "test" and has_test else "train"
    ds = _source_split(source, source_split)
    if len(ds) == 0:
        raise ValueError(f"the {source_split!r} split of {name!r} holds no examples")
    missing = [column for column in (image_column, label_column) if column not in ds.column_names]
    if missing:
        raise ValueError(f"column(s) {missing} not found in {name!r}; it has columns {ds.column_names}")
    feature = ds.features[image_column]
    if not (isinstance(feature, datasets.Image) or (isinstance(feature, dict) and "bytes" in feature)):
        raise ValueError(f"column {image_column!r} does not hold images, its feature is {feature}")
    ds = ds.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image())
    labels = _read_labels(ds, label_column)
    num_classes = num_classes or _infer_num_classes(source, label_column)
    _check_labels(torch.from_numpy(labels), num_classes)
    if source_split == "train" and len(np.unique(labels)) < 2:
        raise ValueError(
            f"the training data of {name!r} holds a single class (label {labels[0]}): a classifier needs at least two"
        )

    positions = np.arange(len(labels))
    if source_split == "train" and test_size is not None:
        positions, test_positions = _hold_out(labels, test_size, TEST_SPLIT_SEED, name="test_size")
        if split == "test":
            positions = test_positions
    if split != "test":
        if val_size is None:
            classes = len(np.unique(labels[positions]))
            val_size = spec.val_size if spec is not None else max(classes, round(0.1 * len(positions)))
        train_positions, val_positions = _hold_out(labels[positions], val_size, seed)
        positions = positions[val_positions if split == "validation" else train_positions]

    mode = _local_mode(source, image_column, name) if spec is None else "RGB" if spec.in_chans == 3 else "L"
    images = _decode_images(ds, positions, image_column, mode, f"{name!r} ({source_split} split)")
    if spec is not None and images.shape[-2:] != (spec.image_size, spec.image_size):
        raise ValueError(
            f"{name!r} images must be {spec.image_size}x{spec.image_size}, got {images.shape[-2]}x{images.shape[-1]}"
        )
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels[positions]),
        index=torch.from_numpy(positions.astype(np.int64)),
        num_classes=num_classes,
        name=name,
        split=split,
    )


def load_split(
    dataset: str,
    split: str,
    *,
    path: str | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    split_seed: int = 0,
    train_size: int | None = None,
) -> ImageDataset:
    """One split of a training run's data, made exactly as the run made it.

    The arguments are what a run records under `data` in its config.json; every split of one run is loaded with
    the same ones, so its train, validation and test splits never overlap. Columns and the number of classes are
    the registry's (or inferred, for local data), as in training.

    Args:
        dataset: Registry name or local dataset path.
        split: "train", "validation" or "test".
        path: Local copy of a registry dataset, or None for the Hub (or the embedded `digits`).
        val_size: Examples held out of the train split for validation; None for the dataset's default.
        test_size: Examples of the train split held out as the test split, for data without one; else None.
        split_seed: Seed of the stratified validation hold-out (and of the training subset).
        train_size: The run trained on a stratified subset of this many examples of its train split
            (``--train-size``): the train split is that subset; None for the whole split. The other splits are
            the same either way.

    Returns:
        The split as an `ImageDataset` (see `load_dataset`, which raises the errors).

    Raises:
        ValueError: ``train_size`` is not smaller than the train split.
    """
    data = load_dataset(dataset, split, path=path, val_size=val_size, test_size=test_size, seed=split_seed)
    if split == "train" and train_size is not None:
        data = training_subset(data, train_size, seed=split_seed)[1]
    return data


def training_subset(train: ImageDataset, size: int, *, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(the other examples, a stratified subset of ``size``) of a training split, seeded with ``seed``: what a run
    with ``--train-size`` trains on, and what ``load_split`` gives back for it."""
    check_int("train_size", size, 1)
    if size >= len(train):
        raise ValueError(f"train_size must be < {len(train)}, the training split's size, got {size}")
    return train.hold_out(size, "train", seed=seed)


def _split_positions(labels: np.ndarray, split: str, val_size: int, seed: int) -> np.ndarray:
    """Positions of `split` in its source split: all of the test split, else one side of the stratified hold-out."""
    if split == "test":
        return np.arange(len(labels))
    train_positions, val_positions = _hold_out(labels, val_size, seed)
    return val_positions if split == "validation" else train_positions


def _idx_folder(name: str, spec: DatasetSpec, path: str | None) -> Path | None:
    """The folder to read IDX files from: `path` when it holds them, else the first of the spec's folders that
    does; None sends the load on to `path`'s other formats or the Hub."""
    candidates = spec.idx_folders if path is None else (path,)
    return next((Path(f) for f in candidates if find_idx_files(f, "train") or find_idx_files(f, "test")), None)


def _load_idx(name: str, spec: DatasetSpec, folder: Path, split: str, val_size: int, seed: int) -> ImageDataset:
    """One split of a dataset stored as the four standard IDX files; index as for the other registry datasets."""
    images, labels = read_idx_split(
        folder, "test" if split == "test" else "train", image_size=spec.image_size, num_classes=spec.num_classes
    )
    positions = _split_positions(labels, split, val_size, seed)
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images[positions][:, None])),
        labels=torch.from_numpy(labels[positions]),
        index=torch.from_numpy(positions.astype(np.int64)),
        num_classes=spec.num_classes,
        name=name,
        split=split,
    )


def _from_hub(name: str, spec: DatasetSpec) -> datasets.DatasetDict:
    """The registry dataset from the Hub (or the Hub's local cache); a failure says how to provide it locally."""
    import datasets

    try:
        return datasets.load_dataset(spec.repo, spec.config)
    except Exception as err:  # offline, unknown repository, network errors: all end the same way for the user
        local = f", or install the IDX files in {', '.join(spec.idx_folders)}" if spec.idx_folders else ""
        if DEBIAN_FASHION_MNIST in spec.idx_folders:
            local += " (Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
        config = "" if spec.config is None else f", {spec.config!r}"
        raise ValueError(
            f"{name!r} could not be fetched: could not load {spec.repo} from the Hub ({type(err).__name__}: "
            f"{' '.join(str(err).split())}). To run without network, save it where there is network with "
            f"datasets.load_dataset({spec.repo!r}{config}).save_to_disk(FOLDER), copy FOLDER here and pass it as "
            f"path=FOLDER (recipes: --data-path FOLDER){local}"
        ) from err


def _load_digits(split: str, val_size: int, seed: int) -> ImageDataset:
    """The embedded digits split described in `load_dataset`."""
    digits = sklearn.datasets.load_digits()
    labels = digits.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    if split == "test":
        chosen = index = np.sort(test)
    else:
        rest = np.sort(rest)
        train_positions, val_positions = _hold_out(labels[rest], val_size, seed)
        if split == "validation":
            chosen = index = rest[val_positions]
        else:
            chosen, index = rest[train_positions], np.arange(len(train_positions))
    pixels = torch.from_numpy(digits.images[chosen]).float().div(16).unsqueeze(1)
    images = F.interpolate(pixels, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels[chosen]),
        index=torch.from_numpy(index.astype(np.int64)),
        num_classes=10,
        name="digits",
        split=split,
    )


def get_split(name: str, split: str, **kwargs: object) -> tuple[Tensor, Tensor]:
    """Exactly the examples robustmix trains and evaluates on, for an outside evaluator.

    Args:
        name: Registry name or local dataset path, as for `load_dataset`.
        split: "train", "validation" or "test".
        **kwargs: Keyword arguments of `load_dataset` (path, columns, num_classes, val_size, seed).

    Returns:
        Images float32 [N, C, H, W] with pixels in [0,1], and labels int64 [N].
    """
    return load_dataset(name, split, **kwargs).tensors()


def augment_cifar(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after 4-pixel zero padding, then random horizontal flip, per example, on the batch's device.

    Matches torchvision's `RandomCrop(size, padding=4)` + `RandomHorizontalFlip()`: offsets are uniform in 0..8
    pixels along each axis and each image flips with probability 1/2. Random numbers are drawn on the generator's
    device, so a seeded generator gives the same batch on CPU and GPU.

    Args:
        images: [B, C, H, W] batch, pixels in [0,1].
        generator: Source of randomness; the global one when None.

    Returns:
        Augmented batch, same shape, dtype and device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    draw_device = images.device if generator is None else generator.device
    offsets = torch.randint(0, 2 * CIFAR_PAD + 1, (2, b, 1), generator=generator, device=draw_device)
    flip = torch.randint(0, 2, (b, 1), generator=generator, device=draw_device).bool()
    offsets, flip = offsets.to(images.device), flip.to(images.device)
    rows = offsets[0] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    cols = offsets[1] + torch.where(flip, w - 1 - cols, cols)
    padded = F.pad(images, (CIFAR_PAD,) * 4)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: the gather yields [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on `seed`.

    Args:
        dataset: Map-style dataset, usually an `ImageDataset`.
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch.
        seed: Seed of the loader's own generator (shuffling and worker seeds).
        drop_last: Drop the last incomplete batch.
        num_workers: Worker processes; must be 0 for a GPU-resident dataset.

    Returns:
        The DataLoader; its batches are dicts of stacked "image", "label" and "index" tensors.
    """
    if num_workers > 0 and isinstance(dataset, ImageDataset) and dataset.images.device.type != "cpu":
        raise ValueError(f"a dataset on {dataset.images.device} must be loaded with num_workers=0")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if len(labels) > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def _hold_out(labels: np.ndarray, size: int, seed: int, *, name: str = "val_size") -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) positions of a stratified hold-out of `size` examples; `name` is the size's name in
    errors."""
    n = len(labels)
    if not 0 <= size < n:
        raise ValueError(f"{name} must lie in [0, {n}) for a train split of {n} examples, got {size}")
    positions = np.arange(n)
    if size == 0:
        return positions, positions[:0]
    classes, counts = np.unique(labels, return_counts=True)
    k = len(classes)
    if counts.min() < 2:
        raise ValueError(
            f"{n} examples of {k} classes are too few for a stratified hold-out ({name}={size}): both sides need an "
            f"example of every class, so every class needs 2 examples, and class {classes[counts.argmin()]} has 1"
        )
    if not k <= size <= n - k:
        raise ValueError(
            f"{name}={size} cannot be held out of {n} examples of {k} classes stratified: both sides need an example "
            f"of every class, so {name} must lie in [{k}, {n - k}]"
        )
    kept, held = train_test_split(positions, test_size=size, stratify=labels, random_state=seed)
    return np.sort(kept), np.sort(held)


def _read_local(path: str) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    local = Path(path)
    if not local.exists():
        raise ValueError(f"local dataset path {path!r} does not exist")
    if local.is_file():
        if local.suffix != ".parquet":
            raise ValueError(f"{path!r} is a file but not a .parquet file; pass a parquet file or a folder")
        return datasets.Dataset.from_parquet(str(local))
    if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
        return datasets.load_from_disk(str(local))
    builder = "parquet" if any(local.rglob("*.parquet")) else "imagefolder"
    try:
        return datasets.load_dataset(builder, data_dir=str(local))
    except datasets.data_files.EmptyDatasetError as err:
        raise ValueError(
            f"local dataset folder {path!r} holds no data files: expected a save_to_disk folder, parquet files or "
            "images in class folders (class_name/image.png, under optional train/ and test/)"
        ) from err


def _source_split(source: datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if split not in source:
        raise ValueError(f"the source has no {split!r} split; it has splits {list(source)}")
    return source[split]


def _read_labels(ds: datasets.Dataset, label_column: str) -> np.ndarray:
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[:][label_column])
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label column {label_column!r} must hold integers (or a ClassLabel), got {ds.features[label_column]}"
        )
    return labels.astype(np.int64)


def _infer_num_classes(source: datasets.Dataset | datasets.DatasetDict, label_column: str) -> int:
    import datasets

    splits = [source] if isinstance(source, datasets.Dataset) else list(source.values())
    splits = [ds for ds in splits if label_column in ds.column_names]
    feature = splits[0].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return max(int(_read_labels(ds, label_column).max(initial=-1)) for ds in splits) + 1


def _local_mode(source: datasets.Dataset | datasets.DatasetDict, image_column: str, name: str) -> str:
    """Grayscale ("L") when every image of every split of a local dataset is, else "RGB"; reads headers only."""
    import datasets

    splits = {"train": source} if isinstance(source, datasets.Dataset) else dict(source)
    for split, ds in splits.items():
        if image_column not in ds.column_names:
            continue
        raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        for start in range(0, len(raw), _DECODE_CHUNK):
            for row, item in enumerate(raw[start : start + _DECODE_CHUNK][image_column], start):
                try:
                    with PIL.Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]) as image:
                        mode = image.mode
                except (OSError, SyntaxError, TypeError) as err:
                    raise _undecodable(f"{name!r} ({split} split)", row, image_column, err) from err
                if mode not in _GRAYSCALE_MODES:
                    return "RGB"
    return "L"


def _decode_images(ds: datasets.Dataset, positions: np.ndarray, image_column: str, mode: str, where: str) -> Tensor:
    """uint8 [N, C, H, W] from the rows `positions` of an image column, converted to PIL `mode` ("RGB" or "L");
    `where` names the dataset and split in errors."""
    import datasets

    ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(mode=mode)).with_format("numpy")
    chunks = []
    for start in range(0, len(positions), _DECODE_CHUNK):
        rows = positions[start : start + _DECODE_CHUNK]
        try:
            chunk = ds[rows][image_column]
        except (OSError, SyntaxError, ValueError):  # find the row to name: decode its images one by one
            for row in rows:
                try:
                    ds[int(row)]
                except (OSError, SyntaxError, ValueError) as row_err:
                    raise _undecodable(where, int(row), image_column, row_err) from row_err
            raise
        if chunk.dtype == object or (chunks and chunk.shape[1:] != chunks[0].shape[1:]):
            raise ValueError(f"images in column {image_column!r} differ in size; resize them to one size first")
        chunks.append(chunk)
    pixels = np.concatenate(chunks)
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _undecodable(where: str, row: int, image_column: str, err: Exception) -> ValueError:
    return ValueError(f"{where}: the image in row {row} (column {image_column!r}) cannot be decoded: {err}")


def check_disjoint(test: ImageDataset, *training: ImageDataset) -> int:
    """Check that the test split is not training data: count its images byte-identical to a training image.

    Images are compared as stored (after decoding and channel conversion). More than `MAX_SHARED_FRACTION` of the
    test split shared is an error; fewer (a benchmark's few duplicates across its official splits) a warning.

    Args:
        test: The test split.
        *training: The splits a model is trained or selected on (train, validation, a meta split...).

    Returns:
        The number of test images that equal a training image.

    Raises:
        ValueError: More than `MAX_SHARED_FRACTION` of the test images equal training images.
    """
    seen = {_image_digest(image) for data in training for image in data.images.cpu()}
    shared = [int(i) for i, image in zip(test.index.tolist(), test.images.cpu()) if _image_digest(image) in seen]
    if not shared:
        return 0
    message = (
        f"{len(shared)} of the {len(test)} test images of {test.name!r} equal training or validation images "
        f"(test index {', '.join(map(str, shared[:5]))}{', ...' if len(shared) > 5 else ''})"
    )
    if len(shared) > MAX_SHARED_FRACTION * len(test):
        raise ValueError(
            f"{message}: the test split would measure memorization. Give the dataset a test split of other images, "
            "or hold one out of its training data with test_size (recipes: --test-from-train N)"
        )
    warnings.warn(f"{message}; the test accuracy counts them", UserWarning, stacklevel=2)
    return len(shared)


def _image_digest(image: Tensor) -> bytes:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()
