"""The optimizer and learning-rate schedule of a run, as optax transformations."""

from __future__ import annotations

import functools

import jax
import optax

from pimjax.train.config import OptimConfig


@functools.lru_cache(maxsize=64)
def make_schedule(optim: OptimConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule: cosine to 0, step (x0.1 at 50% and 75%), or constant."""
    total = optim.epochs * steps_per_epoch
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    if optim.schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, total)
        return optax.cosine_decay_schedule(optim.lr, total)
    if optim.schedule == "step":
        # x0.1 at 50% and 75% of all steps; after a warmup, the main schedule counts from
        # the warmup's end (optax.join_schedules), so its boundaries move back by it.
        drops: dict[int, float] = {}
        for fraction in (0.5, 0.75):
            boundary = max(int(total * fraction) - warmup, 0)
            drops[boundary] = drops.get(boundary, 1.0) * 0.1
        main = optax.piecewise_constant_schedule(optim.lr, drops)
    else:
        main = optax.constant_schedule(optim.lr)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), main],
                                    [warmup])
    return main


def decay_mask(params):
    """Weight decay applies to kernels (arrays of 2 or more dims), not biases or scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@functools.lru_cache(maxsize=64)  # one object per config, so compiled steps are reused
def make_optimizer(optim: OptimConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Optional global-norm clip, then SGD with momentum (coupled L2 decay) or AdamW."""
    schedule = make_schedule(optim, steps_per_epoch)
    parts = []
    if optim.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    if optim.optimizer == "sgd":
        if optim.weight_decay:
            parts.append(optax.add_decayed_weights(optim.weight_decay, decay_mask))
        parts.append(optax.sgd(schedule, optim.momentum or None, optim.nesterov))
    else:
        parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
