"""Optional TensorFlow-Datasets loader (`pip install -e ".[tfds]"`, needs TensorFlow)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np

from pimjax.data.dataset import Dataset
from pimjax.data.registry import check_name, check_split


def load_tfds(name: str, split: str, manual_dir: str | os.PathLike | None = None,
              data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset split through tensorflow-datasets (optional extra, needs TensorFlow)."""
    name, split = check_name(name), check_split(split)
    try:
        tfds = importlib.import_module("tensorflow_datasets")
        if importlib.util.find_spec("tensorflow") is None:
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    except ImportError as e:
        raise ImportError(
            f"load_tfds needs tensorflow-datasets and TensorFlow ({e}); they are an optional "
            'extra: pip install -e ".[tfds]". Without them use pimjax.data.load_dataset with '
            "local files.") from e
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    if manual_dir is not None:
        # Files already in manual_dir are used instead of downloading them (their registered
        # checksums are still checked); try_download_gcs=False keeps TFDS off its GCS mirror.
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                              try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
    else:
        builder.download_and_prepare()
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
    return Dataset(images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int32),
                   name=name, split=split, tag=f"tfds:{name}",
                   num_classes=int(builder.info.features["label"].num_classes))
