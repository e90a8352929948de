"""Training: one optax loop for fp, qat, vat, ptq and qavat (the paper's method).

* ``fp``    float model, no variation.
* ``qat``   quantized model, no variation (variability-oblivious QAT).
* ``vat``   float model trained under weight variation.
* ``qavat`` quantized model trained under variation: every step draws a fresh chip of the
  training device from ``fold_in(chip_key, step)`` and uses it for the forward and the
  backward pass.
* ``ptq``   no gradient step: the float parameters of a trained ``vat`` (or ``fp``) run are
  loaded into the quantized model, whose activation clips and batch-norm statistics are then
  recalibrated by train-mode forward passes under sampled chips.

Options beyond the paper: K chips per step (the loss is vmapped over K chips and averaged, or
the worst of K is taken), and any device (:mod:`pimjax.devices`) as the training device.
"""

from pimjax.train.batches import epoch_permutation, train_batches
from pimjax.train.config import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    TRAIN_METHODS,
    DataConfig,
    EvalConfig,
    OptimConfig,
    PTQConfig,
    TrainConfig,
)
from pimjax.train.loop import (
    RunKeys,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    evaluate_chips,
    load_data,
    run_keys,
    train,
)
from pimjax.train.optim import make_optimizer, make_schedule
from pimjax.train.ptq import calibrate, init_from_float
from pimjax.train.runs import load_model
from pimjax.train.state import TrainState, build_model, create_train_state, steps_per_epoch
from pimjax.train.steps import calibration_step, eval_step, step_chips, train_step

__all__ = [
    "LOSSES", "OPTIMIZERS", "SCHEDULES", "TRAIN_METHODS", "DataConfig", "EvalConfig",
    "OptimConfig", "PTQConfig", "RunKeys", "TrainConfig", "TrainResult", "TrainState",
    "TrainingDivergedError", "build_model", "calibrate", "calibration_step",
    "create_train_state", "epoch_permutation", "eval_step", "evaluate", "evaluate_chips",
    "init_from_float", "load_data", "load_model", "make_optimizer", "make_schedule", "run_keys",
    "step_chips", "steps_per_epoch", "train", "train_batches", "train_step",
]
