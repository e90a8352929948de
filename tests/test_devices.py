"""Devices and chips: the paper's factor moments against the model, sharing structure, the
part protocol (keys, time, chip batches), presets and configs, determinism, errors.

Tolerances are derived from the sample size: a sample mean of n i.i.d. draws with
variance v has standard error sqrt(v / n); a sample variance has standard error
about sqrt((m4 - v^2) / n); a sample correlation of independent draws about 1 / sqrt(n).
We allow Z = 5 standard errors (two-sided p ~ 6e-7 per check at the fixed seeds).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import devices
from pimjax.devices import (
    ChipLayer,
    Device,
    DeviceConfig,
    VariabilityModel,
    at_time,
    between_factors,
    chip_keys,
    from_variability,
    ideal,
    num_chips,
    paper,
    part_key,
    sample_chip,
    sample_chips,
)

# No test here claims bit-identity across programs: compile at the "fast" XLA level
# (most optimizations off, see conftest.py).
pytestmark = pytest.mark.xla_level("fast")

Z = 5.0
TEMPLATE = {
    "conv": {"kernel": jnp.zeros((3, 3, 4, 8))},
    "dense": {"kernel": jnp.zeros((64, 10))},
}
SHAPES = ((3, 3, 4, 8), (64, 10))  # TEMPLATE's kernel shapes, in flatten order


def kernels(*shapes):
    """A template of one layer per shape (only the shapes are read)."""
    return {f"l{i}": {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)}
            for i, s in enumerate(shapes)}


def factors(chip, name="conv"):
    """The paper part's factor array of one layer of a chip (or chip batch)."""
    node = chip[name]
    return (node if isinstance(node, ChipLayer) else node["kernel"]).states[0]


def _normal_moments(s):
    """Mean, variance and 4th central moment of 1 + s*z."""
    return 1.0, s**2, 3 * s**4


def _positive_gain_moments(s):
    """Mean, variance and 4th central moment of the between-chip gain 1 + s*z conditioned on
    being positive (z > -1/s), by numerical integration of the normal density (an oracle
    independent of the library's closed form)."""
    z = np.linspace(-1.0 / s, 12.0, 400_001)
    pdf = np.exp(-z * z / 2)
    g = 1.0 + s * z
    mass = np.trapezoid(pdf, z)
    mean = np.trapezoid(g * pdf, z) / mass
    var = np.trapezoid((g - mean) ** 2 * pdf, z) / mass
    m4 = np.trapezoid((g - mean) ** 4 * pdf, z) / mass
    return mean, var, m4


def _lognormal_moments(s):
    """Mean, variance and 4th central moment of exp(s*z)."""
    m = math.exp(s**2 / 2)
    raw = [math.exp(k * k * s**2 / 2) for k in range(5)]  # E[X^k]
    var = raw[2] - m**2
    m4 = raw[4] - 4 * m * raw[3] + 6 * m**2 * raw[2] - 3 * m**4
    return m, var, m4


def _check_moments(x, mean, var, m4):
    n = x.size
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - mean) < Z * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < Z * math.sqrt((m4 - var**2) / n) + 1e-12, (x.var(), var)


def _corr_bound(n):
    return Z / math.sqrt(n)


# ------------------------------------------------------------------------ the paper's model


@pytest.mark.parametrize("dist,moments", [("normal", _normal_moments),
                                          ("lognormal", _lognormal_moments)])
@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_within_factor_moments(dist, moments, sigma):
    vm = VariabilityModel(sigma, 0.0, distribution=dist)
    f = vm.sample(jax.random.key(1), kernels((200, 250)))["l0"]["kernel"]  # 50,000 cells
    _check_moments(f, *moments(sigma))
    assert vm.factor_mean() == pytest.approx(moments(sigma)[0])
    assert vm.factor_variance() == pytest.approx(moments(sigma)[1])


@pytest.mark.parametrize("dist,moments", [("normal", _positive_gain_moments),
                                          ("lognormal", _lognormal_moments)])
