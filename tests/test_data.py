import datasets
import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import sklearn.datasets
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from robustmix.data import (
    DATASETS,
    ImageDataset,
    augment_cifar,
    check_disjoint,
    get_split,
    load_dataset,
    make_dataloader,
)

DIGITS_SIZES = {"train": 1257, "validation": 180, "test": 360}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variable once at import, so their module-level copies are patched too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split) for split in DIGITS_SIZES}


def _rows(images):
    return {tuple(row) for row in images.flatten(1).tolist()}


def _pixels(image):
    """Expected uint8 [C, H, W] of a PIL image after the loader's RGB conversion."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _random_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(a) for a in rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)]


# --- digits -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", list(DIGITS_SIZES))
def test_digits_split_format(digits, split):
    ds = digits[split]
    images, labels = ds.tensors()
    assert len(ds) == DIGITS_SIZES[split]
    assert images.shape == (DIGITS_SIZES[split], 1, 32, 32) and ds.image_shape == (1, 32, 32)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and ds.index.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert ds.num_classes == 10 and ds.split == split
    assert set(labels.tolist()) == set(range(10))
    assert len(set(ds.index.tolist())) == len(ds)


def test_digits_splits_are_disjoint_and_cover_all_images(digits):
    # The 1,797 digits are pairwise distinct, so pixel rows identify examples independently of the index.
    rows = {split: _rows(ds.images) for split, ds in digits.items()}
    assert sum(len(r) for r in rows.values()) == 1797
    assert len(rows["train"] | rows["validation"] | rows["test"]) == 1797


def test_digits_validation_is_stratified(digits):
    assert torch.bincount(digits["validation"].labels, minlength=10).tolist() == [18] * 10


@pytest.mark.parametrize("split", ["validation", "test"])
def test_digits_index_is_the_position_in_the_original_array(digits, split):
    raw = sklearn.datasets.load_digits()
    ds = digits[split]
    pixels = torch.from_numpy(raw.images[ds.index.numpy()]).float().div(16).unsqueeze(1)
    expected = F.interpolate(pixels, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(ds.images, expected)
    assert ds.labels.tolist() == raw.target[ds.index.numpy()].tolist()


def test_digits_train_index_is_dense(digits):
    assert digits["train"].index.tolist() == list(range(1257))


def test_digits_loads_are_deterministic(digits):
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, digits["train"].images)
    assert torch.equal(again.labels, digits["train"].labels)
    assert torch.equal(again.index, digits["train"].index)


def test_digits_hold_out_follows_val_size_and_seed_but_test_stays_fixed(digits):
    other = load_dataset("digits", "validation", val_size=100, seed=1)
    assert len(other) == 100 and set(other.labels.tolist()) == set(range(10))
    assert _rows(other.images) != _rows(digits["validation"].images)
    assert not _rows(other.images) & _rows(digits["test"].images)
    assert len(load_dataset("digits", "train", val_size=100, seed=1)) == 1437 - 100


def test_digits_spec_stats_match_train_split(digits):
    images, _ = digits["train"].tensors()
    spec = DATASETS["digits"]
    assert images.mean().item() == pytest.approx(spec.mean[0], abs=1e-3)
    assert images.std().item() == pytest.approx(spec.std[0], abs=1e-3)


# --- registry datasets from local copies --------------------------------------------------------------------------

REGISTRY_SCHEMAS = [
    ("cifar10", "img", "label", 10),
    ("cifar100", "img", "fine_label", 100),
    ("svhn", "image", "label", 10),
]


def _registry_copy(tmp_path, image_column, label_column, num_classes):
    """A tiny DatasetDict with a registry schema saved with save_to_disk: (path, {split: (images, labels)})."""
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(num_classes)})
    train_images = _random_images(40, seed=1)
    # Grayscale, RGBA and palette images must come out as RGB, as the Hub's files sometimes hold them.
    train_images[3] = train_images[3].convert("L")
    train_images[5] = train_images[5].convert("RGBA")
    train_images[7] = train_images[7].convert("P")
    source = {
        "train": (train_images, [(i % 10) * (num_classes // 10) for i in range(40)]),
        "test": (_random_images(12, seed=2), [i % 10 for i in range(12)]),
    }
    dataset_dict = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)
            for split, (images, labels) in source.items()
        }
    )
    dataset_dict.save_to_disk(tmp_path / "copy")
    return str(tmp_path / "copy"), source


@pytest.mark.parametrize(("name", "image_column", "label_column", "num_classes"), REGISTRY_SCHEMAS)
def test_registry_dataset_loads_from_local_copy(tmp_path, name, image_column, label_column, num_classes):
    path, source = _registry_copy(tmp_path, image_column, label_column, num_classes)
    loaded = {split: load_dataset(name, split, path=path, val_size=10) for split in ("train", "validation", "test")}

    assert [len(loaded[split]) for split in ("train", "validation", "test")] == [30, 10, 12]
    assert loaded["test"].index.tolist() == list(range(12))
    train_index, val_index = set(loaded["train"].index.tolist()), set(loaded["validation"].index.tolist())
    assert not train_index & val_index and train_index | val_index == set(range(40))
    for split, ds in loaded.items():
        images, labels = source["test" if split == "test" else "train"]
        assert ds.num_classes == num_classes and ds.image_shape == (3, 32, 32)
        assert ds.images.dtype == torch.uint8
        for i, position in enumerate(ds.index.tolist()):
            item = ds[i]
            torch.testing.assert_close(item["image"], _pixels(images[position]).float() / 255)
            assert item["label"].item() == labels[position] and item["index"].item() == position


def test_registry_validation_is_stratified_and_seeded(tmp_path):
    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    val = load_dataset("cifar10", "validation", path=path, val_size=10)
    assert sorted(val.labels.tolist()) == list(range(10))
    same = load_dataset("cifar10", "validation", path=path, val_size=10)
    other = load_dataset("cifar10", "validation", path=path, val_size=10, seed=1)
    assert torch.equal(same.index, val.index) and not torch.equal(other.index, val.index)


def test_registry_dataset_loads_from_parquet_files_per_split(tmp_path):
    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    saved = datasets.load_from_disk(path)
    for split in saved:
        saved[split].to_parquet(tmp_path / "parquet" / f"{split}.parquet")
    from_parquet = load_dataset("cifar10", "test", path=str(tmp_path / "parquet"))
    from_disk = load_dataset("cifar10", "test", path=path)
    assert torch.equal(from_parquet.images, from_disk.images) and torch.equal(from_parquet.labels, from_disk.labels)


def test_registry_rejects_images_of_the_wrong_size(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(10)})
    small = datasets.Dataset.from_dict({"img": _random_images(4, size=16), "label": [0, 1, 2, 3]}, features=features)
    datasets.DatasetDict(train=small, test=small).save_to_disk(tmp_path / "small")
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("cifar10", "test", path=str(tmp_path / "small"))


# --- other local datasets ----------------------------------------------------------------------------------------


def test_local_parquet_file_with_custom_columns(tmp_path):
    images = [image.convert("L") for image in _random_images(6)]
    ds = datasets.Dataset.from_dict(
        {"picture": images, "digit": [0, 4, 2, 0, 4, 2]},
        features=datasets.Features({"picture": datasets.Image(), "digit": datasets.Value("int64")}),
    )
    ds.to_parquet(tmp_path / "data.parquet")

    loaded = load_dataset(
        str(tmp_path / "data.parquet"), "train", image_column="picture", label_column="digit", val_size=0
    )

    # Grayscale stays one channel; num_classes comes from the largest label.
    assert loaded.image_shape == (1, 32, 32) and loaded.num_classes == 5
    expected = torch.stack([torch.from_numpy(np.asarray(image).copy()) for image in images]).unsqueeze(1)
    assert torch.equal(loaded.images, expected)
    assert loaded.labels.tolist() == [0, 4, 2, 0, 4, 2]


def test_local_imagefolder(tmp_path):
    images = _random_images(8)
    for i, image in enumerate(images):
        split = "train" if i < 6 else "test"
        folder = tmp_path / "folder" / split / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")

    test = load_dataset(str(tmp_path / "folder"), "test")
    train = load_dataset(str(tmp_path / "folder"), "train", val_size=2)

    assert test.num_classes == 2 and len(test) == 2 and len(train) == 4
    # Class ids follow the sorted folder names: cat=0, dog=1.
    test_rows = {tuple(image.flatten().tolist()): label for image, label in zip(test.images, test.labels.tolist())}
    assert test_rows == {tuple(_pixels(images[i]).flatten().tolist()): 1 - i % 2 for i in (6, 7)}


def test_local_dataset_defaults_to_ten_percent_validation(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(2)})
    ds = datasets.Dataset.from_dict(
        {"image": _random_images(20), "label": [i % 2 for i in range(20)]}, features=features
    )
    ds.save_to_disk(tmp_path / "single")
    assert len(load_dataset(str(tmp_path / "single"), "validation")) == 2
    assert len(load_dataset(str(tmp_path / "single"), "train")) == 18


# --- ImageDataset, get_split, make_dataloader ---------------------------------------------------------------------


def test_get_split_returns_what_the_dataset_holds(digits, tmp_path):
    images, labels = get_split("digits", "test")
    assert torch.equal(images, digits["test"].images) and torch.equal(labels, digits["test"].labels)

    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    images, labels = get_split("cifar10", "validation", path=path, val_size=10)
    ds = load_dataset("cifar10", "validation", path=path, val_size=10)
    assert images.dtype == torch.float32
    assert torch.equal(images, ds.images.float() / 255) and torch.equal(labels, ds.labels)


def test_image_dataset_to_device_copies():
    ds = ImageDataset(
        images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([0, 1]),
        index=torch.tensor([5, 7]),
        num_classes=2,
        name="toy",
        split="train",
    )
    moved = ds.to("cpu")
    assert moved is not ds and moved.name == "toy" and torch.equal(moved.index, ds.index)
    assert ds[1]["index"].item() == 7 and ds[1]["image"].dtype == torch.float32


def test_make_dataloader_shuffles_reproducibly(digits):
    def order(seed):
        loader = make_dataloader(digits["validation"], 32, shuffle=True, seed=seed)
        return torch.cat([batch["index"] for batch in loader]).tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == sorted(digits["validation"].index.tolist())
    batch = next(iter(make_dataloader(digits["validation"], 32, shuffle=False, seed=0, drop_last=True)))
    assert batch["image"].shape == (32, 1, 32, 32) and batch["label"].shape == (32,)


# --- augment_cifar -----------------------------------------------------------------------------------------------


def _candidates(image, pad=4):
    """Every crop of the zero-padded image, unflipped and flipped, as [2 * (2*pad+1)**2, C, H, W]."""
    _, h, w = image.shape
    padded = F.pad(image, (pad,) * 4)
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_augment_cifar_outputs_a_shifted_or_flipped_copy(b, c, h, w, seed):
    images = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.1
    out = augment_cifar(images, torch.Generator().manual_seed(seed))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    for image, augmented in zip(images, out):
        assert (_candidates(image) == augmented).flatten(1).all(1).any()


def test_augment_cifar_one_case_exactly():
    image = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4) / 16
    outs = augment_cifar(image.expand(2048, -1, -1, -1), torch.Generator().manual_seed(0))
    # Shifted 2 pixels down and 1 right (offsets 2 and 3 of 0..8), then flipped: zeros enter at the top and left.
    expected = torch.zeros(1, 4, 4)
    expected[:, 2:, 1:] = image[0, :, :2, :3]
    expected = expected.flip(-1)
    assert (outs == expected).flatten(1).all(1).any()


def test_augment_cifar_is_deterministic_and_varied():
    images = torch.rand(64, 3, 8, 8)
    first = augment_cifar(images, torch.Generator().manual_seed(0))
    assert torch.equal(first, augment_cifar(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augment_cifar(images, torch.Generator().manual_seed(1)))
    flipped = [(_candidates(image)[81:] == out).flatten(1).all(1).any().item() for image, out in zip(images, first)]
    assert 0 < sum(flipped) < 64


@pytest.mark.gpu
def test_augment_cifar_on_gpu_matches_cpu_for_a_cpu_generator():
    images = torch.rand(16, 3, 32, 32)
    on_cpu = augment_cifar(images, torch.Generator().manual_seed(0))
    on_gpu = augment_cifar(images.cuda(), torch.Generator().manual_seed(0))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


# --- errors ------------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*cifar10.*digits"):
        load_dataset("imagenet")


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")


def test_missing_column_names_existing_columns(tmp_path):
    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    with pytest.raises(ValueError, match=r"\['picture'\] not found.*\['img', 'label'\]"):
        load_dataset("cifar10", "test", path=path, image_column="picture")


def test_label_out_of_range(tmp_path):
    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        load_dataset("cifar10", "test", path=path, num_classes=5)


def test_missing_split_names_existing_splits(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(2)})
    ds = datasets.Dataset.from_dict({"image": _random_images(4), "label": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict(train=ds).save_to_disk(tmp_path / "train_only")
    with pytest.raises(ValueError, match=r"has no test split \(its splits: \['train'\]"):
        load_dataset(str(tmp_path / "train_only"), "test")


def test_non_integer_labels(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": _random_images(2), "label": ["cat", "dog"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    ds.to_parquet(tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match="must hold integers"):
        load_dataset(str(tmp_path / "strings.parquet"), "train")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "validation", "val_size": 0}, "needs val_size > 0"),
        ({"val_size": 1437}, r"val_size must lie in \[0, 1437\)"),
        ({"path": "/tmp"}, r"embedded.*\['path'\]"),
    ],
)
def test_bad_digits_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


def test_image_dataset_rejects_unnormalized_float_pixels():
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        ImageDataset(
            images=torch.full((1, 3, 2, 2), 2.0),
            labels=torch.tensor([0]),
            index=torch.tensor([0]),
            num_classes=1,
            name="toy",
            split="train",
        )


def test_hold_out_is_stratified_disjoint_and_keeps_indices():
    train = load_dataset("digits", "train")
    rest, meta = train.hold_out(100, "meta", seed=0)
    assert len(rest) + len(meta) == len(train) and len(meta) == 100 and meta.split == "meta"
    assert not set(rest.index.tolist()) & set(meta.index.tolist())
    assert sorted(rest.index.tolist() + meta.index.tolist()) == sorted(train.index.tolist())
    assert set(meta.labels.tolist()) == set(range(10))  # stratified: every class is present
    again = train.hold_out(100, "meta", seed=0)[1]
    assert torch.equal(again.index, meta.index)


# --- local data without a test split, test splits of training images, image modes ---------------------------------

LAYOUTS = ("parquet file", "saved Dataset", "image folder", "parquet folder")


def _local_copy(tmp_path, layout, images, labels, *, image_column="image", label_column="label") -> str:
    """`images` and `labels` as one train split without a test split, in `layout`; returns the path."""
    if layout == "image folder":
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "folder" / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.png")
        return str(tmp_path / "folder")
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)
    if layout == "parquet file":
        ds.to_parquet(tmp_path / "data.parquet")
        return str(tmp_path / "data.parquet")
    if layout == "parquet folder":
        ds.to_parquet(tmp_path / "parquet" / "train.parquet")
        return str(tmp_path / "parquet")
    ds.save_to_disk(tmp_path / "saved")
    return str(tmp_path / "saved")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_data_without_a_test_split_never_tests_on_its_training_data(tmp_path, layout):
    path = _local_copy(tmp_path, layout, _random_images(40), [i % 4 for i in range(40)])
    with pytest.raises(ValueError, match=r"has no test split.*cannot be its test split: pass test_size=N"):
        load_dataset(path, "test")
    assert len(load_dataset(path, "train")) == 36  # all of it, less the validation hold-out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_test_size_holds_out_a_fixed_stratified_test_split(tmp_path, layout):
    images, labels = _random_images(40), [i % 4 for i in range(40)]
    path = _local_copy(tmp_path, layout, images, labels)
    splits = {split: load_dataset(path, split, test_size=8) for split in ("train", "validation", "test")}
    assert [len(splits[split]) for split in ("train", "validation", "test")] == [28, 4, 8]
    index = {split: set(ds.index.tolist()) for split, ds in splits.items()}
    assert not index["train"] & index["test"] and not index["validation"] & index["test"]
    assert index["train"] | index["validation"] | index["test"] == set(range(40))
    assert sorted(splits["test"].labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # The test split does not move with the validation seed: every run seed tests on the same examples.
    other_seed = load_dataset(path, "test", test_size=8, seed=1)
    assert torch.equal(other_seed.index, splits["test"].index)
    assert index["test"] & set(load_dataset(path, "validation", test_size=8, seed=1).index.tolist()) == set()
    if layout != "image folder":  # an image folder numbers its rows by file order; the others keep the source's
        for i, position in enumerate(splits["test"].index.tolist()):
            assert torch.equal(splits["test"].images[i], _pixels(images[position]))
            assert splits["test"].labels[i].item() == labels[position]


def test_a_registry_copy_without_a_test_split_needs_test_size(tmp_path):
    path = _local_copy(tmp_path, "parquet file", _random_images(40), [i % 10 for i in range(40)], image_column="img")
    with pytest.raises(ValueError, match=r"'cifar10' has no test split"):
        load_dataset("cifar10", "test", path=path, val_size=10)
    test = load_dataset("cifar10", "test", path=path, val_size=10, test_size=10)
    train = load_dataset("cifar10", "train", path=path, val_size=10, test_size=10)
    assert len(test) == 10 and len(train) == 20 and test.image_shape == (3, 32, 32)
    assert not set(test.index.tolist()) & set(train.index.tolist())


def test_test_size_is_refused_for_data_with_a_test_split(tmp_path):
    path, _ = _registry_copy(tmp_path, "img", "label", 10)
    with pytest.raises(ValueError, match="has a test split of its own; test_size"):
        load_dataset("cifar10", "train", path=path, test_size=5)
    with pytest.raises(ValueError, match=r"test_size must be an integer >= 1"):
        load_dataset(str(tmp_path / "copy"), "train", test_size=0)
    with pytest.raises(ValueError, match=r"\['test_size'\] do not apply"):
        load_dataset("digits", "train", test_size=5)


def test_one_color_image_anywhere_makes_every_split_rgb(tmp_path):
    """The image mode is decided over every image of every split, not taken from the first one."""
    grey = [image.convert("L") for image in _random_images(24)]
    test = list(grey[20:])
    test[2] = _random_images(1, seed=5)[0]  # one RGB image, in the test split, not first
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(2)})
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": grey[:20], "label": [i % 2 for i in range(20)]}, features=features),
        test=datasets.Dataset.from_dict({"image": test, "label": [0, 1, 0, 1]}, features=features),
    ).save_to_disk(tmp_path / "mixed")
    for split in ("train", "validation", "test"):
        ds = load_dataset(str(tmp_path / "mixed"), split)
        assert ds.image_shape == (3, 32, 32), split
    train = load_dataset(str(tmp_path / "mixed"), "train")
    assert torch.equal(train.images[0], _pixels(grey[train.index[0].item()]))  # grey to RGB: three equal channels

    ordered = [image.convert("L") for image in _random_images(6)] + _random_images(1, seed=7)
    path = _local_copy(tmp_path, "parquet file", ordered, [0, 1, 0, 1, 0, 1, 0])
    assert load_dataset(path, "train", val_size=2).image_shape == (3, 32, 32)


def _images_dataset(images: torch.Tensor, split: str) -> ImageDataset:
    n = len(images)
    return ImageDataset(images, torch.arange(n) % 2, torch.arange(n), num_classes=2, name="toy", split=split)


def test_check_disjoint_refuses_a_test_split_of_training_images():
    train = _images_dataset(torch.randint(0, 256, (300, 1, 4, 4), dtype=torch.uint8), "train")
    val = _images_dataset(torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8), "validation")
    test = _images_dataset(torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8), "test")
    assert check_disjoint(test, train, val) == 0
    with pytest.raises(ValueError, match=r"200 of the 200 test images of 'toy' equal training or validation images"):
        check_disjoint(_images_dataset(train.images[:200], "test"), train, val)
    with pytest.raises(ValueError, match=r"3 of the 200 test images.*test index 0, 1, 2\)"):
        check_disjoint(_images_dataset(torch.cat([val.images[:3], test.images[3:]]), "test"), train, val)
    # A benchmark's few duplicates (at most 1% of the test split): a warning, and the count.
    with pytest.warns(UserWarning, match=r"2 of the 200 test images .*test index 0, 1\); the test accuracy counts"):
        assert check_disjoint(_images_dataset(torch.cat([train.images[:2], test.images[2:]]), "test"), train) == 2


def _corrupt(tmp_path, row: int, data: bytes) -> str:
    """A 40-image parquet file whose image ``row`` holds ``data`` instead of a PNG."""
    images = datasets.Dataset.from_dict(
        {"image": _random_images(40), "label": [i % 4 for i in range(40)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    rows = images.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[row]["image"] = {"bytes": data(rows[row]["image"]["bytes"]), "path": None}
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(tmp_path / "bad.parquet")
    return str(tmp_path / "bad.parquet")


@pytest.mark.parametrize(
    ("name", "data"), [("not an image", lambda png: b"not an image"), ("truncated", lambda png: png[:60])]
)
def test_an_image_that_cannot_be_decoded_is_named_by_its_row(tmp_path, name, data):
    path = _corrupt(tmp_path, 17, data)
    with pytest.raises(ValueError, match=r"\(train split\): the image in row 17 \(column 'image'\) cannot be decoded"):
        for split in ("train", "validation", "test"):  # the row lies in one of them
            load_dataset(path, split, test_size=8)


def test_an_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' holds no data files: expected a save_to_disk folder"):
        load_dataset(str(tmp_path / "empty"), "train")


def test_a_single_class_is_refused(tmp_path):
    path = _local_copy(tmp_path, "parquet file", _random_images(10), [3] * 10)
    with pytest.raises(ValueError, match=r"holds a single class \(label 3\): a classifier needs at least two"):
        load_dataset(path, "train")


@pytest.mark.parametrize(
    ("n", "kwargs", "message"),
    [
        (3, {"test_size": 1}, r"3 examples of 3 classes are too few for a stratified hold-out \(test_size=1\)"),
        (40, {"test_size": 2}, r"test_size=2 cannot be held out of 40 examples of 4 classes.*\[4, 36\]"),
        (40, {"test_size": 8, "val_size": 30}, r"val_size=30 cannot be held out of 32 examples of 4 classes"),
    ],
)
def test_too_few_examples_for_the_hold_outs_say_so(tmp_path, n, kwargs, message):
    path = _local_copy(tmp_path, "parquet file", _random_images(n), [i % min(n, 4) for i in range(n)])
    with pytest.raises(ValueError, match=message):
        load_dataset(path, "train", **kwargs)


def test_an_unreachable_hub_says_how_to_provide_the_data_locally():
    with pytest.raises(ValueError, match=r"'cifar10' could not be fetched.*save_to_disk\(FOLDER\).*--data-path"):
        load_dataset("cifar10", "test")


def test_robustmix_and_the_embedded_data_need_no_hugging_face_datasets(tmp_path):
    """`datasets` is imported where a Hub or local dataset is read: a machine without it (a GPU image, say) still
    imports robustmix and trains on the digits."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now fails
        "import robustmix, robustmix.cli.recipe\n"
        "from robustmix.data import load_dataset\n"
        "print(len(load_dataset('digits', 'train')))\n"
        "try:\n"
        "    load_dataset(sys.argv[1], 'train')\n"
        "except ImportError:\n"
        "    print('needs datasets')\n"
    )
    (tmp_path / "train.parquet").write_bytes(b"")  # a local dataset: reading it needs `datasets`
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1257", "needs", "datasets"]
