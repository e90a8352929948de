"""The aihwkit 1.1 side of the LeNet-5 accuracy comparison under PCM (runs under aihwkit's Python).

:func:`build_lenet` loads pimjax LeNet-5 weights (float numpy arrays, already quantized, keyed
like Flax's flattened variables: ``"AnalogConv_0/kernel"``, ``"BatchNorm_0/scale"``,
``"BatchNorm_0/mean"``, ...) into an ``AnalogSequential`` of the same architecture:

    conv 5x5 6 SAME, BN, relu, maxpool 2, conv 5x5 16 VALID, BN, relu, maxpool 2,
    dense 120, BN, relu, dense 84, BN, relu, dense 10 (+ bias)

:func:`evaluate` programs N chips (``program_analog_weights`` draws new programming noise and
drift exponents each time), drifts each to ``t`` and returns the per-chip accuracy. The
``rpu_config`` defaults to pimjax's assumptions: ``TorchInferenceRPUConfig`` with
``mapping.weight_scaling_omega = 1`` (weights normalised per layer, or per column) and bound
management off (pimjax's ``Periphery`` default), and no drift compensation unless asked.

Smoke run (random weights and images, prints 2 chips' accuracies)::

    OMP_WAIT_POLICY=PASSIVE <aihwkit python> benchmarks/aihwkit_lenet.py --smoke

Accuracy comparison: ``benchmarks/aihwkit_lenet_compare.py`` (pimjax env) exports trained
weights and calls this script's ``--evaluate`` under aihwkit's Python.

Layout check (pimjax's float LeNet-5 logits vs this model with a perfect periphery)::

    PYTHONPATH=. python benchmarks/aihwkit_lenet.py --export lenet.npz
    OMP_WAIT_POLICY=PASSIVE <aihwkit python> benchmarks/aihwkit_lenet.py --check lenet.npz
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

ANALOG = ("AnalogConv_0", "AnalogConv_1", "AnalogDense_0", "AnalogDense_1", "AnalogDense_2")


def default_rpu_config(per_column: bool = False, bound_management: bool = False,
                       drift_compensation: bool = False):
    """``TorchInferenceRPUConfig`` matching pimjax's PCM + Periphery defaults."""
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType

    cfg = TorchInferenceRPUConfig()
    cfg.mapping.weight_scaling_omega = 1.0
    cfg.mapping.weight_scaling_columnwise = per_column
    if not bound_management:
        cfg.forward.bound_management = BoundManagementType.NONE
    if not drift_compensation:
        cfg.drift_compensation = None
    return cfg


def act_quant(bits: int, hi: float, lo: float | None = None):
    """pimjax's activation quantizers as a torch module: ``quant.quantize_activations``
    (``2^b`` levels over ``[0, hi]``) or, given ``lo``, ``quant.quantize_affine`` (``2^b``
    levels over ``[lo, hi]``, the signed first layer's)."""
    import torch

    levels = 2**bits - 1
    base = 0.0 if lo is None else lo
    step = max(hi - base, 1e-8) / levels if lo is not None else hi / levels

    class ActQuant(torch.nn.Module):
        def forward(self, x):
            return base + step * torch.round(torch.clamp((x - base) / step, 0, levels))

    return ActQuant()


