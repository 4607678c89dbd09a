"""IDX files, the format of MNIST and Fashion-MNIST: a checked reader and the four-file folder layout.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. The reader checks each part against what the caller expects
and that the data is exactly as long as the dimensions say, so a truncated download or a swapped file stops with
an error naming the file before any training.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

#: dtype code of the magic number -> numpy dtype (big-endian where it matters).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: The standard file stems of a split ("train" or "test"): images, then labels.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path, *, ndim: int, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """Read one IDX file, gzipped (by content, whatever its name) or not.

    Args:
        path: The file.
        ndim: Number of dimensions the file must have (3 for images ``[N, H, W]``, 1 for labels ``[N]``).
        dtype: The dtype the file must hold.

    Returns:
        The array, shape as the header says, in native byte order.

    Raises:
        ValueError: Unreadable or corrupt gzip data, a bad magic number, another dtype or number of dimensions,
            or data shorter or longer than the header's dimensions; the message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (its magic number must start with two zero bytes)")
    code, dims = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    want = np.dtype(dtype)
    if IDX_DTYPES[code].newbyteorder("=") != want.newbyteorder("="):
        raise ValueError(f"{path}: holds {IDX_DTYPES[code]} values, expected {want}")
    if dims != ndim:
        raise ValueError(f"{path}: has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * IDX_DTYPES[code].itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: {len(raw) - header} bytes of data, but its header {list(shape)} needs {expected} "
            "(truncated or corrupt file)"
        )
    values = np.frombuffer(raw, dtype=IDX_DTYPES[code], offset=header).reshape(shape)
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def find_idx_files(folder: str | Path, split: str) -> tuple[Path, Path] | None:
    """The images and labels files of ``split`` ("train" or "test") in ``folder``, each with or without ``.gz``.

    Returns:
        The two paths, or None when the folder holds neither file of the split.

    Raises:
        ValueError: Only one of the two files is there.
    """
    folder = Path(folder)
    found = []
    for stem in IDX_FILES[split]:
        candidates = [folder / stem, folder / f"{stem}.gz"]
        found.append(next((p for p in candidates if p.is_file()), None))
    if found == [None, None]:
        return None
    missing = [stem for stem, path in zip(IDX_FILES[split], found) if path is None]
    if missing:
        raise ValueError(f"{folder}: {missing[0]} (or {missing[0]}.gz) is missing; a split needs images and labels")
    return found[0], found[1]


def read_idx_split(
    folder: str | Path, split: str, *, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, H, W]`` and labels int64 ``[N]`` of one split of an IDX folder, checked.

    Raises:
        ValueError: Missing files, a file that ``read_idx`` rejects, images not ``image_size`` square, image and
            label counts that differ, or labels outside ``[0, num_classes)``; the message names the file.
    """
    files = find_idx_files(folder, split)
    if files is None:
        stems = " and ".join(IDX_FILES[split])
        raise ValueError(f"{folder}: no {split} split ({stems}, gzipped or not)")
    images_file, labels_file = files
    images = read_idx(images_file, ndim=3)
    labels = read_idx(labels_file, ndim=1)
    if images.shape[1:] != (image_size, image_size):
        raise ValueError(
            f"{images_file}: images are {images.shape[1]}x{images.shape[2]}, expected {image_size}x{image_size}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{labels_file}: labels must lie in [0, {num_classes}), got up to {labels.max()}")
    return images, labels.astype(np.int64)
