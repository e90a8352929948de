"""pimjax vs IBM aihwkit 1.1: the same trained LeNet-5 weights under PCM, accuracy over chips.

The pimjax side (this script, in pimjax's environment) loads a trained LeNet-5 run, exports its
quantized kernels, batch norms and activation clips with the test images to an ``.npz``, and
scores ``--chips`` chips of ``devices.pcm()`` (programming noise, drift, read noise, 7-bit
DAC, 9-bit ADC, output noise 0.06, no bound management, no drift compensation) at each read
time with :func:`pimjax.montecarlo.evaluate_chips`. The aihwkit side runs
``benchmarks/aihwkit_lenet.py --evaluate`` under ``--aihwkit-python`` (an environment with
``aihwkit==1.1.0`` and torch): ``TorchInferenceRPUConfig`` with ``weight_scaling_omega = 1``,
bound management and drift compensation off, each chip re-programmed and drifted to ``t``.

``--compensations none,drift``: without compensation, and with global drift compensation on
both sides (aihwkit's ``GlobalDriftCompensation``, pimjax's ``pcm(drift_compensation=True)``).
``--acts quantized`` keeps the model's input-activation quantizers (pimjax's formula, inserted
before each aihwkit layer); ``--acts float`` evaluates the same weights with float activations
(weight-only quantization, act bits None), which takes activation handling out of the
comparison. For each (compensation, acts, t) it reports both sides' mean, std and standard
error (SE = std / sqrt(chips)) of the per-chip accuracy, and z = (mean_pimjax -
mean_aihwkit) / sqrt(SE_pimjax^2 + SE_aihwkit^2).

    PYTHONPATH=. python benchmarks/aihwkit_lenet_compare.py --run RUN_DIR \\
        --aihwkit-python AIHWKIT_VENV/bin/python --out results/aihwkit_lenet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import numpy as np

from pimjax import data, devices, files, introspect, montecarlo, runtime
from pimjax.quant import quantize_weights, weight_scale
from pimjax.train import load_model

HERE = Path(__file__).resolve().parent
ACTS = ("quantized", "float")


def float_activations(model, variables):
    """The same net with float activations: act bits None, the clips dropped."""
    model = model.clone(quant=dataclasses.replace(model.quant, act_bits=None))
    stats = flax.traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    stats = {k: v for k, v in stats.items() if not k.endswith("input_quant/act_max")}
    return model, {**variables, "batch_stats": flax.traverse_util.unflatten_dict(stats, sep="/")}


def export(model, variables, images, labels, path: Path) -> Path:
    """The ``.npz`` aihwkit_lenet.py --evaluate reads: flattened variables with each analog
    kernel replaced by its quantized value, the images, labels and activation bits."""
    q = model.quant
    if q.weight_scale == "lsq":
        raise ValueError("weight_scale='lsq' keeps its step in the params: export supports the "
                         "'mse' and 'max' estimators")
    flat = {}
    for col in ("params", "batch_stats"):
        for k, v in flax.traverse_util.flatten_dict(variables.get(col, {}), sep="/").items():
            flat[k] = np.asarray(v, np.float32)
    for layer in introspect.analog_layers(model):
        name = f"{layer.name}/kernel"
        kernel = flat[name]
        if q.weight_bits is not None:
            s = weight_scale(kernel, q.weight_bits, q.weight_scale, q.weight_per_channel)
            kernel = np.asarray(quantize_weights(kernel, q.weight_bits, s), np.float32)
        flat[name] = kernel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.asarray(images, np.float32), labels=np.asarray(labels),
             act_bits=np.int64(q.act_bits or 0), **flat)
    return path


def stats(acc) -> dict:
    """Mean, std, standard error, min and 5th percentile of per-chip accuracies."""
    acc = np.asarray(acc, np.float64)
    std = float(acc.std(ddof=1))
    return {"chips": int(acc.size), "mean": float(acc.mean()), "std": std,
            "se": std / np.sqrt(acc.size), "min": float(acc.min()),
            "p5": float(np.percentile(acc, 5))}


def main(argv=None) -> int:
    """Export, evaluate both sides, write and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained pimjax LeNet-5 run directory")
    p.add_argument("--aihwkit-python", required=True,
                   help="the Python of an environment with aihwkit 1.1.0 and torch")
    p.add_argument("--out", default="results/aihwkit_lenet", help="output folder")
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--test-images", type=int, default=2000, help="the first N MNIST test images")
    p.add_argument("--times", default="1,86400,31536000", help="read times (s), comma list")
    p.add_argument("--acts", default="quantized,float", help=f"comma list of {ACTS}")
    p.add_argument("--compensations", default="none,drift",
                   help="comma list of none (no drift compensation) and drift (global)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    comps = [c for c in args.compensations.split(",") if c]
    if not comps or set(comps) - {"none", "drift"}:
        p.error(f"--compensations {args.compensations!r}: use a comma list of none, drift")
    acts = [a for a in args.acts.split(",") if a]
    times = [float(t) for t in args.times.split(",") if t.strip()]
    if not acts or set(acts) - set(ACTS):
        p.error(f"--acts {args.acts!r}: use a comma list of {ACTS}")
    if args.chips < 2 or args.test_images < 1:
        p.error("--chips must be >= 2 and --test-images >= 1")
    if not Path(args.aihwkit_python).is_file():
        p.error(f"--aihwkit-python {args.aihwkit_python} does not exist")
    runtime.configure()
    out = Path(args.out)
    model, variables, config = load_model(args.run)
    if config.model.name != "lenet5":
        p.error(f"--run holds a {config.model.name}: this comparison is for LeNet-5")
    test = data.load_dataset("mnist", "test", limit=args.test_images)
    images, labels = np.asarray(data.normalize(test.images, "mnist")), np.asarray(test.labels)
    rows, meta = [], {"run": str(args.run), "quant": config.quant.name,
                      "command": " ".join(sys.argv), "device": repr(devices.pcm()),
                      "test_images": len(labels)}
    with files.run_lock(out), tempfile.TemporaryDirectory() as tmp:
        for comp, mode in [(c, a) for c in comps for a in acts]:
            device = devices.pcm(drift_compensation=comp == "drift")
            m, v = (model, variables) if mode == "quantized" else float_activations(
                model, variables)
            npz = export(m, v, images, labels, Path(tmp) / f"lenet_{mode}.npz")
            start = time.perf_counter()
            aih_json = out / f"aihwkit_{comp}_{mode}.json"
            cmd = [args.aihwkit_python, str(HERE / "aihwkit_lenet.py"), "--evaluate", str(npz),
                   "--out", str(aih_json), "--chips", str(args.chips), "--times",
                   ",".join(f"{t:g}" for t in times), "--seed", str(args.seed)]
            if comp == "drift":
                cmd.append("--drift-compensation")
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            env.pop("PYTHONPATH", None)
            subprocess.run(cmd, check=True, env=env)
            aih = json.loads(aih_json.read_text())
            aih_seconds = time.perf_counter() - start
            for i, t in enumerate(times):
                res = montecarlo.evaluate_chips(m, v, device, jax.random.key(args.seed),
                                                args.chips, (images, labels), t=t,
                                                progress=False)
                a, b = stats(res.accuracy), stats(aih["accuracy"][i])
                z = (a["mean"] - b["mean"]) / np.sqrt(a["se"] ** 2 + b["se"] ** 2)
                rows.append({"compensation": comp, "acts": mode, "t": t,
                             **{f"pimjax_{k}": x for k, x in a.items()},
                             **{f"aihwkit_{k}": x for k, x in b.items()},
                             "z": float(z), "pimjax_nominal": res.nominal_accuracy,
                             "aihwkit_nominal": aih["nominal"],
                             "pimjax_seconds": res.seconds,
                             "aihwkit_seconds": aih["seconds"][i]})
                print(f"{comp:5s} {mode:9s} t={t:>10g} s  pimjax {a['mean']:.4f} ± {a['se']:.4f} "
                      f"(std {a['std']:.4f})  aihwkit {b['mean']:.4f} ± {b['se']:.4f} "
                      f"(std {b['std']:.4f})  z = {z:+.2f}", flush=True)
            meta[f"aihwkit_seconds_{comp}_{mode}"] = aih_seconds
        files.write_json(out / "compare.json", {"meta": meta, "rows": rows})
        files.write_csv(out / "compare.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