def build_lenet(params: dict, rpu_config=None, act_bits: int | None = None):
    """An ``AnalogSequential`` LeNet-5 (NCHW input) holding ``params`` (pimjax layouts).

    ``act_bits`` inserts pimjax's input-activation quantizer before each analog layer, with the
    range ``params["<layer>/input_quant/act_max"]`` (and ``act_min`` for the first layer,
    whose input is signed).
    """
    import torch
    from aihwkit.nn import AnalogConv2d, AnalogLinear, AnalogSequential
    from torch import nn

    cfg = rpu_config or default_rpu_config()

    def p(name):
        if name not in params:
            raise ValueError(f"params has no {name!r}: pass pimjax LeNet-5 variables, flattened")
        return torch.as_tensor(np.asarray(params[name], np.float32))

    def bn(i, n, dims):
        m = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(n, eps=1e-5)
        m.weight.data, m.bias.data = p(f"BatchNorm_{i}/scale"), p(f"BatchNorm_{i}/bias")
        m.running_mean.data, m.running_var.data = p(f"BatchNorm_{i}/mean"), p(f"BatchNorm_{i}/var")
        return m

    def quant(layer, signed=False):
        if act_bits is None:
            return []
        lo = float(params[f"{layer}/input_quant/act_min"]) if signed else None
        return [act_quant(act_bits, float(params[f"{layer}/input_quant/act_max"]), lo)]

    conv0 = AnalogConv2d(1, 6, 5, padding=2, bias=False, rpu_config=cfg)
    conv0.set_weights(p("AnalogConv_0/kernel").permute(3, 2, 0, 1))  # HWIO -> OIHW
    conv1 = AnalogConv2d(6, 16, 5, bias=False, rpu_config=cfg)
    conv1.set_weights(p("AnalogConv_1/kernel").permute(3, 2, 0, 1))
    dense0 = AnalogLinear(400, 120, bias=False, rpu_config=cfg)
    # pimjax flattens NHWC (h, w, c); torch flattens NCHW (c, h, w): reorder the rows
    k = p("AnalogDense_0/kernel").reshape(5, 5, 16, 120).permute(2, 0, 1, 3).reshape(400, 120)
    dense0.set_weights(k.T)
    dense1 = AnalogLinear(120, 84, bias=False, rpu_config=cfg)
    dense1.set_weights(p("AnalogDense_1/kernel").T)
    dense2 = AnalogLinear(84, 10, bias=True, rpu_config=cfg)
    dense2.set_weights(p("AnalogDense_2/kernel").T, p("AnalogDense_2/bias"))
    layers = [*quant("AnalogConv_0", True), conv0, bn(0, 6, 2), nn.ReLU(), nn.MaxPool2d(2),
              *quant("AnalogConv_1"), conv1, bn(1, 16, 2), nn.ReLU(), nn.MaxPool2d(2),
              nn.Flatten(), *quant("AnalogDense_0"), dense0, bn(2, 120, 1), nn.ReLU(),
              *quant("AnalogDense_1"), dense1, bn(3, 84, 1), nn.ReLU(),
              *quant("AnalogDense_2"), dense2]
    model = AnalogSequential(*layers)
    model.eval()
    return model


def evaluate(model, images, labels, chips: int, t: float, seed: int = 0, batch: int = 1000):
    """Accuracy of ``chips`` fresh programmings of ``model`` read at ``t`` s (images NHWC)."""
    import torch

    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels)).long()
    acc = np.zeros(chips)
    for c in range(chips):
        torch.manual_seed(seed + c)
        model.program_analog_weights()
        model.drift_analog_weights(t)
        correct = 0
        with torch.no_grad():
            for lo in range(0, len(x), batch):
                correct += int((model(x[lo:lo + batch]).argmax(1) == y[lo:lo + batch]).sum())
        acc[c] = correct / len(x)
    return acc


def _random_params(rng):
    shapes = {"AnalogConv_0/kernel": (5, 5, 1, 6), "AnalogConv_1/kernel": (5, 5, 6, 16),
              "AnalogDense_0/kernel": (400, 120), "AnalogDense_1/kernel": (120, 84),
              "AnalogDense_2/kernel": (84, 10)}
    params = {k: rng.normal(size=s).astype(np.float32) / np.sqrt(np.prod(s[:-1]))
              for k, s in shapes.items()}
    params["AnalogDense_2/bias"] = np.zeros(10, np.float32)
    for i, n in enumerate((6, 16, 120, 84)):
        params.update({f"BatchNorm_{i}/scale": np.ones(n), f"BatchNorm_{i}/bias": np.zeros(n),
                       f"BatchNorm_{i}/mean": np.zeros(n), f"BatchNorm_{i}/var": np.ones(n)})
    return params


def export_check(path: str) -> None:
    """(pimjax side) Save a random LeNet-5's flattened variables, inputs and float logits."""
    import flax
    import jax

    from pimjax.models import LeNet5

    model = LeNet5()
    x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    variables = model.init(jax.random.key(1), x)
    rng = np.random.default_rng(0)
    flat = {}
    for col in ("params", "batch_stats"):
        for k, v in flax.traverse_util.flatten_dict(variables[col], sep="/").items():
            v = np.asarray(v)
            if k.endswith(("mean", "bias")):  # non-trivial statistics and biases
                v = (0.1 * rng.normal(size=v.shape)).astype(np.float32)
            elif k.endswith("var"):
                v = rng.uniform(0.5, 2.0, size=v.shape).astype(np.float32)
            flat[k] = v
    params = {k: v for k, v in flat.items() if not k.endswith(("mean", "var"))}
    stats = {k: v for k, v in flat.items() if k.endswith(("mean", "var"))}
    unflat = flax.traverse_util.unflatten_dict
    logits = model.apply({**variables, "params": unflat(params, sep="/"),
                          "batch_stats": unflat(stats, sep="/")}, x)
    np.savez(path, x=np.asarray(x), logits=np.asarray(logits), **flat)


