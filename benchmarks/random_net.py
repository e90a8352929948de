"""A benchmark workload without training: a model whose variables NumPy fills, random images."""

from __future__ import annotations


def random_workload(name: str, device_name: str, images: int, seed: int = 0):
    """``(model, variables, (x, y), device)``: ``name`` W2A4 with variables filled by NumPy
    (no compile of ``model.init``; calibrated clips, unit BN), ``images`` random inputs and
    labels, and the ``paper`` (sigma 0.3) or ``pcm`` device."""
    import jax
    import numpy as np

    from pimjax import devices
    from pimjax.models import get_model

    model = get_model(name, quant="W2A4")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(images, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, images).astype(np.int32)
    device = devices.paper(0.3) if device_name == "paper" else devices.pcm()
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])

    def fill(path, leaf):
        """A variable filled by NumPy."""
        key = str(getattr(path[-1], "key", path[-1]))
        if key in ("act_max", "var", "scale", "gain"):
            return np.ones(leaf.shape, leaf.dtype) * (3.0 if key == "act_max" else 1.0)
        if key == "act_min":
            return np.full(leaf.shape, -1.0, leaf.dtype)
        if key == "kernel":
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
                leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, abstract), (x, y), device