def test_between_factor_moments_across_chips(dist, moments):
    device = paper(0.0, 0.3, "chip", dist)
    chips = sample_chips(jax.random.key(2), device, {"w": jnp.zeros((2, 3))}, 4000)
    f = chips["w"].states[0]
    per_chip = f[:, 0, 0]
    # Shared exactly by all cells of a chip ...
    np.testing.assert_array_equal(f, jnp.broadcast_to(per_chip[:, None, None], (4000, 2, 3)))
    # ... with the model's moments across chips.
    _check_moments(per_chip, *moments(0.3))


def test_within_factors_are_independent_across_cells():
    f = VariabilityModel(0.3).sample(jax.random.key(3), kernels((20000, 2)))["l0"]["kernel"]
    a, b = np.asarray(f[:, 0]), np.asarray(f[:, 1])
    assert abs(np.corrcoef(a, b)[0, 1]) < _corr_bound(a.size)
    flat = np.asarray(f).ravel()  # neighbouring cells along the flat layout too
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < _corr_bound(flat.size)


def test_layer_granularity_shared_within_layer_independent_across_layers():
    template = {f"l{i}": {"kernel": jnp.zeros((3, 4))} for i in range(2)}
    chips = sample_chips(jax.random.key(4), paper(0.0, 0.2, "layer"), template, 3000)
    l0, l1 = factors(chips, "l0"), factors(chips, "l1")
    np.testing.assert_array_equal(l0, jnp.broadcast_to(l0[:, :1, :1], l0.shape))
    np.testing.assert_array_equal(l1, jnp.broadcast_to(l1[:, :1, :1], l1.shape))
    a, b = np.asarray(l0[:, 0, 0]), np.asarray(l1[:, 0, 0])
    assert abs(np.corrcoef(a, b)[0, 1]) < _corr_bound(a.size)
    _check_moments(a, *_positive_gain_moments(0.2))


def test_column_granularity_shared_per_output_column():
    chips = sample_chips(jax.random.key(5), paper(0.0, 0.2, "column"),
                         {"k": jnp.zeros((3, 3, 4, 16))}, 500)
    k = factors(chips, "k")
    # identical down each output column ...
    np.testing.assert_array_equal(k, jnp.broadcast_to(k[:, :1, :1, :1, :], k.shape))
    cols = np.asarray(k[:, 0, 0, 0, :])  # [chips, columns]
    # ... independent across columns and across chips
    assert abs(np.corrcoef(cols[:, 0], cols[:, 1])[0, 1]) < _corr_bound(cols.shape[0])
    _check_moments(cols, *_positive_gain_moments(0.2))


def test_chip_granularity_is_shared_across_layers():
    chip = sample_chip(jax.random.key(6), paper(0.0, 0.4, "chip"), TEMPLATE)
    v = float(factors(chip).ravel()[0])
    assert v != 1.0
    for name in TEMPLATE:
        np.testing.assert_array_equal(factors(chip, name), v)


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
@pytest.mark.parametrize("granularity", ["chip", "layer", "column"])
def test_total_variance_composes(dist, granularity):
    vm = VariabilityModel(0.2, 0.15, granularity, dist)
    chips = sample_chips(jax.random.key(7), from_variability(vm), {"k": jnp.zeros((4, 50))}, 3000)
    x = np.asarray(factors(chips, "k"), np.float64)
    n_chips = x.shape[0]
    # Cells of one chip share the between factor, so the grand mean's standard error is set
    # by the chips: at most sqrt(var / n_chips).
    assert abs(x.mean() - vm.factor_mean()) < Z * math.sqrt(vm.factor_variance() / n_chips)
    # The exact composition of independent factors: Var(w b) = E w^2 E b^2 - (E w E b)^2,
    # i.e. (1 + vw)(vb + mb^2) - mb^2 (normal: b the positive gain) or (e^v - 1) e^v.
    vw, vb = 0.2**2, 0.15**2
    if dist == "normal":
        mb, vb_, _ = _positive_gain_moments(0.15)
        exact_mean, exact = mb, (1 + vw) * (vb_ + mb**2) - mb**2
    else:
        exact_mean, exact = math.exp((vw + vb) / 2), (math.exp(vw + vb) - 1) * math.exp(vw + vb)
    assert vm.factor_mean() == pytest.approx(exact_mean, rel=1e-9)
    assert vm.factor_variance() == pytest.approx(exact, rel=1e-6)
    rel_se = Z * math.sqrt(2.0 / n_chips)  # conservative: at least n_chips effective samples
    assert abs(x.var() / exact - 1) < rel_se


