"""Chip i's Monte-Carlo results are the same bits whatever the plan: the device count, the
chips per chunk (so the chips per device), with self-tuning and between-chip variation.

XLA rounds a reduction according to its array's whole shape (a ``[C, B]`` sum over ``B``
differs with ``C``), so every per-chip reduction (the loss sum, the tuning statistics and
solve) runs chip by chip on arrays of one shape (:func:`pimjax.perchip.chip_map`).
"""

import jax
import numpy as np
import pytest

from pimjax import data, devices, montecarlo, selftune

KEY = jax.random.PRNGKey(3)
N_CHIPS, N_IMAGES, N_CALIB = 12, 96, 64
DEVICE = devices.paper(0.3, 0.1)  # within- and between-chip variation, jax.random draws
# (devices, chips per chunk): 6, 3, 2 and 1 chips per device, one chunk or several
LAYOUTS = [(2, 12), (4, 12), (2, 4), (4, 4), (1, 12), (1, 4)]


@pytest.fixture(scope="module")
def setup(trained, mnist):
    run = trained["qavat"]
    test = (data.normalize(mnist[1].images[:N_IMAGES], "mnist"), mnist[1].labels[:N_IMAGES])
    calib = data.normalize(mnist[0].images[:N_CALIB], "mnist")
    stats = selftune.nominal_stats(run.model, run.variables, calib)
    return run, test, calib, stats


def _sweep(setup, variant, ndev, chips):
    run, test, calib, stats = setup
    tuning = selftune.SelfTune(variant, calib, stats)
    return montecarlo.evaluate_chips(run.model, run.variables, DEVICE, KEY, N_CHIPS, test,
                                     tuning=tuning, chips_per_chunk=chips,
                                     mesh_devices=jax.devices()[:ndev], nominal=False,
                                     progress=False)


@pytest.mark.parametrize("variant", ["gain", "channel"])
def test_tuned_chips_are_the_same_bits_for_any_device_count_and_chunking(setup, variant):
    assert len(jax.devices()) >= 4, "conftest provides 4 host devices"
    results = [(layout, _sweep(setup, variant, *layout)) for layout in LAYOUTS]
    (_, ref), *rest = results
    assert len(np.unique(ref.loss)) == N_CHIPS  # the chips differ
    for layout, res in rest:
        np.testing.assert_array_equal(res.accuracy, ref.accuracy, err_msg=str(layout))
        np.testing.assert_array_equal(res.loss, ref.loss, err_msg=str(layout))


@pytest.mark.parametrize("variant,mode,batch_size", [
    ("gain", "layers", None), ("channel", "layers", 24), ("bn", "layers", None),
    ("channel", "map", None)])
def test_chip_batch_solve_is_the_same_bits_for_any_batch_size(setup, variant, mode,
                                                               batch_size):
    """Self-tuning a chip batch: chip i's gains/offsets do not depend on how many chips share
    its batch (one batch of calibration images, or several: the streaming moments)."""
    run, _, calib, stats = setup
    template = montecarlo.analog_kernels(run.variables)
    sample = jax.jit(jax.vmap(lambda k: devices.sample_chip(k, DEVICE, template)))
    chips = sample(devices.chip_keys(KEY, 8))
    stats = stats if variant in selftune.NEEDS_STATS else None

    def solve(c):
        return jax.tree.map(np.asarray, selftune.self_tune(
            run.model, run.variables, c, calib, variant, stats, batch_size, mode).tune)

    full = solve(chips)
    for lo, hi in ((0, 4), (5, 6)):  # a batch of 4 chips, and of one
        part = solve(jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], chips))
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part), strict=True):
            np.testing.assert_array_equal(a[lo:hi], b, err_msg=f"chips {lo}:{hi}")


def test_sweeps_run_chip_by_chip_on_the_cpu(setup):
    """The sweeps' default chip mode is "map" on the CPU (its results do not depend on the
    chips per device), the faster rule elsewhere; an explicit mode is kept."""
    model = setup[0].model
    assert montecarlo.sweep_mode(model, "cpu") == "map"
    assert montecarlo.sweep_mode(model, "gpu") == montecarlo.chip_mode(model) == "layers"
    assert montecarlo.plan_chunks(model, 8, 100).mode == "map"
    assert montecarlo.plan_chunks(model, 8, 100, mode="layers").mode == "layers"
