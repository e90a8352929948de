"""Tell which dataset a set of IDX files holds, by content: MNIST and Fashion-MNIST use the
same file names, so a folder of Fashion-MNIST loaded as "mnist" would otherwise pass silently.

The rule, applied to a split's images and labels files before anything is cached:

1. Checksums. When the SHA-256 of a file (of its bytes, compressed or not) is that of an
   official file in the registry, the file is identified with certainty: it is accepted if it
   is the requested dataset's file for this split, refused if it belongs to another dataset or
   another split.
2. Fingerprint, for files of unknown checksum (recompressed, reordered, subsets, fixtures).
   Over the N images of the file, take the sample mean of two per-image features: the mean
   pixel value and the fraction of zero pixels (registry.Fingerprint). The content *matches*
   dataset D when, for both features,
       |sample mean - D's mean| <= 5 * (D's standard deviation over images) / sqrt(N) + floor,
   i.e. within 5 standard errors of D's split, plus a floor (1% of full scale: 2.55 pixel
   levels, 0.01 zero fraction) so that near-copies (a few images changed) still match.
   The file is refused only when it matches another dataset D' AND, for both features, the
   bands of D' and of the requested dataset are disjoint at this N, so that the requested
   dataset is excluded at 5 standard errors. For MNIST against Fashion-MNIST the bands are
   disjoint from N = 40 images up (see `min_images`); smaller files are never refused.
3. Everything else is accepted: the requested dataset's own files, unknown content (synthetic
   test fixtures, uniform noise, variants such as EMNIST or KMNIST), and files too small to
   tell. Only a confident match to the *other* known dataset is refused.

The identification reads the whole file, whatever `limit` the caller asks for, and the
fingerprint does not depend on record order (a reordered copy has the official values). The
reference values are measured on the real files (tests/test_data_identify.py recomputes them).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from pimjax.data.registry import (
    DATASETS,
    IDX_FILES,
    Fingerprint,
    check_split,
    info,
    official_file,
)

SIGMAS = 5.0  # standard errors of the band around a dataset's fingerprint
FLOORS = (2.55, 0.01)  # (pixel mean, zero fraction): 1% of full scale


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def measure(images: np.ndarray) -> Fingerprint:
    """Fingerprint of a batch of uint8 images [N, ...]: (mean, std over images) of each feature."""
    flat = np.asarray(images).reshape(len(images), -1)
    if flat.size == 0:
        return Fingerprint((float("nan"), float("nan")), (float("nan"), float("nan")))
    means = flat.mean(axis=1, dtype=np.float64)
    zeros = (flat == 0).mean(axis=1, dtype=np.float64)
    return Fingerprint((float(means.mean()), float(means.std())),
                       (float(zeros.mean()), float(zeros.std())))


def _features(f: Fingerprint) -> tuple[tuple[float, float], ...]:
    return (f.pixel_mean, f.zero_fraction)


def band(ref: Fingerprint, n: int) -> tuple[float, ...]:
    """Half-width of the matching band around each feature of `ref` for a sample of n images."""
    return tuple(SIGMAS * sd / math.sqrt(n) + floor
                 for (_, sd), floor in zip(_features(ref), FLOORS, strict=True))


def matches(sample: Fingerprint, n: int, ref: Fingerprint) -> bool:
    """True when every feature of a sample of n images lies in the band around `ref`."""
    return all(abs(s[0] - r[0]) <= w for s, r, w in
               zip(_features(sample), _features(ref), band(ref, n), strict=True))


def separable(a: Fingerprint, b: Fingerprint, n: int) -> bool:
    """True when the bands of `a` and `b` are disjoint in every feature for n images."""
    return all(abs(fa[0] - fb[0]) > wa + wb for fa, fb, wa, wb in
               zip(_features(a), _features(b), band(a, n), band(b, n), strict=True))


def min_images(a: str, b: str, split: str) -> int:
    """Smallest number of images from which datasets `a` and `b` can be told apart."""
    fa, fb = info(a).fingerprint(split), info(b).fingerprint(split)
    return next(n for n in range(1, 10**6) if separable(fa, fb, n))


def check_idx(name: str, split: str, images_path: Path, labels_path: Path,
              images: np.ndarray) -> None:
    """Raise a one-line ValueError if the IDX files of `name`'s `split` hold another dataset."""
    split = check_split(split)
    official_images = False
    for path, stem in zip((images_path, labels_path), IDX_FILES[split], strict=True):
        known = official_file(sha256_file(path))
        if known is None:
            continue
        owner, f = known
        if owner != name:
            _refuse(name, owner, path, f"it is the official {info(owner).title} file {f.name}")
        if not f.name.startswith(stem):
            raise ValueError(f"{path} is the official {info(name).title} file {f.name}, not "
                             f"{stem}: put each file under its own name")
        official_images = official_images or path == images_path
    if official_images:
        return  # the requested dataset's own images: nothing left to check
    want = info(name).fingerprint(split)
    if want is None:
        return
    n = len(images)
    sample = measure(images)
    for other in DATASETS:
        ref = info(other).fingerprint(split)
        if other == name or ref is None or n == 0:
            continue
        if separable(want, ref, n) and matches(sample, n, ref):
            ((m, _), (z, _)) = _features(sample)
            ((rm, _), (rz, _)) = _features(ref)
            ((wm, _), (wz, _)) = _features(want)
            _refuse(name, other, images_path,
                    f"its {n} images have mean pixel {m:.2f} and zero-pixel fraction {z:.3f}, "
                    f"as {info(other).title}'s {split} split ({rm:.2f}, {rz:.3f}), not "
                    f"{info(name).title}'s ({wm:.2f}, {wz:.3f})")


def _refuse(name: str, other: str, path: Path, evidence: str):
    want, got = info(name), info(other)
    raise ValueError(
        f"{path} holds {got.title}, not {want.title}: {evidence}. Both use the same IDX file "
        f"names: load it as {other!r}, or point data_dir / PIMJAX_DATA_DIR at a folder with the "
        f"{want.title} files")


def check_official(name: str, paths: tuple[Path, ...], what: str, fix: str) -> None:
    """Raise a one-line ValueError unless each path has its official file's SHA-256."""
    files = {f.name: f for f in info(name).files}
    for p in paths:
        f = files[p.name]
        got = sha256_file(p)
        if got != f.sha256:
            raise ValueError(f"{what} {p} is corrupt ({p.stat().st_size} bytes, sha256 {got}; "
                             f"expected {f.size} bytes, sha256 {f.sha256}): {fix}")
