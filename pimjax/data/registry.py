"""The one table of dataset facts: shapes, classes, sizes, normalisation, official files.

Everything pimjax knows about a dataset is here, read through :func:`info`. Sizes and SHA-256 of
the official files are the ones TensorFlow-Datasets registers (its `url_checksums/*.txt`), which
for MNIST also match the copy bundled with pimjax. The content fingerprints are measured on the
real files: `tests/test_data_identify.py::test_fingerprints_match_real_files` recomputes them.
"""

from __future__ import annotations

import dataclasses

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# IDX file stems per split (MNIST and Fashion-MNIST use the same names).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class OfficialFile:
    """One file of a dataset's official distribution."""

    name: str  # file name, e.g. "train-images-idx3-ubyte.gz"
    size: int  # bytes
    sha256: str
    url: str  # official download address
    splits: tuple[str, ...]  # the splits whose records the file holds
    sha256_raw: str | None = None  # SHA-256 of the decompressed content of a .gz, when known


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Per-image statistics of one split: mean and spread over images of two pixel features.

    `pixel_mean` is an image's mean pixel value (0-255), `zero_fraction` the fraction of its
    pixels that are exactly 0; each is stored as (mean over images, standard deviation over
    images). Record order does not change them, so a reordered copy has the same fingerprint.
    """

    pixel_mean: tuple[float, float]
    zero_fraction: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Facts about one dataset: shapes, classes, split sizes, normalisation, official files."""

    name: str  # one of DATASETS
    title: str  # human-readable name
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    train_size: int
    test_size: int
    mean: tuple[float, ...]  # per-channel mean of pixel/255 over the official training split
    std: tuple[float, ...]  # per-channel std of pixel/255 over the official training split
    files: tuple[OfficialFile, ...]
    homepage: str
    fingerprints: tuple[tuple[str, Fingerprint], ...] = ()  # (split, fingerprint)

    @property
    def urls(self) -> tuple[str, ...]:
        """Download addresses of the official files."""
        return tuple(f.url for f in self.files)

    def split_size(self, split: str) -> int:
        """Number of examples in `split` of the official distribution."""
        return {"train": self.train_size, "test": self.test_size}[check_split(split)]

    def split_files(self, split: str) -> tuple[OfficialFile, ...]:
        """The official files needed to read `split`."""
        return tuple(f for f in self.files if check_split(split) in f.splits)

    def fingerprint(self, split: str) -> Fingerprint | None:
        """Content fingerprint of `split`, or None when not measured."""
        return dict(self.fingerprints).get(check_split(split))


def _idx_files(base: str, sums: dict[str, tuple[int, str]], raw: dict[str, str] | None = None):
    out = []
    for split, stems in IDX_FILES.items():
        for stem in stems:
            size, sha = sums[stem]
            out.append(OfficialFile(f"{stem}.gz", size, sha, base + f"{stem}.gz", (split,),
                                    (raw or {}).get(stem)))
    return tuple(out)


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

_INFOS = {
    i.name: i
    for i in (
        DatasetInfo(
            name="mnist", title="MNIST", image_shape=(28, 28, 1), num_classes=10,
            train_size=60000, test_size=10000, mean=(0.1307,), std=(0.3081,),
            files=_idx_files(_MNIST_URL, {
                "train-images-idx3-ubyte": (
                    9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                "train-labels-idx1-ubyte": (
                    28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                "t10k-images-idx3-ubyte": (
                    1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                "t10k-labels-idx1-ubyte": (
                    4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
            }, raw={
                "train-images-idx3-ubyte":
                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte":
                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "t10k-images-idx3-ubyte":
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte":
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            }),
            homepage="http://yann.lecun.com/exdb/mnist/",
            fingerprints=(
                ("train", Fingerprint((33.3184, 11.0411), (0.80880, 0.05288))),
                ("test", Fingerprint((33.7912, 11.1554), (0.80724, 0.05289))),
            ),
        ),
        DatasetInfo(
            name="fashion_mnist", title="Fashion-MNIST", image_shape=(28, 28, 1),
            num_classes=10, train_size=60000, test_size=10000, mean=(0.2860,), std=(0.3530,),
            files=_idx_files(_FASHION_URL, {
                "train-images-idx3-ubyte": (
                    26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                "train-labels-idx1-ubyte": (
                    29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                "t10k-images-idx3-ubyte": (
                    4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                "t10k-labels-idx1-ubyte": (
                    5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
            }),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            fingerprints=(
                ("train", Fingerprint((72.9404, 32.1453), (0.50205, 0.14848))),
                ("test", Fingerprint((73.1466, 32.0679), (0.49990, 0.14922))),
            ),
        ),
        DatasetInfo(
            name="cifar10", title="CIFAR-10", image_shape=(32, 32, 3), num_classes=10,
            train_size=50000, test_size=10000, mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            files=(OfficialFile(
                "cifar-10-binary.tar.gz", 170052171,
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                _CIFAR_URL + "cifar-10-binary.tar.gz", SPLITS),),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        ),
        DatasetInfo(
            name="cifar100", title="CIFAR-100", image_shape=(32, 32, 3), num_classes=100,
            train_size=50000, test_size=10000, mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            files=(OfficialFile(
                "cifar-100-binary.tar.gz", 168513733,
                "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                _CIFAR_URL + "cifar-100-binary.tar.gz", SPLITS),),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        ),
    )
}

# Per-channel pixel mean and std (of pixel/255) over each official training split: the usual
# published values. The JPEG copy of CIFAR-10 has train means 0.4913, 0.4821, 0.4465.
MEAN_STD = {n: (i.mean, i.std) for n, i in _INFOS.items()}


def check_name(name: str) -> str:
    """`name` if it is one of DATASETS, else a ValueError naming the choices."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return name


def check_split(split: str) -> str:
    """`split` if it is one of SPLITS, else a ValueError naming the choices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def info(name: str) -> DatasetInfo:
    """The facts about dataset `name` (one of DATASETS)."""
    return _INFOS[check_name(name)]


def official_file(sha256: str) -> tuple[str, OfficialFile] | None:
    """(dataset name, file) of the official file whose compressed or raw SHA-256 is `sha256`."""
    for name, i in _INFOS.items():
        for f in i.files:
            if sha256 in (f.sha256, f.sha256_raw):
                return name, f
    return None
