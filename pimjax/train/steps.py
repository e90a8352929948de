"""The jitted steps of a run: one optimizer step under sampled chips, evaluation sums, and a
calibration pass (ptq).

The chip of step ``s`` is drawn from ``fold_in(chip_key, s)`` of the training device (K chips:
``chip_keys(fold_in(chip_key, s), K)``), the same chip for the forward and backward pass; the
augmentation of step ``s`` from ``fold_in(aug_key, s)``. So every step is a pure function of
the state, the batch and the keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pimjax import devices
from pimjax.data import augment, normalize
from pimjax.introspect import analog_kernels
from pimjax.layers import CHIP, READ_RNG, TUNE
from pimjax.train.state import TrainState


def prepare(state: TrainState, images, step, aug_key):
    """uint8 batch -> normalized float32, with random crop/flip when the config asks for it."""
    data = state.config.data
    if data.use_augment and aug_key is not None:
        images = augment(jax.random.fold_in(aug_key, step), images)
    return normalize(images, data.name)


def _rngs(device, read_key, step):
    if not device.needs_key:
        return {}
    return {READ_RNG: jax.random.fold_in(read_key, step)}


def _apply_train(state: TrainState, params, x, labels, chip, rngs):
    """Train-mode forward under one chip: (loss, (acc, new batch_stats))."""
    variables = {"params": params, "batch_stats": state.batch_stats, "tune": state.tune}
    if chip is not None:
        variables[CHIP] = chip
    logits, updates = state.model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs=rngs)
    # one-hot labels: the integer-label form's gradient is a scatter, slow on XLA's CPU
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    loss = optax.softmax_cross_entropy(logits, onehot).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (acc, updates.get("batch_stats", {}))


def step_chips(state: TrainState, chip_key, step):
    """The chip(s) of one step: None (ideal device), one chip, or a batch of K chips."""
    device = state.config.device.build()
    if device.is_ideal:
        return None
    template = analog_kernels({"params": state.params, TUNE: state.tune})
    key = jax.random.fold_in(chip_key, step)
    k = state.config.chips_per_step
    if k == 1:
        return devices.sample_chip(key, device, template)
    return jax.vmap(lambda c: devices.sample_chip(c, device, template))(devices.chip_keys(key, k))


def _train_step(state: TrainState, batch, chip_key, aug_key=None, read_key=None):
    config = state.config
    images, labels = batch
    x = prepare(state, images, state.step, aug_key)
    chip = step_chips(state, chip_key, state.step)
    rngs = _rngs(config.device.build(), read_key, state.step)

    def loss_fn(params):
        if chip is None or config.chips_per_step == 1:
            loss, (acc, stats) = _apply_train(state, params, x, labels, chip, rngs)
            return loss, (loss, acc, stats)
        losses, (accs, stats) = jax.vmap(
            lambda c: _apply_train(state, params, x, labels, c, rngs))(chip)
        # Batch statistics (BN and activation running max) averaged over the K chips.
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
        loss = jnp.max(losses) if config.loss == "worst" else jnp.mean(losses)
        return loss, (jnp.mean(losses), jnp.mean(accs), stats)

    (objective, (loss, acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    # loss/acc: means over the step's chips; objective: what was minimised (worst-of-K or mean).
    metrics = {"loss": loss, "acc": acc, "objective": objective}
    if state.schedule is not None:
        metrics["lr"] = state.schedule(state.step)
    return new_state, metrics


train_step = jax.jit(_train_step)
train_step.__doc__ = """One optimizer step under the step's chip(s): ``(state, metrics)``.

``batch`` is ``(uint8 images, int32 labels)``; the chip of step ``s`` is drawn from
``fold_in(chip_key, s)`` (K chips: ``chip_keys(fold_in(chip_key, s), K)``); ``aug_key``
drives the random crop/flip of augmented datasets, ``read_key`` a device's per-read noise."""


def eval_step(state: TrainState, images, labels, mask):
    """Sum of correct predictions and of losses over the unmasked examples (nominal model)."""
    return _eval_sums(state.model, state.config.data.name, state.variables, images, labels, mask)


# Keyed on the model and dataset only, so runs of any method with the same net share programs.
@functools.partial(jax.jit, static_argnames=("model", "dataset"))
def _eval_sums(model, dataset, variables, images, labels, mask):
    logits = model.apply(variables, normalize(images, dataset), train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * mask), jnp.sum(losses * mask)


def calibration_step(state: TrainState, images, chip_key, index):
    """One train-mode forward pass under chip ``index``: updates batch_stats, not params."""
    stats = _calibration_stats(state.model, state.config.data.name, state.config.device.build(),
                               state.variables, images, chip_key, index)
    return state.replace(batch_stats=stats)


@functools.partial(jax.jit, static_argnames=("model", "dataset", "device"))
def _calibration_stats(model, dataset, device, variables, images, chip_key, index):
    variables = dict(variables)
    key = jax.random.fold_in(chip_key, index)
    if not device.is_ideal:
        variables[CHIP] = devices.sample_chip(key, device, analog_kernels(variables))
    _, updates = model.apply(variables, normalize(images, dataset), train=True,
                             mutable=["batch_stats"], rngs=_rngs(device, key, index))
    return updates["batch_stats"]
