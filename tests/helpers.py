"""Shared test helpers: model variables without compiling ``model.init``, tree comparisons."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import files, introspect
from pimjax import train as T
from pimjax.devices import ChipLayer, Device, DeviceConfig
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig

# The shared runs: 6400 MNIST training images in batches of 64 for 3 epochs (300 Adam steps),
# tested on the first 500 test images. Measured: qat reaches 0.968 nominal accuracy, qavat
# 0.944; under sigma_within 0.5, qavat's chips average 0.900 against qat's 0.774 (64 chips).
TRAIN_IMAGES, TEST_IMAGES, EPOCHS, BATCH = 6400, 500, 3, 64
SIGMA = 0.5  # qavat's training sigma_within, and the per-epoch chips' evaluation device
EVAL_CHIPS = 16  # chips evaluated after each qat epoch under sigma_within SIGMA


def run_config(method: str, **overrides) -> T.TrainConfig:
    """The config of the shared ``method`` run (qat or qavat), with field overrides."""
    qavat = method == "qavat"
    fields = dict(
        train_method=method, model=ModelConfig("lenet5"),
        data=T.DataConfig("mnist", train_images=TRAIN_IMAGES, test_images=TEST_IMAGES),
        quant=QuantConfig(weight_bits=2, act_bits=4),
        device=DeviceConfig(sigma_within=SIGMA if qavat else 0.0),
        optim=T.OptimConfig(lr=3e-3, epochs=EPOCHS, batch_size=BATCH),
        eval=T.EvalConfig() if qavat else T.EvalConfig(
            chips=EVAL_CHIPS, device=DeviceConfig(sigma_within=SIGMA)),
    )
    fields.update(overrides)
    return T.TrainConfig(**fields)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A test weight part: the weight times its state. Chips of it are built by
    :func:`factor_chip` with given factors (sampling gives factors of one)."""

    def sample(self, key, template):
        return jax.tree.map(lambda leaf: jnp.ones(jnp.shape(leaf), jnp.float32), template)

    def apply(self, w, state, t):
        return w * state


SCALE_DEVICE = Device(weights=(Scale(),), name="scale")


def factor_chip(template, factors, num_chips: int | None = None):
    """A chip (a batch with ``num_chips``) of :data:`SCALE_DEVICE` whose analog layer i (in
    the template's flatten order) multiplies its quantized weight by ``factors[i]``: an
    array of the kernel's shape (with a leading chip axis for a batch) or a number.

    All such chips of one model share one pytree structure, so jitted functions of them
    compile once however the factors change.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    lead = () if num_chips is None else (num_chips,)
    layers = []
    for i, (f, leaf) in enumerate(zip(factors, leaves, strict=True)):
        state = jnp.broadcast_to(jnp.asarray(f, jnp.float32), (*lead, *leaf.shape))
        layers.append(ChipLayer(states=(state,), t=jnp.zeros(lead, jnp.float32),
                                device=SCALE_DEVICE, shape=tuple(leaf.shape), index=i))
    return jax.tree_util.tree_unflatten(treedef, layers)


def hash_factors(key_words, layer: int, shape, sigma: float, xp=jnp):
    """Factors 1 + sigma * sqrt(3) * (2u - 1), u in [0, 1) from an integer hash of the chip
    key's two words, the layer index and the cell index (mean 1, standard deviation sigma).

    Integer arithmetic, so NumPy (``xp=np``) gives exactly XLA's u; compiles in no time.
    """
    k0, k1 = key_words[0].astype(xp.uint32), key_words[1].astype(xp.uint32)
    mult = xp.uint32(0x45D9F3B)
    h = xp.arange(math.prod(shape), dtype=xp.uint32) * xp.uint32(0x9E3779B1)
    h = h + xp.uint32((layer * 0x85EBCA77) & 0xFFFFFFFF)
    h = ((h ^ k0) ^ ((h ^ k0) >> xp.uint32(16))) * mult
    h = ((h ^ k1) ^ ((h ^ k1) >> xp.uint32(16))) * mult
    h = h ^ (h >> xp.uint32(16))
    u = (h >> xp.uint32(8)).astype(xp.float32) * xp.float32(2.0**-24)
    return (1.0 + sigma * math.sqrt(3.0) * (2.0 * u - 1.0)).reshape(shape)


def key_words(key):
    """The two uint32 words of a PRNG key (raw or typed)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


