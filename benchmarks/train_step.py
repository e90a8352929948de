"""Training-step speed: pimjax fp / qat / qavat against the same float network in PyTorch.

Times one optimizer step (forward + backward + update) of LeNet-5 (batch 256, MNIST
shape) and ResNet-20 (batch 128, CIFAR shape), side by side in one run, and prints
images/s with the ratios pimjax-fp/PyTorch and qavat/qat. PyTorch comes from the
``bench`` extra (``pip install -e ".[bench]"``, a CPU build pinned to 2.13.0); without
it the PyTorch column is skipped.

    python benchmarks/train_step.py                 # both models
    python benchmarks/train_step.py --models lenet5 --steps 10
    python benchmarks/train_step.py --models resnet18 --batch resnet18=512   # GPU-sized
    python benchmarks/train_step.py --torch-device cuda    # on a GPU: PyTorch there too
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pimjax import runtime
from pimjax.devices import DeviceConfig
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig
from pimjax.train import DataConfig, OptimConfig, TrainConfig, create_train_state, train_step

DATASET = {"lenet5": "mnist", "resnet20": "cifar10", "resnet18": "cifar100"}
SHAPE = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
DEFAULT_BATCH = {"lenet5": 256, "resnet20": 128, "resnet18": 512}


def time_calls(fn, steps: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` (already warmed up) over ``repeats`` runs of ``steps``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def pimjax_step_time(model: str, method: str, batch: int, steps: int, repeats: int) -> float:
    """Seconds per pimjax training step of ``method`` (fp, qat W2A4, qavat W2A4 sigma 0.3)."""
    dataset = DATASET[model]
    quant = "fp" if method == "fp" else "W2A4"
    config = TrainConfig(
        train_method=method, model=ModelConfig(model), data=DataConfig(dataset, augment=False),
        quant=QuantConfig.parse(quant),
        device=DeviceConfig(sigma_within=0.3 if method == "qavat" else 0.0),
        optim=OptimConfig(optimizer="sgd", lr=0.01, batch_size=batch))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, *SHAPE[dataset]), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, CLASSES[dataset], batch, dtype=np.int32))
    state = create_train_state(config, jax.random.key(0), images[:1].astype(jnp.float32),
                               num_train=batch * 10)
    chip_key = jax.random.key(1)
    holder = {"state": state}

    def one():
        holder["state"], metrics = train_step(holder["state"], (images, labels), chip_key)
        jax.block_until_ready(metrics["loss"])

    for _ in range(2):  # compile + warm-up
        one()
    return time_calls(one, steps, repeats)


def torch_step_time(model: str, batch: int, steps: int, repeats: int,
                    device: str = "cpu") -> float | None:
    """Seconds per PyTorch training step of the same float network on ``device`` ("cpu" or
    "cuda"), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from torch_models import build_torch_model

    dataset = DATASET[model]
    h, w, c = SHAPE[dataset]
    net = build_torch_model(model, CLASSES[dataset]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, CLASSES[dataset], (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if device != "cpu":  # CUDA runs asynchronously: a step ends when the device is done
            torch.cuda.synchronize()

    for _ in range(2):
        one()
    return time_calls(one, steps, repeats)


def main() -> None:
    """Run the benchmark and print the table."""
    runtime.configure()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet5,resnet20")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", action="append", default=[], help="override, e.g. resnet20=64")
    p.add_argument("--torch-device", default="cpu", choices=("cpu", "cuda"),
                   help="where PyTorch runs (cuda: beside pimjax on a GPU)")
    args = p.parse_args()
    batches = dict(DEFAULT_BATCH)
    for item in args.batch:
        name, value = item.split("=")
        batches[name] = int(value)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, PyTorch on "
          f"{args.torch_device}; median of {args.repeats} x {args.steps} steps")
    head = (f"{'model':<10}{'batch':>6}{'torch img/s':>13}{'fp img/s':>10}{'qat img/s':>11}"
            f"{'qavat img/s':>13}{'fp/torch time':>15}{'qavat/qat':>11}")
    print(head)
    print("-" * len(head))
    for model in args.models.split(","):
        b = batches[model]
        t = {m: pimjax_step_time(model, m, b, args.steps, args.repeats)
             for m in ("fp", "qat", "qavat")}
        tt = torch_step_time(model, b, args.steps, args.repeats, args.torch_device)
        torch_ips = f"{b / tt:13.0f}" if tt else f"{'n/a':>13}"
        ratio = f"{t['fp'] / tt:15.2f}" if tt else f"{'n/a':>15}"
        print(f"{model:<10}{b:>6}{torch_ips}{b / t['fp']:>10.0f}{b / t['qat']:>11.0f}"
              f"{b / t['qavat']:>13.0f}{ratio}{t['qavat'] / t['qat']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
