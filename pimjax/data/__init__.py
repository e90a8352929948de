"""Image-classification datasets: registry, offline readers, downloads, `.npz` cache, transforms.

Offline readers need only numpy and Pillow:

* IDX `.gz` files (MNIST, Fashion-MNIST), as distributed;
* the CIFAR-10/100 binary archives (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`) or
  their extracted folders;
* a tarball or folder of images laid out `<split>/<class>/*.jpg|png` (e.g. a JPEG copy of
  CIFAR-10).

`load_dataset` finds the files (pimjax.data.locate), checks that MNIST / Fashion-MNIST files
hold the dataset asked for (pimjax.data.identify), decodes them once and caches the arrays as
`.npz` (pimjax.data.cache). MNIST is bundled with the package so it loads with no data folder
and no network; the other datasets' official files are downloaded on first use unless
`download=False` or $PIMJAX_OFFLINE is set (pimjax.data.download). `info(name)` gives every
fact pimjax knows about a dataset (pimjax.data.registry). `load_tfds` is the optional
TensorFlow-Datasets path (`pip install -e ".[tfds]"`). Importing this package has no side
effects.
"""

from pimjax.data.dataset import Dataset
from pimjax.data.load import load_dataset
from pimjax.data.readers import (
    parse_cifar_records,
    read_cifar_binary,
    read_idx,
    read_idx_pair,
    read_image_tree,
)
from pimjax.data.registry import (
    CIFAR10_CLASSES,
    DATASETS,
    MEAN_STD,
    SPLITS,
    DatasetInfo,
    Fingerprint,
    OfficialFile,
    info,
)
from pimjax.data.tfds import load_tfds
from pimjax.data.transforms import augment, normalize

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "MEAN_STD",
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "Fingerprint",
    "OfficialFile",
    "augment",
    "info",
    "load_dataset",
    "load_tfds",
    "normalize",
    "parse_cifar_records",
    "read_cifar_binary",
    "read_idx",
    "read_idx_pair",
    "read_image_tree",
]
