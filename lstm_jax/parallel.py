"""Data parallelism on a ``jax.sharding.Mesh``, for every experiment's training step.

The mesh has two axes: ``data`` splits each batch's rows over devices, and ``model``
can split the embedding table's vocabulary rows (``shard_embedding``). Everything
else, parameters and optimiser state included, is replicated. Nothing here
all-reduces by hand: the train step is one ``jax.jit`` program with these shardings
on its inputs and outputs, and XLA's SPMD partitioner inserts the gradient
all-reduce. The global batch size stays what ``--batch-size`` says, whatever the
mesh, so a run trains the same model on 1 or on N devices.

On several hosts (after ``jax.distributed.initialize()``) every host builds the same
deterministic batch list and feeds only its own rows of each batch
(:func:`put_batch`), and Orbax writes and reads the sharded state collectively.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model")


def usable_cpus() -> set[int]:
    """The CPU numbers this process may run on: its CPU affinity where the OS has one (not macOS), else every core."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many cores this process may run on (:func:`usable_cpus`)."""
    return len(usable_cpus())


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How the devices are arranged (the flags ``--mesh`` and ``--shard-embedding``)."""

    mesh: str = dataclasses.field(
        default="",
        metadata={"resumable": True, "help": "device mesh, e.g. data=4 or data=2,model=2; empty: every device on the data axis"},
    )
    shard_embedding: bool = dataclasses.field(
        default=False, metadata={"resumable": True, "help": "split the embedding table's vocabulary rows over the model axis"}
    )
    distributed: bool = dataclasses.field(
        default=False,
        metadata={
            "resumable": True,
            "help": "several hosts: call jax.distributed.initialize() first (run the same command on every host)"
        },
    )


def start(config: MeshConfig) -> Mesh:
    """Join the other hosts when ``config.distributed``, then build the mesh (before any other JAX work)."""
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return make_mesh(config.mesh)


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,model=2"`` -> ``{"data": 2, "model": 2}``; a missing axis is inferred, or 1.

    Raises:
      ValueError: unknown axis, a size that is not a positive integer, or sizes whose
        product is not ``num_devices``.
    """
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1 or name in sizes:
            raise ValueError(
                f"--mesh {spec!r}: write axis=size pairs over {' and '.join(MESH_AXES)}, e.g. data=4 or data=2,model=2"
            )
        sizes[name] = int(value)
    if "data" not in sizes:
        sizes["data"] = max(num_devices // sizes.get("model", 1), 1)
    sizes.setdefault("model", 1)
    if sizes["data"] * sizes["model"] != num_devices:
        raise ValueError(
            f"--mesh {spec!r} needs {sizes['data'] * sizes['model']} devices but {num_devices} are visible; "
            f"make data x model = {num_devices}"
        )
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all of them, all on ``data``)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["model"]), MESH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    """The global batch must split evenly over the data axis (each host hands its devices their rows, wherever
    the mesh puts them: :func:`put_batch`)."""
    shards = mesh.shape["data"]
    if batch_size % shards:
        raise ValueError(
            f"{flag} {batch_size} does not split over the mesh's {shards} data devices; use a multiple of {shards}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) over ``data``; everything after it whole."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (e.g. a fixed test set)."""
    return NamedSharding(mesh, P())


def _is_embedding_table(path) -> bool:
    return any(getattr(entry, "key", None) == "embed" for entry in path)


def unsplit_embedding_note(vocab_size: int, mesh: Mesh) -> str | None:
    """What ``state_sharding(..., shard_embedding=True)`` does when the vocabulary does not divide over ``model``."""
    model_size = mesh.shape["model"]
    if vocab_size % model_size == 0:
        return None
    return (f"note: --shard-embedding keeps the embedding table whole (replicated): its {vocab_size} rows "
            f"do not split evenly over model={model_size}")  # fmt: skip


def state_sharding(tree, mesh: Mesh, *, shard_embedding: bool = False):
    """A sharding for every leaf of ``tree`` (a train state, params...): replicated, except
    the embedding table and its optimiser moments, split by vocabulary row over ``model``
    when ``shard_embedding`` (an ensemble's ``(K, V, E)`` table is split along ``V``) and ``V``
    divides evenly (else it stays replicated: see :func:`unsplit_embedding_note`)."""
    model_size = mesh.shape["model"]

    def sharding(path, leaf):
        shape = np.shape(leaf)
        if shard_embedding and _is_embedding_table(path) and len(shape) >= 2 and shape[-2] % model_size == 0:
            return NamedSharding(mesh, P(*[None] * (len(shape) - 2), "model", None))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, tree)


def put_batch(batch, mesh: Mesh):
    """Place a global batch (the same on every host) with its rows split over ``data``.

    On several hosts each one hands its own devices the rows they hold, wherever the mesh puts them (a data axis
    smaller than the number of hosts gives several hosts the same rows).
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def placed(array):
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(placed, batch)


def host_batch_step(step: Callable, mesh: Mesh) -> Callable:
    """``(first, batch) -> step(first, put_batch(batch, mesh))``: a jitted train or eval step that takes host batches."""

    def placed_step(first, batch):
        return step(first, put_batch(batch, mesh))

    return placed_step
