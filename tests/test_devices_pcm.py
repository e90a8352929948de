"""PCM weight part: moments of every stage vs aihwkit 1.1's formulas, and a NumPy oracle.

The oracles below are written from the formulas (aihwkit/inference/noise/pcm.py and the
tile's program/drift chain), not from pimjax's code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax.devices.faults import StuckAt
from pimjax.devices.pcm import PCM

N = 200_000
T0, T_READ = 20.0, 250e-9
TIMES = (0.0, 1.0, 3600.0, 86400.0, 365 * 86400.0)


def np_prog_sigma(g):
    x = np.asarray(g, np.float64) / 25.0
    return 0.26348 + 1.9650 * x - 1.1731 * x**2


def np_nu_params(g):
    g_rel = np.maximum(np.abs(np.asarray(g, np.float64)) / 25.0, 1e-7)
    mu = np.clip(-0.0155 * np.log(g_rel) + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * np.log(g_rel) - 0.0059, 0.008, 0.045)
    return mu, sd


def np_read_sigma(g_prog, t):
    q = np.minimum(0.0088 / np.maximum((np.abs(g_prog) / 25.0) ** 0.65, 1e-3), 0.2)
    return q * np.sqrt(np.log((t + T0 + T_READ) / (2 * T_READ)))


def np_phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def normals(seed, n=N):
    return jax.random.normal(jax.random.key(seed), (n,), jnp.float32)


@pytest.mark.parametrize("g", [5.0, 12.5, 20.0, 25.0])
def test_programming_noise_moments(g):
    pcm = PCM()
    gp = np.asarray(pcm.program(jnp.full((N,), g), normals(1)), np.float64)
    s = float(np_prog_sigma(g))
    assert abs(gp.mean() - g) < 5 * s / math.sqrt(N)
    assert abs(gp.std() - s) < 5 * s / math.sqrt(2 * N)


def test_programming_noise_at_zero_is_clamped_half_normal():
    pcm = PCM()
    gp = np.asarray(pcm.program(jnp.zeros((N,)), normals(2)), np.float64)
    s = 0.26348
    mean, second = s / math.sqrt(2 * math.pi), s**2 / 2
    var = second - mean**2
    assert gp.min() == 0.0
    assert abs(np.mean(gp == 0) - 0.5) < 5 * math.sqrt(0.25 / N)
    assert abs(gp.mean() - mean) < 5 * math.sqrt(var / N)
    assert abs(np.mean(gp**2) - second) < 5 * math.sqrt(np.var(gp**2) / N)


@pytest.mark.parametrize("g", [0.0, 0.05, 1.0, 5.0, 25.0])
def test_drift_exponent_folded_normal_moments(g):
    pcm = PCM()
    nu = np.asarray(pcm.drift_exponent(jnp.full((N,), g), normals(3)), np.float64)
    mu, sd = (float(v) for v in np_nu_params(g))
    mean = sd * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sd**2)) + mu * (
        1 - 2 * np_phi(-mu / sd))
    second = mu**2 + sd**2
    var = second - mean**2
    assert nu.min() >= 0
    assert abs(nu.mean() - mean) < 5 * math.sqrt(var / N)
    assert abs(np.mean(nu**2) - second) < 5 * math.sqrt((4 * mu**2 * sd**2 + 2 * sd**4) / N)


def test_drift_exponent_clips_and_floor():
    """Hand values: g_rel floor 1e-7 gives the clipped maxima mu = 0.1, sigma = 0.045."""
    pcm = PCM()
    z = jnp.array([0.0, 1.0, 0.0, 1.0])
    g = jnp.array([0.0, 0.0, 25.0, 25.0])
    nu = np.asarray(pcm.drift_exponent(g, z))
    # g = g_max: mu = clip(0.0244, 0.049, .1) = 0.049, sigma = clip(-0.0059, 0.008, .) = 0.008
    np.testing.assert_allclose(nu, [0.1, 0.145, 0.049, 0.057], rtol=1e-6)


@pytest.mark.parametrize("t", TIMES)
def test_drift_matches_closed_form(t):
    """g(t) of every device equals g_prog ((t + t0)/t0)^-nu, all from the chip's normals."""
    pcm = PCM(reconvert=False, read_noise_scale=0.0)
    w = jax.random.uniform(jax.random.key(4), (30, 20), jnp.float32, -1.0, 1.0)
    state = pcm.sample(jax.random.key(5), w)
    s = pcm.stages(w, state, t)
    wn = np.asarray(w, np.float64) / np.abs(np.asarray(w)).max()
    for sign, name in ((1, "plus"), (-1, "minus")):
        gt = 25.0 * np.clip(sign * wn, 0, 1)
        gp = np.maximum(gt + np_prog_sigma(gt) * np.asarray(state[f"prog_{name}"]), 0)
        mu, sd = np_nu_params(gt)
        nu = np.abs(mu + sd * np.asarray(state[f"nu_{name}"]))
        np.testing.assert_allclose(s[f"g_drift_{name}"], gp * ((t + T0) / T0) ** (-nu),
                                   rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("g", [5.0, 25.0])
def test_read_noise_moments(g, t):
    pcm = PCM()
    gd = jnp.full((N,), g * 0.8)
    gf = np.asarray(pcm.read(gd, jnp.full((N,), g), normals(6), t), np.float64)
    rel = gf / (g * 0.8) - 1
    s = float(np_read_sigma(g, t))
    assert abs(rel.mean()) < 5 * s / math.sqrt(N)
    assert abs(rel.std() - s) < 5 * s / math.sqrt(2 * N)


def test_read_sigma_hand_values():
    """Q_s = 0.0088/0.4^0.65 at g = 10 µS, the 0.2 cap at small g; ln(4e7) at t = 0."""
    pcm = PCM()
    got = np.asarray(pcm.read_sigma(jnp.array([10.0, 0.1, 0.0]), 0.0))
    root = math.sqrt(math.log((20.0 + 250e-9) / 500e-9))
    np.testing.assert_allclose(got, np.array([0.0088 / 0.4**0.65, 0.2, 0.2]) * root, rtol=1e-5)


def np_pcm_weights(w, state, t, reconvert, per_column=False):
    """NumPy oracle of aihwkit's tile chain: convert, program, (re)convert, drift, read."""
    w = np.asarray(w, np.float64)
    z = {k: np.asarray(v, np.float64) for k, v in state.items()}
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) if per_column else np.abs(w).max()
    wn = w / scale
    gt = {"plus": 25.0 * np.clip(wn, 0, 1), "minus": 25.0 * np.clip(-wn, 0, 1)}
    gp = {k: np.maximum(g + np_prog_sigma(g) * z[f"prog_{k}"], 0) for k, g in gt.items()}
    nu = {}
    for k, g in gt.items():
        mu, sd = np_nu_params(g)
        nu[k] = np.abs(mu + sd * z[f"nu_{k}"])
    if reconvert:
        w_prog = (gp["plus"] - gp["minus"]) / 25.0  # programmed weight (x scale)
        s2 = 25.0 / np.abs(w_prog).max()
        gr = {"plus": np.clip(w_prog * s2, 0, 25), "minus": np.clip(-w_prog * s2, 0, 25)}
    else:
        s2, gr = 1.0, gp
    gf = {}
    for k, g in gr.items():
        gd = g * ((t + T0) / T0) ** (-nu[k])
        gf[k] = np.maximum(gd + np.abs(gd) * np_read_sigma(g, t) * z[f"read_{k}"], 0)
    return (gf["plus"] - gf["minus"]) / (25.0 if not reconvert else s2) * scale


