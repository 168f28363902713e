"""Mesh axes that values vary along inside ``jax.shard_map``.

Inside ``shard_map`` every value's type records the manual mesh axes it varies along
(a batch sharded over ``"data"`` varies along it; replicated parameters and fresh zeros
do not). A ``lax.scan`` needs its carry to vary along the same axes as the step's
result, and an FFI call needs all its operands to agree and its results to be typed
too, so the recurrent loops bring their operands to the union first. Outside
``shard_map`` (or on a JAX that does not track this) these are no-ops.
"""

import jax


def _aval_axes(leaf) -> frozenset:
    aval = jax.typeof(leaf)
    manual = getattr(aval, "mat", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def varying_axes(*trees) -> frozenset:
    """The manual mesh axes along which some array leaf of ``trees`` varies."""
    if not hasattr(jax, "typeof"):
        return frozenset()
    return frozenset().union(*(_aval_axes(leaf) for leaf in jax.tree.leaves(trees)))


def vary(tree, axes: frozenset):
    """``tree`` with every array leaf made to vary along all of ``axes`` (a cast: no data moves)."""
    if not axes:
        return tree

    def one(leaf):
        missing = tuple(sorted(axes - _aval_axes(leaf), key=str))
        if not missing:
            return leaf
        return jax.lax.pcast(leaf, missing, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(leaf, missing)

    return jax.tree.map(one, tree)


def result_type(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """The type of an FFI call's result that varies along the axes ``like`` varies along."""
    if not varying_axes(like):
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(like)
    # typed on the (manual) mesh of ``like``, replicated within a shard; without the mesh a varying type is rejected
    sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
    if getattr(aval, "mat", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding, manual_axis_type=aval.mat)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding, vma=aval.vma)  # JAX before 0.10
