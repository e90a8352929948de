"""pimjax.ops: conv2d/dense equal lax's forward exactly and jax.grad of it within 1e-5."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pimjax import ops, runtime

# No test here claims bit-identity across programs: compile at the "fast" XLA level
# (most optimizations off, see conftest.py).
pytestmark = pytest.mark.xla_level("fast")

DN = ("NHWC", "HWIO", "NHWC")
TOL = 1e-5


def rel(a, b) -> float:
    """Relative error ``|a - b| / |b|`` in the Frobenius norm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def ref_conv(x, w, strides, padding):
    """The reference: lax's conv with XLA's own gradient."""
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def data(b, h, w_, cin, cout, k, seed=0):
    """Random input and kernel (numpy-built: eager jax.random compiles slowly)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w_, cin)).astype(np.float32)
    w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def vjp_fn(conv, strides, padding):
    """``(x, w, g) -> (dx, dw)``, the pull-back of ``g`` through a conv function."""
    return lambda x, w, g: jax.vjp(lambda x, w: conv(x, w, strides, padding), x, w)[1](g)


def check_against_ref(x, w, strides, padding, seed=1):
    """Forward bitwise equal, both gradients of the custom VJP within TOL of XLA's."""
    y_ref = jax.jit(lambda x, w: ref_conv(x, w, strides, padding))(x, w)
    y = jax.jit(lambda x, w: ops.conv2d(x, w, strides, padding, grad="custom"))(x, w)
    np.testing.assert_array_equal(y, y_ref)
    g = jnp.asarray(np.random.default_rng(seed).standard_normal(y_ref.shape), jnp.float32)
    # One compile for both pull-backs keeps the test quick.
    both = jax.jit(
        lambda *a: (
            vjp_fn(ref_conv, strides, padding)(*a),
            vjp_fn(custom_conv, strides, padding)(*a),
        )
    )
    (rx, rw), (dx, dw) = both(x, w, g)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert rel(dx, rx) < TOL, rel(dx, rx)
    assert rel(dw, rw) < TOL, rel(dw, rw)


def custom_conv(x, w, strides, padding):
    """ops.conv2d forced onto its custom VJP (``auto`` sends some convs to XLA's gradient)."""
    return ops.conv2d(x, w, strides, padding, grad="custom")


CHANNELS = [(1, 6), (16, 16), (64, 3)]  # (6, 16) etc. in FORMULATION_CASES


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("cin,cout", CHANNELS)
def test_conv2d_matches_lax(k, stride, padding, cin, cout):
    """The custom VJP's dispatch over kernel 1/3/5, stride 1/2, SAME/VALID, 1..64 channels."""
    hw = 9 if (k + cin) % 2 else 8  # odd and even sizes
    x, w = data(2, hw, hw - 1, cin, cout, k, seed=k + cin)
    check_against_ref(x, w, (stride, stride), padding)


EXPLICIT = [
    ((2, 1), (0, 3)),  # asymmetric
    ((-1, 0), (1, -1)),  # negative pads crop the input
    ((4, 4), (4, 4)),  # pads wider than the kernel
]


@pytest.mark.parametrize("padding", EXPLICIT)
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_conv2d_explicit_padding(padding, stride):
    """Explicit (lo, hi) pads, negative ones and unequal strides included."""
    x, w = data(2, 9, 8, 8, 4, 3)
    check_against_ref(x, w, stride, padding)


# Every formulation on its own, whatever the dispatch would pick.
FORMULATION_CASES = [
    # (b, h, w, cin, cout, k, stride, padding)
    (3, 9, 8, 1, 4, 5, (1, 1), "SAME"),
    (3, 8, 9, 6, 8, 3, (2, 2), "SAME"),
    (3, 9, 9, 16, 4, 3, (2, 1), "VALID"),
    (2, 8, 8, 8, 8, 1, (2, 2), "SAME"),
    (2, 9, 7, 3, 5, 4, (3, 2), ((1, 2), (3, 0))),
    (2, 7, 9, 5, 3, 3, (1, 1), ((-1, 2), (2, -1))),
    (2, 7, 8, 4, 3, 1, (1, 1), ((2, 1), (1, 0))),  # 1x1 "transpose" with negative pads
]


