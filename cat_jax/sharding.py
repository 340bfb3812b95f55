"""Device meshes for data-parallel training and user-sharded evaluation.

One mesh axis, 'data', over all devices: a training batch and an evaluation
batch are split across it by rows (users); parameters and optimizer state are
replicated, and so are the data tables unless `parallel.shard_data` splits
them by rows too (`train.sharded_device_data`). Everything runs under plain `jax.jit`; XLA inserts
the gradient all-reduce. With one device the mesh changes nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all of them)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"parallel.devices={num_devices} but only "
                       f"{len(devices)} devices are visible.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rows(mesh: Mesh) -> NamedSharding:
  """Split the leading (user) axis across the mesh."""
  return NamedSharding(mesh, P(AXIS))


def replicate(tree, mesh: Mesh):
  """Puts every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def shard_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside jit: asks XLA to split x's leading axis across the mesh."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, rows(mesh))


def check_divisible(batch_size: int, mesh: Mesh | None, what: str):
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} must be a multiple of the "
                     f"{mesh.size} devices it is split over.")