def test_from_total_splits_variance():
    vm = VariabilityModel.from_total(0.5, 0.36, between_granularity="layer")
    assert vm.sigma_within**2 + vm.sigma_between**2 == pytest.approx(0.25)
    assert vm.sigma_between == pytest.approx(0.3)
    assert vm.between_granularity == "layer"
    with pytest.raises(ValueError, match="between_fraction"):
        VariabilityModel.from_total(0.5, 1.5)


@pytest.mark.parametrize("granularity", ["chip", "layer", "column"])
def test_between_factors_are_what_the_chip_multiplies_in(granularity):
    key = jax.random.key(11)
    chip = sample_chip(key, paper(0.2, 0.3, granularity), TEMPLATE)
    within_only = sample_chip(key, paper(0.2), TEMPLATE)
    between = between_factors(key, VariabilityModel(0.2, 0.3, granularity), TEMPLATE)
    for name, shape in zip(TEMPLATE, SHAPES, strict=True):
        b = np.asarray(between[name]["kernel"])
        assert b.size == (shape[-1] if granularity == "column" else 1)
        np.testing.assert_allclose(factors(chip, name), factors(within_only, name) * b,
                                   rtol=1e-6)


@pytest.mark.parametrize("granularity", ["chip", "layer", "column"])
def test_normal_between_gains_are_positive(granularity):
    """The normal model's between-chip gain 1 + s z is conditioned on being positive (a gain
    cannot flip a layer's sign): at s = 1 a plain normal would be negative 16% of the time;
    none is, and the gains have the truncated normal's moments."""
    vm = VariabilityModel(0.0, 1.0, granularity)
    keys = chip_keys(jax.random.key(12), 4000)
    gains = jax.vmap(lambda k: between_factors(k, vm, TEMPLATE))(keys)
    g = np.asarray(gains["dense"]["kernel"]).reshape(4000, -1)[:, 0]
    assert np.all(g > 0)
    for leaf in jax.tree.leaves(gains):
        assert np.all(np.asarray(leaf) > 0)
    _check_moments(g, *_positive_gain_moments(1.0))
    mean, var, _ = _positive_gain_moments(1.0)
    assert vm.factor_mean() == pytest.approx(mean, rel=1e-6)
    assert vm.factor_variance() == pytest.approx(var, rel=1e-6)


# ------------------------------------------------------------------------ keys and chips


def test_same_key_same_chip_and_different_keys_differ():
    device = paper(0.3, 0.1, "column")
    a = sample_chip(jax.random.key(8), device, TEMPLATE)
    b = sample_chip(jax.random.key(8), device, TEMPLATE)
    c = sample_chip(jax.random.key(9), device, TEMPLATE)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c), strict=True):
        if x.ndim:  # the factors (t is 0 on every chip)
            np.testing.assert_array_equal(x, y)
            assert not np.array_equal(x, z)
    jitted = jax.jit(lambda k: sample_chip(k, device, TEMPLATE))(jax.random.key(8))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # eager vs jit: ulps


