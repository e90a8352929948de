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

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)
