"""The in-memory dataset split that every loader returns."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays make `==` ambiguous
class Dataset:
    """One split of an image-classification dataset held in memory."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    name: str  # one of DATASETS
    split: str  # "train" | "test"
    tag: str  # provenance carried into results: "mnist", "cifar10-jpeg", "tfds:mnist", ...
    num_classes: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
            raise ValueError(f"labels must be int32 [{len(self.images)}], got "
                             f"{self.labels.dtype} {self.labels.shape}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive int")
        self.check_labels()

    def check_labels(self) -> None:
        """Raise a one-line ValueError naming the split unless every label is in [0, classes)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:  # a label out of range would train silently, or be scored wrong
            i = int(bad[0])
            raise ValueError(f"the {self.name} {self.split} split has label {self.labels[i]} at "
                             f"index {i} ({bad.size} out of range): labels must be in "
                             f"[0, {self.num_classes}); fix the labels or drop those examples")

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)
