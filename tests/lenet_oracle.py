"""An independent NumPy (float64) re-implementation of pimjax's analog LeNet-5 forward pass.

It shares no code with pimjax: the quantizers, the MSE weight-scale search, the convolutions,
batch norm (inference mode), max pooling and the chip's multiplicative factors are written
out here from their definitions (docs/model.md, the paper), so the tests can compare the
library against it. Layer names are the Flax module names of ``pimjax.models.LeNet5``.
"""

from __future__ import annotations

import numpy as np

ANALOG = ("AnalogConv_0", "AnalogConv_1", "AnalogDense_0", "AnalogDense_1", "AnalogDense_2")
BN_OF = {"AnalogConv_0": "BatchNorm_0", "AnalogConv_1": "BatchNorm_1",
         "AnalogDense_0": "BatchNorm_2", "AnalogDense_1": "BatchNorm_3"}
BN_EPS = 1e-5
MSE_GRID = 64


def weight_scale_mse(w, bits):
    """argmin over c in {1/64, 2/64, ..., 1} of ||q(w; c max|w| / Q) - w||^2, times max|w| / Q."""
    q = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float64)
    wmax = np.abs(w).max()
    best, best_err = None, np.inf
    for c in np.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID):
        s = c * wmax / q
        err = np.sum((s * np.clip(np.round(w / s), -q, q) - w) ** 2)
        if err < best_err:  # the first minimum wins, as argmin
            best, best_err = s, err
    return best


def quantize_weight(w, bits):
    """Symmetric uniform b-bit weight quantizer with the MSE-optimal scale."""
    q = 2 ** (bits - 1) - 1
    s = weight_scale_mse(w, bits)
    return s * np.clip(np.round(np.asarray(w, np.float64) / s), -q, q)


def quantize_act(x, bits, clip):
    """Unsigned activation quantizer (after a ReLU): levels clip * k / L, k in 0..L = 2^b - 1."""
    levels = 2**bits - 1
    step = float(clip) / levels
    return step * np.round(np.clip(x / step, 0, levels))


def quantize_range(x, bits, lo, hi):
    """The first layer's (signed) input quantizer: 2^b levels lo + k (hi - lo) / (2^b - 1)."""
    levels = 2**bits - 1
    step = (float(hi) - float(lo)) / levels
    return float(lo) + step * np.round(np.clip((x - float(lo)) / step, 0, levels))


def conv2d(x, w, pad):
    """Stride-1 NHWC x HWIO convolution with symmetric zero padding ``pad``."""
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))  # b,h,w,c,kh,kw
    return np.einsum("bhwcij,ijco->bhwo", win, w)


def max_pool(x):
    """2x2 max pool, stride 2."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def batch_norm(x, stats, params):
    """Batch norm in inference mode: the running mean and variance."""
    return ((x - stats["mean"]) / np.sqrt(stats["var"] + BN_EPS) * params["scale"]
            + params["bias"])


def _np(tree):
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def forward(variables, x, weight_bits=2, act_bits=4, factors=None, tune=None, edit=None,
            start=None):
    """Logits and each analog layer's MVM output of LeNet-5 on normalized images ``x``.

    ``factors``: layer name -> multiplicative factor of the quantized kernel (one chip).
    ``tune``: layer name -> (gain, offset) applied to the MVM output (default: the variables').
    ``edit(name, y) -> y`` replaces MVM outputs. ``start=(name, y)``: that layer outputs ``y``
    (after tune and bias) instead of computing it. Returns ``(logits, {name: mvm})``.
    """
    params, stats = _np(variables["params"]), _np(variables["batch_stats"])
    tune_vars = _np(variables.get("tune", {}))
    factors = factors or {}
    mvms = {}

    def analog(name, h, linear):
        if start is not None and start[0] == name:
            return np.asarray(start[1], np.float64)
        p = params[name]
        q = stats[name]["input_quant"]
        if name == "AnalogConv_0":  # signed input: the running [min, max] range
            hq = quantize_range(h, act_bits, q["act_min"], q["act_max"])
        else:
            hq = quantize_act(h, act_bits, q["act_max"])
        w = quantize_weight(p["kernel"], weight_bits)
        if name in factors:
            w = w * np.asarray(factors[name], np.float64)
        y = linear(hq, w)
        if edit is not None:
            y = edit(name, y)
        mvms[name] = y
        if tune is not None and name in tune:
            gain, offset = tune[name]
        else:
            gain, offset = tune_vars[name]["gain"], tune_vars[name]["offset"]
        y = y * np.asarray(gain, np.float64) + np.asarray(offset, np.float64)
        return y + p["bias"] if "bias" in p else y

    def bn_relu(name, h):
        bn = BN_OF[name]
        return np.maximum(batch_norm(h, stats[bn], params[bn]), 0.0)

    h = np.asarray(x, np.float64)
    h = analog("AnalogConv_0", h, lambda a, w: conv2d(a, w, 2))
    h = max_pool(bn_relu("AnalogConv_0", h))
    h = analog("AnalogConv_1", h, lambda a, w: conv2d(a, w, 0))
    h = max_pool(bn_relu("AnalogConv_1", h))
    h = h.reshape(h.shape[0], -1)
    for name in ("AnalogDense_0", "AnalogDense_1"):
        h = bn_relu(name, analog(name, h, np.dot))
    return analog("AnalogDense_2", h, np.dot), mvms
