"""Post-training quantization: load a float model's weights into the quantized net, then
recalibrate its activation clips and batch-norm statistics under sampled chips."""

from __future__ import annotations

import jax.numpy as jnp

from pimjax.data import Dataset
from pimjax.distributed import from_process_rows, process_rows
from pimjax.train.batches import train_batches
from pimjax.train.state import TrainState, jit_opt_init
from pimjax.train.steps import calibration_step


def init_from_float(state: TrainState, float_variables: dict) -> TrainState:
    """Copy a float model's params and BN statistics into a (quantized) state of the same net.

    Variables the float model lacks (quantizer clips, learned scales) keep their initial values.
    """
    def overlay(dst, src, path=""):
        if not hasattr(dst, "items"):
            if src is None:
                return dst
            if jnp.shape(src) != jnp.shape(dst):
                raise ValueError(f"{path}: checkpoint shape {jnp.shape(src)} != model "
                                 f"{jnp.shape(dst)}; is it the same model and width?")
            return jnp.asarray(src, dst.dtype)
        src = src if hasattr(src, "items") else {}
        return {k: overlay(v, src.get(k), f"{path}/{k}") for k, v in dst.items()}

    params = overlay(state.params, float_variables["params"])
    stats = overlay(state.batch_stats, float_variables.get("batch_stats", {}))
    return state.replace(params=params, batch_stats=stats, opt_state=jit_opt_init(state.tx)(params))


def calibrate(state: TrainState, dataset: Dataset, key, num_batches: int,
              mesh=None) -> TrainState:
    """Recalibrate activation clips and BN statistics by train-mode passes under sampled chips."""
    done = 0
    epoch = 0
    bs = state.config.optim.batch_size
    rows = None if mesh is None else process_rows(bs, mesh)
    while done < num_batches:
        for images, _ in train_batches(dataset, bs, state.config.seed, epoch, rows):
            if mesh is not None:  # each process holds its own rows of the batch
                images = from_process_rows(images, mesh, bs)
            state = calibration_step(state, images, key, done)
            done += 1
            if done == num_batches:
                break
        epoch += 1
    return state