@pytest.mark.parametrize("reconvert", [True, False])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("t", [0.0, 86400.0])
def test_apply_matches_numpy_oracle(reconvert, per_column, t):
    pcm = PCM(reconvert=reconvert, per_column=per_column)
    w = jax.random.normal(jax.random.key(7), (3, 3, 4, 6), jnp.float32)
    state = pcm.sample(jax.random.key(8), w)
    got = np.asarray(pcm.apply(w, state, t))
    want = np_pcm_weights(w, state, t, reconvert, per_column)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_chip_batch_equals_each_chip():
    pcm = PCM()
    w = jax.random.normal(jax.random.key(9), (25, 6), jnp.float32)
    keys = jax.random.split(jax.random.key(10), 3)
    states = jax.vmap(lambda k: pcm.sample(k, w))(keys)
    ws = jnp.stack([w, 2 * w, -w])
    ts = jnp.array([0.0, 3600.0, 1e7])
    batch = pcm.apply(ws, states, ts)
    for c in range(3):
        one = pcm.apply(ws[c], jax.tree_util.tree_map(lambda a, c=c: a[c], states), ts[c])
        np.testing.assert_allclose(batch[c], one, rtol=1e-6, atol=1e-7)


def test_state_depends_on_key_and_shape_only():
    pcm = PCM(stuck=StuckAt(0.01, 0.01))
    tmpl = {"a": {"kernel": jnp.zeros((5, 5, 1, 6))}, "b": {"kernel": jnp.ones((400, 120))}}
    other = jax.tree_util.tree_map(lambda x: x + 3.0, tmpl)
    s1, s2 = pcm.sample(jax.random.key(11), tmpl), pcm.sample(jax.random.key(11), other)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s1, s2)
    s3 = pcm.sample(jax.random.key(12), tmpl)
    assert not np.array_equal(s1["a"]["kernel"]["prog_plus"], s3["a"]["kernel"]["prog_plus"])
    # a chip part is fixed: the same chip read twice gives the same weights
    w = jax.random.normal(jax.random.key(13), (400, 120))
    st = s1["b"]["kernel"]
    np.testing.assert_array_equal(pcm.apply(w, st, 60.0), pcm.apply(w, st, 60.0))