@pytest.mark.parametrize("case", FORMULATION_CASES)
def test_each_formulation(case, monkeypatch):
    """Both weight-gradient layouts and all input-gradient formulations, chunked with a tail."""
    b, h, w_, cin, cout, k, strides, padding = case
    monkeypatch.setattr(ops, "CHUNK_BYTES", 1)  # one image per chunk: scan + tail paths
    x, w = data(b, h, w_, cin, cout, k)
    y = jax.eval_shape(lambda x, w: ref_conv(x, w, strides, padding), x, w)
    g = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), jnp.float32)
    rx, rw = jax.jit(vjp_fn(ref_conv, strides, padding))(x, w, g)
    pads = ops.explicit_pads(x.shape, w.shape, strides, padding)

    @jax.jit
    def grads(x, w, g):
        dws = [ops.weight_grad(x, g, (k, k), strides, pads, lay) for lay in ("nhwc", "cf")]
        forms = ["col2im", "subpixel"] + (["transpose"] if strides == (1, 1) else [])
        dxs = [ops.input_grad(g, w, x.shape, strides, pads, f) for f in forms]
        return dws, dxs

    dws, dxs = grads(x, w, g)
    for dw in dws:
        assert rel(dw, rw) < TOL
    for dx in dxs:
        assert rel(dx, rx) < TOL


def test_chunk_size():
    """Chunks are cache sized, divide the batch where they can, never exceed it."""
    per = ops.CHUNK_BYTES // 26
    assert ops._chunk_size(256, per) == 16  # largest divisor of 256 in [13, 26]
    assert ops._chunk_size(8, per) == 8
    assert ops._chunk_size(37, per) == 19  # prime batch: two balanced chunks, short tail
    assert ops._chunk_size(4, ops.CHUNK_BYTES * 10) == 1


def test_chunked_default_path(monkeypatch):
    """The custom VJP's dispatch with a batch cut into uneven chunks (scan plus tail)."""
    monkeypatch.setattr(ops, "CHUNK_BYTES", 3 * 8 * 8 * 9 * 16 * 4)  # 3 images of 7
    x, w = data(7, 8, 8, 16, 8, 3)
    check_against_ref(x, w, (1, 1), "SAME")
    check_against_ref(x, w, (2, 2), "SAME")


def test_vmap_over_weights():
    """One weight per chip: vmap over w only, forward and gradient."""
    x, _ = data(2, 8, 8, 6, 4, 3)
    ws = jnp.asarray(np.random.default_rng(3).standard_normal((3, 3, 3, 6, 4)), jnp.float32)

    def loss(conv, ws):
        y = jax.vmap(lambda w: conv(x, w, (2, 2), "SAME"))(ws)
        return jnp.sum(jnp.sin(y))

    y = jax.jit(jax.vmap(lambda w: ops.conv2d(x, w, (2, 2), "SAME")))(ws)
    y_ref = jax.jit(lambda ws: [ref_conv(x, w, (2, 2), "SAME") for w in ws])(ws)
    assert rel(y, jnp.stack(y_ref)) < TOL
    g = jax.jit(jax.grad(lambda ws: loss(ops.conv2d, ws)))(ws)
    g_ref = jax.jit(jax.grad(lambda ws: loss(ref_conv, ws)))(ws)
    assert rel(g, g_ref) < TOL


def test_vmap_over_both_and_grad_wrt_both():
    """vmap over x and w together, jax.grad with respect to both arguments."""
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((2, 2, 9, 9, 3)), jnp.float32)
    ws = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 3, 3, 5)), jnp.float32)

    def loss(conv, xs, ws):
        y = jax.vmap(lambda x, w: conv(x, w, (1, 1), "VALID"))(xs, ws)
        return jnp.sum(y**2)

    got = jax.jit(jax.grad(lambda a, b: loss(ops.conv2d, a, b), argnums=(0, 1)))(xs, ws)
    want = jax.jit(jax.grad(lambda a, b: loss(ref_conv, a, b), argnums=(0, 1)))(xs, ws)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL


class _Net(nn.Module):
    """Conv -> relu -> stride-2 conv -> dense, with a pluggable conv/dense."""

    conv: object
    dense: object

    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", nn.initializers.lecun_normal(), (3, 3, 1, 4))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (3, 3, 4, 8))
        w3 = self.param("w3", nn.initializers.lecun_normal(), (8 * 4 * 4, 10))
        h = jax.nn.relu(self.conv(x, w1, (1, 1), "SAME"))
        h = jax.nn.relu(self.conv(h, w2, (2, 2), "SAME"))
        return self.dense(h.reshape(h.shape[0], -1), w3)


