"""The training state: step, variables and optimizer state, with the static model and optimizer."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from pimjax.layers import TUNE
from pimjax.train.config import TrainConfig
from pimjax.train.optim import make_optimizer, make_schedule


class TrainState(struct.PyTreeNode):
    """Step counter, variables and optimizer state; config, model and optimizer are static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    tune: Any
    opt_state: Any
    config: TrainConfig = struct.field(pytree_node=False)
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: optax.Schedule | None = struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict:
        """The model variables (params, batch_stats, tune) without a chip."""
        out = {"params": self.params, "tune": self.tune}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def build_model(config: TrainConfig) -> nn.Module:
    """The Flax model a config trains."""
    return config.model.build(config.num_classes, config.quant)


def steps_per_epoch(config: TrainConfig, num_train: int) -> int:
    """Optimizer steps per epoch over ``num_train`` images (the last partial batch is dropped)."""
    bs = config.optim.batch_size
    if num_train < bs:
        raise ValueError(f"optim.batch_size={bs} exceeds the {num_train} training images")
    return num_train // bs


@functools.lru_cache(maxsize=32)  # equal models share one compiled init
def _jit_init(model: nn.Module):
    return jax.jit(model.init)


@functools.lru_cache(maxsize=32)
def jit_opt_init(tx: optax.GradientTransformation):
    """The optimizer's init, jitted once per optimizer."""
    return jax.jit(tx.init)


def create_train_state(config: TrainConfig, key, sample_input, num_train: int) -> TrainState:
    """Initialise the model and optimizer (``num_train`` sizes the schedule's epochs)."""
    model = build_model(config)
    variables = _jit_init(model)(key, jnp.asarray(sample_input, jnp.float32))
    n = steps_per_epoch(config, num_train)
    tx = make_optimizer(config.optim, n)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), tune=variables.get(TUNE, {}),
        opt_state=jit_opt_init(tx)(params), config=config, model=model, tx=tx,
        schedule=make_schedule(config.optim, n))
