"""The training order: a seeded permutation per epoch, batches drawn from it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pimjax.data import Dataset


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int,
                  rows: slice | None = None) -> Iterator:
    """(images, labels) batches of one epoch in its seeded order, last partial batch dropped.

    ``rows``: only these rows of every batch (a process's share of a batch split over
    processes, :func:`pimjax.distributed.process_rows`); the batches are the same.
    """
    perm = epoch_permutation(seed, epoch, len(dataset))
    for i in range(len(dataset) // batch_size):
        idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
        if rows is not None:
            idx = idx[rows]
        yield dataset.images[idx], dataset.labels[idx]
