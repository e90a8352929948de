"""LeNet-5, VGG-11 and CIFAR ResNets built from analog layers.

Every conv/dense is an analog layer (quantized, perturbed by the chip, tuned);
batch norm, pooling and residual additions are digital float. With
``digital_first_last=True`` the first and last layers are digital float too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from pimjax.layers import AnalogConv, AnalogDense
from pimjax.ops import max_pool_2x2
from pimjax.perchip import Strategy
from pimjax.quant import QuantConfig

FLOAT = QuantConfig()


def _width(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _batch_norm(train: bool):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class _Model(nn.Module):
    """Common fields and checks of the models."""

    num_classes: int = 10
    quant: QuantConfig = FLOAT
    width: float = 1.0
    digital_first_last: bool = False
    input_shape: tuple[int, int, int] = (32, 32, 3)
    perchip: Strategy | None = None  # how chip batches compute (pimjax.perchip)

    def _check_input(self, x):
        if x.ndim < 4 or tuple(x.shape[-3:]) != tuple(self.input_shape):
            raise ValueError(
                f"{type(self).__name__} expects input of shape [batch, "
                f"{', '.join(map(str, self.input_shape))}] (NHWC), got {tuple(x.shape)}"
            )

    def _layer_kwargs(self, position: str):
        """Quant and analog settings of the 'first', 'middle' or 'last' layer."""
        if self.digital_first_last and position in ("first", "last"):
            return {"quant": FLOAT, "analog": False}
        return {"quant": self.quant, "input_signed": position == "first",
                "perchip": self.perchip}


class LeNet5(_Model):
    """LeNet-5 for 28x28x1 inputs: two 5x5 convs, three dense layers, BN after each."""

    input_shape: tuple[int, int, int] = (28, 28, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check_input(x)
        w = partial(_width, width=self.width)
        first, middle = self._layer_kwargs("first"), self._layer_kwargs("middle")
        x = AnalogConv(w(6), kernel_size=(5, 5), padding="SAME", **first)(x, train)
        x = max_pool_2x2(nn.relu(_batch_norm(train)(x)))
        x = AnalogConv(w(16), kernel_size=(5, 5), padding="VALID", **middle)(x, train)
        x = max_pool_2x2(nn.relu(_batch_norm(train)(x)))
        x = x.reshape(x.shape[:-3] + (-1,))
        for features in (w(120), w(84)):
            x = AnalogDense(features, **middle)(x, train)
            x = nn.relu(_batch_norm(train)(x))
        return AnalogDense(self.num_classes, use_bias=True, **self._layer_kwargs("last"))(x, train)


VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_Model):
    """VGG-11 with batch norm for 32x32 inputs (CIFAR), width-multiplied channels."""

    config: Sequence = VGG11_CONFIG

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check_input(x)
        first = True
        for item in self.config:
            if item == "M":
                x = max_pool_2x2(x)
                continue
            kwargs = self._layer_kwargs("first" if first else "middle")
            first = False
            x = AnalogConv(_width(item, self.width), kernel_size=(3, 3), **kwargs)(x, train)
            x = nn.relu(_batch_norm(train)(x))
        x = x.reshape(x.shape[:-3] + (-1,))
        return AnalogDense(self.num_classes, use_bias=True, **self._layer_kwargs("last"))(x, train)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 analog convs with BN, projection shortcut if needed."""

    features: int
    strides: int = 1
    quant: QuantConfig = FLOAT
    perchip: Strategy | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = partial(AnalogConv, quant=self.quant, perchip=self.perchip)
        y = conv(self.features, kernel_size=(3, 3), strides=(self.strides,) * 2)(x, train)
        y = nn.relu(_batch_norm(train)(y))
        y = conv(self.features, kernel_size=(3, 3))(y, train)
        y = _batch_norm(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, kernel_size=(1, 1), strides=(self.strides,) * 2,
                            name="shortcut")
            x = shortcut(x, train)
            x = _batch_norm(train)(x)
        return nn.relu(x + y)


class ResNet(_Model):
    """CIFAR ResNet (3x3 stem, no stem pooling) of basic blocks, width-multiplied."""

    stage_sizes: Sequence[int] = (3, 3, 3)
    stage_features: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check_input(x)
        features = [_width(f, self.width) for f in self.stage_features]
        x = AnalogConv(features[0], kernel_size=(3, 3), **self._layer_kwargs("first"))(x, train)
        x = nn.relu(_batch_norm(train)(x))
        for stage, (blocks, f) in enumerate(zip(self.stage_sizes, features, strict=True)):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(f, strides, self.quant, self.perchip)(x, train)
        x = jnp.mean(x, axis=(-3, -2))
        return AnalogDense(self.num_classes, use_bias=True, **self._layer_kwargs("last"))(x, train)


MODELS = {
    "lenet5": LeNet5,
    "vgg11": VGG11,
    "resnet20": partial(ResNet, stage_sizes=(3, 3, 3), stage_features=(16, 32, 64)),
    "resnet18": partial(ResNet, stage_sizes=(2, 2, 2, 2), stage_features=(64, 128, 256, 512)),
}

INPUT_SHAPES = {"lenet5": (28, 28, 1), "vgg11": (32, 32, 3), "resnet20": (32, 32, 3),
                "resnet18": (32, 32, 3)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's architecture: its name, channel width multiplier and digital first/last."""

    name: str = "lenet5"
    width: float = 1.0
    digital_first_last: bool = False

    def __post_init__(self):
        if self.name not in MODELS:
            raise ValueError(f"model={self.name!r} is unknown: use one of {sorted(MODELS)}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) \
                or not self.width > 0:
            raise ValueError(f"width={self.width!r} must be a number > 0 (a channel multiplier)")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The [H, W, C] input shape this model expects."""
        return INPUT_SHAPES[self.name]

    def build(self, num_classes: int, quant: QuantConfig,
              perchip: Strategy | None = None) -> nn.Module:
        """The Flax model for ``num_classes`` classes with quantizers ``quant``."""
        return get_model(self.name, num_classes, quant, self.width, self.digital_first_last,
                         perchip)


def get_model(
    name: str,
    num_classes: int = 10,
    quant: str | QuantConfig = "fp",
    width: float = 1.0,
    digital_first_last: bool = False,
    perchip: Strategy | None = None,
) -> nn.Module:
    """Build a model by name (``lenet5``, ``vgg11``, ``resnet20``, ``resnet18``)."""
    if not isinstance(quant, QuantConfig):
        quant = QuantConfig.parse(quant)
    ModelConfig(name, width, digital_first_last)  # validate
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    return MODELS[name](
        num_classes=num_classes,
        quant=quant,
        width=width,
        digital_first_last=digital_first_last,
        input_shape=INPUT_SHAPES[name],
        perchip=perchip,
    )
