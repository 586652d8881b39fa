"""The device mesh and the shardings of data-parallel training and evaluation.

One mesh axis, 'data': a rank of the reference is a device on it. Params and
optimizer state are replicated; batches are split along their sequence axis.
Meshes use Auto axis types (jax 0.10's `make_mesh` defaults to Explicit, which
breaks embedding lookups with batch-sharded ids).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def num_ranks(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_along(mesh: Mesh, axis: int, ndim: int) -> NamedSharding:
    """Split dimension `axis` of an `ndim`-array over the data axis."""
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def put_sharded(array: np.ndarray, mesh: Mesh, axis: int) -> jax.Array:
    """Place a global host array with dimension `axis` split over the mesh.

    Every process holds the whole global batch (as every rank of the reference
    reads the whole chunk and slices its span); each device receives its slice,
    so the same call works with one process or several.
    """
    sharding = sharded_along(mesh, axis, array.ndim)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