def test_batched_chips_equal_single_chips_and_keys_do_not_depend_on_chunks():
    device = paper(0.2, 0.1, "layer")
    key = jax.random.key(10)
    chips = sample_chips(key, device, TEMPLATE, 5)
    keys = chip_keys(key, 5)
    # chip i is drawn from fold_in(key, i), however many chips are drawn
    for i in (0, 3):
        np.testing.assert_array_equal(jax.random.key_data(keys[i]),
                                      jax.random.key_data(jax.random.fold_in(key, i)))
        single = sample_chip(keys[i], device, TEMPLATE)
        np.testing.assert_allclose(factors(chips, "dense")[i], factors(single, "dense"),
                                   rtol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(chip_keys(key, 2, start=3)),
                                  jax.random.key_data(keys[3:5]))
    assert num_chips(chips) == 5 and num_chips(sample_chip(key, device, TEMPLATE)) is None
    assert chips["dense"]["kernel"].num_chips == 5


def test_chip_layout_follows_the_template():
    chip = sample_chip(jax.random.key(0), paper(0.1), TEMPLATE)
    assert jax.tree.structure(jax.tree.map(lambda _: 0, chip, is_leaf=devices.is_chip_layer)) \
        == jax.tree.structure(jax.tree.map(lambda _: 0, TEMPLATE))
    layer = chip["conv"]["kernel"]
    assert isinstance(layer, ChipLayer) and layer.shape == (3, 3, 4, 8)
    assert layer.t.shape == () and float(layer.t) == 0.0
    assert not layer.needs_key


@dataclasses.dataclass(frozen=True)
class Drift:
    """A test weight part: w * u * (1 + t)^-nu, with u ~ U(0.5, 1.5) fixed per cell."""

    nu: float = 0.5

    def sample(self, key, template):
        leaves, treedef = jax.tree_util.tree_flatten(template)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [
            jax.random.uniform(k, jnp.shape(leaf), minval=0.5, maxval=1.5)
            for k, leaf in zip(keys, leaves, strict=True)])

    def apply(self, w, state, t):
        t = jnp.reshape(t, jnp.shape(t) + (1,) * (jnp.ndim(w) - jnp.ndim(t)))  # (C,): a batch
        return w * state * (1.0 + t) ** -self.nu


def test_weight_parts_apply_in_order_with_their_own_keys_and_time():
    vm = VariabilityModel(0.2, 0.1)
    device = Device(weights=(vm, Drift()), name="paper+drift")
    key = jax.random.key(13)
    chip = sample_chip(key, device, TEMPLATE)
    # part 0 samples from the chip key itself: the paper device's chip, bit for bit
    np.testing.assert_array_equal(factors(chip), factors(sample_chip(key, paper(0.2, 0.1),
                                                                     TEMPLATE)))
    # part 1 from part_key(key, 1), not from the chip key
    u_expected = Drift().sample(part_key(key, 1), TEMPLATE)["conv"]["kernel"]
    np.testing.assert_array_equal(chip["conv"]["kernel"].states[1], u_expected)
    assert not np.array_equal(Drift().sample(key, TEMPLATE)["conv"]["kernel"], u_expected)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 4, 8)), jnp.float32)
    f, u = (np.asarray(s, np.float64) for s in chip["conv"]["kernel"].states)
    for t in (0.0, 3.0):
        got = at_time(chip, t)["conv"]["kernel"].weights(w)
        np.testing.assert_allclose(got, np.asarray(w) * f * u * (1.0 + t) ** -0.5, rtol=1e-5)


def test_chip_batch_weights_read_at_their_own_times():
    device = Device(weights=(Drift(nu=1.0),))
    chips = sample_chips(jax.random.key(14), device, {"d": {"kernel": jnp.zeros((4, 3))}}, 3)
    layer = chips["d"]["kernel"]
    w = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) - 5.0
    times = jnp.array([0.0, 1.0, 3.0])
    out = layer.replace(t=times).weights(w)  # per-chip read times
    assert out.shape == (3, 4, 3)
    u = np.asarray(layer.states[0])
    for c, t in enumerate((0.0, 1.0, 3.0)):
        np.testing.assert_allclose(out[c], np.asarray(w) * u[c] / (1.0 + t), rtol=1e-6)
    timed = at_time(chips, 2.0)["d"]["kernel"]
    assert timed.t.shape == (3,)
    np.testing.assert_array_equal(timed.t, 2.0)


