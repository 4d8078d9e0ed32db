"""The in-memory image dataset every stage passes around."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privimage_core.errors import DataError

# Where an ImageSet's class list comes from. Every value but "labels" is a
# declaration made before any record is read (fixed built-in lists, the
# config, a file's schema metadata, an ImageFolder's directory names, or the
# code that built the set); "labels" means the list was read off the records,
# which DP forbids for the sensitive set (sources.validate_sensitive): one
# record with a unique or maximal label would change the histogram's shape.
CLASS_SOURCES = ("caller", "builtin", "config", "metadata", "folders", "labels")


def writable_tensor(a: np.ndarray):
    """A torch tensor of ``a``; a copy when ``a`` is read-only (arrays from
    Ray's object store or Parquet are): torch.from_numpy would share the
    buffer and warn that writing to it is undefined."""
    # lazy: ImageSet is numpy; torch only for tensor views
    import torch
    return torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)


@dataclass
class ImageSet:
    """Images with integer labels.

    images: uint8 array [N, H, W, C] (C = 1 for grayscale, 3 for RGB).
    labels: int64 array [N], indices into ``class_names``.
    class_names: the name of each label index (public pools use namespaced
      names such as ``glyph/7`` or ``fmnist/Bag``).
    name: a short name of the dataset for messages and manifests.
    classes_from: where ``class_names`` comes from, one of CLASS_SOURCES.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str = "dataset"
    meta: dict = field(default_factory=dict)
    classes_from: str = "caller"

    def __post_init__(self) -> None:
        if self.classes_from not in CLASS_SOURCES:
            raise DataError(f"{self.name}: classes_from={self.classes_from!r}; use one of "
                            f"{', '.join(CLASS_SOURCES)}")
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"{self.name}: images must be uint8 [N,H,W,C], got {self.images.dtype} "
                f"{self.images.shape}; convert them with np.asarray(x, np.uint8)")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels; "
                            "give one label per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: np.ndarray, name: str | None = None) -> "ImageSet":
        # per-image meta arrays (e.g. the public pool's 'source') follow the rows
        n = len(self)
        meta = {k: (v[idx] if isinstance(v, np.ndarray) and len(v) == n else v)
                for k, v in self.meta.items()}
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names),
                        name or self.name, meta, self.classes_from)

    def to_tensor(self):
        """Float tensor [N, C, H, W] in [-1, 1], the scale the models use."""
        x = writable_tensor(self.images).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0