def test_grad_through_flax_model():
    """jax.grad of a loss through a Flax model equals the same model on lax primitives."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 8, 8, 1)), jnp.float32)
    labels = jnp.array([1, 3, 5, 7])
    ours, ref = _Net(ops.conv2d, ops.dense), _Net(ref_conv, jnp.dot)
    params = jax.jit(ours.init)(jax.random.PRNGKey(0), x)

    def loss(model, params):
        logits = model.apply(params, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    got = jax.jit(jax.grad(lambda p: loss(ours, p)))(params)
    want = jax.jit(jax.grad(lambda p: loss(ref, p)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel(a, b) < TOL


def test_dense_matches_dot():
    """dense is x @ w over leading dims, with jnp.dot's gradient, under jit and vmap."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((12, 7)), jnp.float32)
    np.testing.assert_array_equal(jax.jit(ops.dense)(x, w), jnp.dot(x, w))
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)))
    got = jax.jit(jax.grad(loss(ops.dense), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(jnp.dot), argnums=(0, 1)))(x, w)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < TOL
    ws = jnp.stack([w, 2 * w])
    ys = jax.vmap(lambda w: ops.dense(x, w))(ws)
    assert rel(ys[1], 2 * jnp.dot(x, w)) < TOL


def test_bfloat16_keeps_dtypes():
    """Low-precision inputs: gradients come back in the inputs' dtypes, close to float32's."""
    x, w = data(2, 8, 8, 16, 8, 3)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    loss = lambda x, w: jnp.sum(ops.conv2d(x, w).astype(jnp.float32) ** 2)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(xb, wb)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    rx, rw = jax.jit(jax.grad(loss, argnums=(0, 1)))(xb.astype(jnp.float32), wb.astype(jnp.float32))
    assert rel(dx, rx) < 0.05 and rel(dw, rw) < 0.05


def test_rejects_bad_arguments():
    """Wrong ranks and malformed strides/padding fail loudly."""
    x, w = data(1, 8, 8, 2, 2, 3)
    with pytest.raises(ValueError):
        ops.conv2d(x[0], w)
    with pytest.raises(ValueError):
        ops.conv2d(x, w, strides=(1, 1, 1))
    with pytest.raises(ValueError):
        ops.conv2d(x, w, padding=((1, 1),))


@pytest.mark.parametrize("shape", [(4, 28, 28, 6), (3, 10, 10, 16), (2, 5, 7, 3, 8)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_matches_flax(shape, ties):
    # odd sizes drop the last row/column (VALID); extra leading dims (a chip batch) fold in.
    # With ties (quantized ReLU outputs) the first maximum of a window gets the gradient.
    # NumPy-built inputs and one jitted program: eager jax.random and ops compile slowly
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    if ties:
        x = np.round(np.maximum(x, 0) * 2) / 2
    g = rng.standard_normal((*shape[:-3], shape[-3] // 2, shape[-2] // 2, shape[-1]))

    @jax.jit
    def both(x, g):
        ours = jax.value_and_grad(lambda a: jnp.sum(ops.max_pool_2x2(a) * g))
        ref = jax.value_and_grad(lambda a: jnp.sum(nn.max_pool(a, (2, 2), (2, 2)) * g))
        return ops.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)), ours(x)[1], ref(x)[1]

    y, y_ref, dx, dref = both(jnp.asarray(x), jnp.asarray(g, jnp.float32))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dref)


def test_grad_choice_auto_custom_xla(monkeypatch):
    """``auto`` takes XLA's gradient only for stride-1, >= 16-channel convs under the flag."""
    x, w = data(1, 8, 8, 16, 4, 3)

    def custom(**kw):
        return "custom_vjp" in str(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w, **kw))(x, w))

    monkeypatch.setenv("XLA_FLAGS", " ".join(runtime.CPU_FLAGS))
    assert not custom(grad="auto") and custom(grad="custom") and not custom(grad="xla")
    assert custom(grad="auto", strides=(2, 2))
    monkeypatch.setenv("XLA_FLAGS", "")
    assert custom(grad="auto")
    with pytest.raises(ValueError, match="grad='fast' is unknown"):
        ops.conv2d(x, w, grad="fast")