# ------------------------------------------------------------------------ presets and config


def test_ideal_device_and_sigma_zero():
    assert ideal().is_ideal and paper(0.0, 0.0).is_ideal and not paper(0.1).is_ideal
    assert paper(0.0, 0.0) == ideal() and VariabilityModel().is_nominal
    chip = sample_chip(jax.random.key(0), ideal(), TEMPLATE)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 10)), jnp.float32)
    np.testing.assert_array_equal(chip["dense"]["kernel"].weights(w), w)
    # a paper part with both sigmas 0 draws factors of exactly one
    for f in jax.tree.leaves(VariabilityModel(0.0, 0.0).sample(jax.random.key(0), TEMPLATE)):
        np.testing.assert_array_equal(f, 1.0)


def test_device_config_builds_the_presets():
    assert DeviceConfig().is_ideal and DeviceConfig(preset="ideal").build() == ideal()
    cfg = DeviceConfig(sigma_within=0.3, sigma_between=0.1, between_granularity="column",
                       distribution="lognormal")
    assert not cfg.is_ideal
    assert cfg.build() == paper(0.3, 0.1, "column", "lognormal")
    assert cfg.variability == VariabilityModel(0.3, 0.1, "column", "lognormal")
    with pytest.raises(ValueError, match="preset='ideal' has no variation"):
        DeviceConfig(preset="ideal", sigma_within=0.1)
    with pytest.raises(ValueError, match="preset='pcm2' is unknown.*ideal.*paper"):
        DeviceConfig(preset="pcm2")
    with pytest.raises(ValueError, match="sigma_between"):
        DeviceConfig(sigma_between=-0.1)


@pytest.mark.parametrize("value", [np.float32(0.1), np.float64(0.1), jnp.asarray(0.1),
                                   jnp.asarray(0.1, jnp.float32), np.int64(0), 1])
def test_sigma_accepts_numpy_and_jax_scalars(value):
    vm = VariabilityModel(sigma_within=value, sigma_between=value)
    assert type(vm.sigma_within) is float and type(vm.sigma_between) is float
    assert vm.sigma_within == pytest.approx(float(value))
    assert hash(vm) == hash(VariabilityModel(float(value), float(value)))  # a static argument
    cfg = DeviceConfig(sigma_within=value)
    assert type(cfg.sigma_within) is float
    assert paper(value).weights in ((), (VariabilityModel(float(value)),))


@pytest.mark.parametrize(
    "kwargs,field",
    [({"sigma_within": -0.1}, "sigma_within"), ({"sigma_between": -1}, "sigma_between"),
     ({"sigma_within": float("nan")}, "sigma_within"), ({"sigma_within": "0.1"}, "sigma_within"),
     ({"sigma_within": True}, "sigma_within"), ({"sigma_within": np.ones(2)}, "sigma_within"),
     ({"sigma_between": float("inf")}, "sigma_between"),
     ({"between_granularity": "row"}, "between_granularity"),
     ({"distribution": "uniform"}, "distribution")],
)
def test_bad_input(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VariabilityModel(**kwargs)


def test_bad_input_names_allowed_values():
    with pytest.raises(ValueError, match="chip.*layer.*column"):
        VariabilityModel(between_granularity="array")
    with pytest.raises(ValueError, match="normal.*lognormal"):
        VariabilityModel(distribution="gaussian")
    with pytest.raises(ValueError, match="num_chips"):
        chip_keys(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="template"):
        sample_chip(jax.random.key(0), paper(0.1), {})
    with pytest.raises(ValueError, match="pimjax.devices.Device"):
        sample_chip(jax.random.key(0), VariabilityModel(0.1), TEMPLATE)
    with pytest.raises(ValueError, match=r"sample\(key, template\).*apply"):
        Device(weights=(object(),))
    with pytest.raises(ValueError, match="not a chip"):
        num_chips({"w": jnp.ones(3)})
