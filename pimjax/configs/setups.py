"""Named setups: a model on a dataset with its training recipe and evaluation sizes.

``lenet5``, ``vgg11-narrow`` and ``resnet20-narrow`` are sized for a few CPU cores;
``vgg11`` and ``resnet18-cifar100`` are the paper's models at full width with its sizes
(1000 chips, the full test set, 100 epochs of SGD), for a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pimjax.devices import DeviceConfig
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig
from pimjax.train import DataConfig, EvalConfig, OptimConfig, PTQConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model on a dataset, its training recipe and the evaluation sizes of its experiments."""

    name: str
    model: ModelConfig
    dataset: str
    optim: OptimConfig
    train_images: int | None = None  # None: the whole training split
    test_images: int | None = 1000  # test images per chip (None: the whole test split)
    chips: int = 200  # Monte-Carlo chips per evaluation
    paper_size: bool = False  # the paper's sizes: hours on a GPU
    act_bits: int = 4  # claim 1's activation bits (VGG-11: 8, the paper's A8W4 reference)

    def train_config(self, train_method: str = "fp", quant: str | QuantConfig = "fp",
                     sigma_within: float = 0.0, sigma_between: float = 0.0,
                     between_granularity: str = "chip", *, dataset: str | None = None,
                     data_dir: str | None = None, epochs: int | None = None,
                     train_images: int | None = None, test_images: int | None = None,
                     batch_size: int | None = None, seed: int = 0, width: float | None = None,
                     digital_first_last: bool = False, ptq_from: str | None = None,
                     calib_batches: int = 50) -> TrainConfig:
        """The :class:`TrainConfig` of one run of this setup (None: the setup's value; for
        ``train_images``/``test_images`` None means the whole split; ``width`` None: the
        setup's channel multiplier)."""
        quant = quant if isinstance(quant, QuantConfig) else QuantConfig.parse(quant)
        optim = dataclasses.replace(self.optim, epochs=epochs or self.optim.epochs,
                                    batch_size=batch_size or self.optim.batch_size)
        return TrainConfig(
            train_method=train_method,
            model=dataclasses.replace(self.model, width=width or self.model.width,
                                      digital_first_last=digital_first_last),
            data=DataConfig(dataset or self.dataset, data_dir, train_images, test_images),
            quant=quant,
            device=DeviceConfig(sigma_within=sigma_within, sigma_between=sigma_between,
                                between_granularity=between_granularity),
            optim=optim, eval=EvalConfig(), ptq=PTQConfig(ptq_from, calib_batches), seed=seed)


def lenet5() -> Setup:
    """LeNet-5 on MNIST (bundled): 3 epochs of Adam; minutes on two CPU cores."""
    return Setup("lenet5", ModelConfig("lenet5"), "mnist",
                 OptimConfig(optimizer="adam", lr=1e-3, epochs=3, batch_size=128))


def vgg11_narrow() -> Setup:
    """VGG-11 at width 0.25 on CIFAR-10: 5 epochs of Adam; CPU-sized."""
    return Setup("vgg11-narrow", ModelConfig("vgg11", width=0.25), "cifar10",
                 OptimConfig(optimizer="adam", lr=1e-3, epochs=5, batch_size=128), act_bits=8)


def resnet20_narrow() -> Setup:
    """ResNet-20 at width 0.5 on CIFAR-10: 5 epochs of Adam; CPU-sized."""
    return Setup("resnet20-narrow", ModelConfig("resnet20", width=0.5), "cifar10",
                 OptimConfig(optimizer="adam", lr=1e-3, epochs=5, batch_size=128))


def vgg11() -> Setup:
    """The paper's VGG-11 (width 1) on CIFAR-10: 100 epochs of SGD, 1000 chips, full test set."""
    return Setup("vgg11", ModelConfig("vgg11"), "cifar10", _paper_optim(), test_images=None,
                 chips=1000, paper_size=True, act_bits=8)


def resnet18_cifar100() -> Setup:
    """The paper's ResNet-18 (CIFAR stem) on CIFAR-100: 100 epochs of SGD, 1000 chips."""
    return Setup("resnet18-cifar100", ModelConfig("resnet18"), "cifar100", _paper_optim(),
                 test_images=None, chips=1000, paper_size=True)


def _paper_optim() -> OptimConfig:
    return OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", epochs=100, batch_size=128)


SETUPS = {"lenet5": lenet5, "vgg11-narrow": vgg11_narrow, "resnet20-narrow": resnet20_narrow,
          "vgg11": vgg11, "resnet18-cifar100": resnet18_cifar100}
SETUP_NAMES = tuple(SETUPS)
SetupName = Literal[SETUP_NAMES]  # the flag's choices


def get(name: str) -> Setup:
    """The setup called ``name``, or ValueError naming the setups."""
    if name not in SETUPS:
        raise ValueError(f"setup={name!r} is unknown: use one of {SETUP_NAMES}")
    return SETUPS[name]()


def train(setup: str = "lenet5", smoke: bool = False) -> TrainConfig:
    """The defaults of ``experiments/train.py``: a float run of ``setup`` (``smoke``: 1 epoch
    on 256 training and 64 test images, batch 32)."""
    s = get(setup)
    if smoke:
        return s.train_config(epochs=1, train_images=256, test_images=64, batch_size=32)
    return s.train_config(train_images=s.train_images)