def check(path: str) -> float:
    """(aihwkit side) Max |logit difference| of :func:`build_lenet` with a perfect periphery."""
    import torch

    data = dict(np.load(path))
    cfg = default_rpu_config()
    cfg.forward.is_perfect = True
    model = build_lenet(data, cfg)
    with torch.no_grad():
        y = model(torch.as_tensor(data["x"]).permute(0, 3, 1, 2)).numpy()
    return float(np.abs(y - data["logits"]).max())


def evaluate_file(path: str, out: str, chips: int, times, seed: int = 0,
                  drift_compensation: bool = False) -> dict:
    """(aihwkit side) Per-chip accuracies of the LeNet-5 in ``path`` at each read time.

    ``path``: an ``.npz`` of flattened, already quantized pimjax variables, ``images`` (NHWC,
    normalized), ``labels`` and ``act_bits`` (0: float activations), written by
    ``benchmarks/aihwkit_lenet_compare.py``. Chip ``c`` at every time is programmed from
    ``torch.manual_seed(seed + c)``; ``drift_compensation`` keeps aihwkit's global drift
    compensation (the ``InferenceRPUConfig`` default). Writes ``{"nominal": acc, "t": [...],
    "accuracy": [[...], ...]}`` (one list per time; ``nominal``: the unprogrammed model with a
    perfect periphery) to ``out`` as JSON and returns it.
    """
    import json
    import time

    import torch

    data = dict(np.load(path))
    act_bits = int(data.pop("act_bits")) or None
    images, labels = data.pop("images"), data.pop("labels")
    perfect = default_rpu_config()
    perfect.forward.is_perfect = True  # digital: no periphery, weights as given (no PCM)
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = build_lenet(data, perfect, act_bits)(x)
    nominal = float((logits.argmax(1).numpy() == labels).mean())
    print(f"aihwkit nominal (perfect periphery, unprogrammed): {nominal:.4f}", flush=True)
    model = build_lenet(data, default_rpu_config(drift_compensation=drift_compensation),
                        act_bits)
    result = {"nominal": nominal, "t": [], "accuracy": [], "seconds": []}
    for t in times:
        start = time.perf_counter()
        acc = evaluate(model, images, labels, chips, float(t), seed)
        result["t"].append(float(t))
        result["accuracy"].append(acc.tolist())
        result["seconds"].append(time.perf_counter() - start)
        print(f"aihwkit t={t:g} s: mean {acc.mean():.4f} std {acc.std(ddof=1):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def main(argv=None) -> int:
    """Smoke run, the two halves of the layout check, or an evaluation of exported weights."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="random weights and images, 2 chips")
    p.add_argument("--export", metavar="NPZ", help="(pimjax env) write a random LeNet-5 check")
    p.add_argument("--check", metavar="NPZ", help="(aihwkit env) compare with an --export file")
    p.add_argument("--evaluate", metavar="NPZ",
                   help="(aihwkit env) per-chip accuracies of exported weights (see --out)")
    p.add_argument("--out", metavar="JSON", help="where --evaluate writes its accuracies")
    p.add_argument("--chips", type=int, default=100, help="chips per read time (--evaluate)")
    p.add_argument("--times", default="1,86400,31536000",
                   help="read times in seconds, comma-separated (--evaluate)")
    p.add_argument("--seed", type=int, default=0, help="chip c is torch.manual_seed(seed + c)")
    p.add_argument("--drift-compensation", action="store_true",
                   help="keep aihwkit's global drift compensation (--evaluate)")
    args = p.parse_args(argv)
    if args.export:
        export_check(args.export)
        return 0
    if args.check:
        print(f"max |logit diff| pimjax vs aihwkit (perfect periphery): {check(args.check):.3g}")
        return 0
    if args.evaluate:
        if not args.out:
            print("error: --evaluate needs --out JSON", file=sys.stderr)
            return 2
        times = [float(t) for t in args.times.split(",") if t.strip()]
        evaluate_file(args.evaluate, args.out, args.chips, times, args.seed,
                      args.drift_compensation)
        return 0
    if not args.smoke:
        print("error: pass --smoke, --export NPZ or --check NPZ", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    model = build_lenet(_random_params(rng))
    images = rng.normal(size=(64, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=64)
    print("accuracy per chip:", evaluate(model, images, labels, chips=2, t=86400.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