@pytest.mark.parametrize("reconvert", [True, False])
def test_noise_free_limit_is_identity_with_unit_gradient(reconvert):
    pcm = PCM(prog_noise_scale=0.0, drift_scale=0.0, read_noise_scale=0.0, reconvert=reconvert)
    w = jax.random.normal(jax.random.key(14), (16, 8))
    st = pcm.sample(jax.random.key(15), w)
    np.testing.assert_allclose(pcm.apply(w, st, 1e5), w, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda v: jnp.sum(pcm.apply(v, st, 1e5)))(w)
    np.testing.assert_allclose(g, np.ones(w.shape), rtol=1e-6)


def test_gradient_follows_drift():
    """No programming or read noise: w_eff = w ((t+t0)/t0)^-nu, so dw_eff/dw is that factor."""
    pcm = PCM(prog_noise_scale=0.0, read_noise_scale=0.0, reconvert=False)
    w = jax.random.normal(jax.random.key(16), (16, 8))
    st = pcm.sample(jax.random.key(17), w)
    t = 86400.0
    g = np.asarray(jax.grad(lambda v: jnp.sum(pcm.apply(v, st, t)))(w))
    wn = np.asarray(w) / np.abs(np.asarray(w)).max()
    name = np.where(wn >= 0, "plus", "minus")
    z = np.where(name == "plus", st["nu_plus"], st["nu_minus"])
    mu, sd = np_nu_params(25.0 * np.abs(wn))
    np.testing.assert_allclose(g, ((t + T0) / T0) ** (-np.abs(mu + sd * z)), rtol=1e-4)


@pytest.mark.parametrize("t", [0.0, 3600.0, 365 * 86400.0])
def test_stuck_devices_fixed_at_every_time(t):
    stuck = StuckAt(p_zero=0.2, p_gmax=0.1)
    pcm = PCM(stuck=stuck, reconvert=False)
    w = jax.random.normal(jax.random.key(18), (100, 50))
    st = pcm.sample(jax.random.key(19), w)
    s = pcm.stages(w, st, t)
    for name in ("plus", "minus"):
        u = np.asarray(st["stuck"][name])
        g = np.asarray(s[f"g_final_{name}"])
        np.testing.assert_array_equal(g[u < 0.2], 0.0)
        np.testing.assert_allclose(g[(u >= 0.2) & (u < 0.3)], 25.0)


@pytest.mark.parametrize("field,value", [("g_max", -1.0), ("t0", 0.0), ("drift_scale", -1.0),
                                         ("prog_coeff", ("a",)), ("stuck", 0.1)])
def test_bad_fields_raise(field, value):
    with pytest.raises(ValueError, match=field):
        PCM(**{field: value})


def test_bad_t_shape_raises():
    pcm = PCM()
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="t has shape"):
        pcm.apply(w, pcm.sample(jax.random.key(0), w), jnp.zeros((2, 2)))