@dataclasses.dataclass(frozen=True)
class HashNoise:
    """A test weight part: chip-dependent factors (:func:`hash_factors`) without jax.random,
    whose programs compile fast and whose factors NumPy can recompute from the chip key."""

    sigma: float = 0.3

    def sample(self, key, template):
        words = key_words(key)
        leaves, treedef = jax.tree_util.tree_flatten(template)
        return jax.tree_util.tree_unflatten(treedef, [
            hash_factors(words, i, tuple(jnp.shape(leaf)), self.sigma)
            for i, leaf in enumerate(leaves)])

    def apply(self, w, state, t):
        return w * state


HASH_DEVICE = Device(weights=(HashNoise(0.3),), name="hash")


def numpy_chips(template, num_chips: int | None = None, sigma: float = 0.3, seed: int = 0):
    """A chip (or a batch of ``num_chips``) with factors 1 + sigma z drawn by NumPy
    (:func:`factor_chip`), so no PRNG program is compiled.

    (``jax.random`` draws compile slowly at XLA:CPU's default optimization level, ~0.8 s per
    analog layer: a ResNet-20 chip sampler takes 15-30 s.)
    """
    rng = np.random.default_rng(seed)
    lead = () if num_chips is None else (num_chips,)
    factors = [1.0 + sigma * rng.standard_normal((*lead, *leaf.shape))
               for leaf in jax.tree_util.tree_leaves(template)]
    return factor_chip(template, factors, num_chips)


def random_variables(model, seed: int = 0, act_max: float = 3.0) -> dict:
    """Variables of ``model`` filled by NumPy: LeCun-normal kernels, small biases and BN
    parameters, unit BN statistics, activation ranges up to ``act_max`` (from ``-act_max / 3``
    for a signed input), identity tune.

    It skips compiling ``model.init`` (at XLA's default optimization level the init of a
    ResNet compiles for many seconds); use :func:`calibrate` for realistic statistics.
    """
    rng = np.random.default_rng(seed)
    abstract = introspect.abstract_variables(model)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif name in ("bias", "offset", "mean"):
            value = 0.1 * rng.standard_normal(shape) if name == "bias" else np.zeros(shape)
        elif name in ("scale", "gain", "var"):
            value = 1.0 + 0.1 * rng.random(shape) if name == "scale" else np.ones(shape)
        elif name == "act_max":
            value = np.full(shape, act_max)
        elif name == "act_min":  # a signed input's running minimum
            value = np.full(shape, -act_max / 3)
        else:  # learned quantizer scales (pact_alpha, act_step, weight_step)
            value = np.full(shape, 0.5)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(abstract))


@partial(jax.jit, static_argnames="model")
def _train_pass(model, variables, x):
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


def calibrate(model, variables, x, passes: int = 1) -> dict:
    """``variables`` with BN statistics and activation clips set by train-mode passes on ``x``."""
    for _ in range(passes):
        variables = {**variables, "batch_stats": _train_pass(model, variables, x)}
    return variables


def assert_trees_equal(a, b):
    """Same structure and bit-identical leaves of the same shapes and dtypes (chex)."""
    chex.assert_trees_all_equal(a, b, strict=True)


def chip_index(chips, i: int):
    """Chip ``i`` of a chip batch (every leaf indexed on its leading axis)."""
    return jax.tree.map(lambda a: a[i], chips)


ROOT = Path(__file__).resolve().parents[1]


def execute_notebook(notebook: Path, tmp_path: Path, monkeypatch):
    """Execute a notebook (its kernel imports this checkout, compiles with most optimizations
    off and shares this session's compilation cache): (each code cell's text, notebook)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("PIMJAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # no bit-identity claims there
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # the kernel's runtime.configure() then shares this session's compiled programs
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "jax-compile").symlink_to(cache)
        monkeypatch.setenv("PIMJAX_CACHE_DIR", str(tmp_path / "cache"))
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells
            if c.cell_type == "code"], nb


def refusal_in_another_thread(lock) -> str:
    """Enter ``lock()`` (a run lock's context manager) from another thread, as another run
    would: the :class:`pimjax.files.RunLockedError` message, or "" when it was granted."""
    refused = []

    def take():
        try:
            with lock():
                pass
        except files.RunLockedError as e:
            refused.append(str(e))

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return refused[0] if refused else ""
