"""Process setup and device meshes: scale-out on JAX's own engine."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(axis: str, devices=None) -> Mesh:
    """A 1-D mesh with axis ``axis`` over ``devices`` (default: every device of the job)."""
    devices = list(devices) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("devices is empty: pass at least one device")
    return Mesh(np.array(devices), (axis,))


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays on ``mesh``, split along their leading (batch) axis over its one axis."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def replicate(mesh: Mesh, tree):
    """Place a pytree on every device of ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
