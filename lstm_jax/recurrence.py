"""One ``lax.scan`` driver for every cell: lengths, reverse, bidirectional, stacked.

Inside the driver the sequence is time-major, ``x_T...E`` (any batch dimensions,
or none). The input projection ``cell.project`` runs once over all steps before the
scan, so the loop body holds only the recurrent matmul and the gating. A cell with a
fused ``sequence`` kernel (the LSTM: :mod:`lstm_jax.fused`) runs through that
instead, unless zoneout is on.

Padding: with ``lengths``, steps at or beyond a sequence's length leave its carry
untouched and emit zeros, so the final carry is the one at the true end. Running
the same masked scan backwards (``reverse=True``) starts each sequence at its own
last valid step, which is what makes the bidirectional layer padding-aware.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lstm_jax import regularisers, varying
from lstm_jax.cells import Carry, Cell, output_size

Layer = Any  # a cell's params, or {"fwd": params, "bwd": params} for a bidirectional layer


def valid_mask(lengths: jax.Array, num_steps: int) -> jax.Array:
    """``mask_T...[t, b] = t < lengths[b]``: True on real steps, False on padding."""
    steps = jnp.arange(num_steps).reshape((num_steps,) + (1,) * jnp.ndim(lengths))
    return steps < lengths


def scan_layer(
    cell: Cell,
    params,
    x_TE: jax.Array,
    *,
    lengths: jax.Array | None = None,
    carry: Carry | None = None,
    reverse: bool = False,
    unroll: int = 1,
    h_mask: jax.Array | None = None,
    zoneout: float = 0.0,
    key: jax.Array | None = None,
    train: bool = False,
) -> tuple[Carry, jax.Array]:
    """Run one cell over a time-major sequence.

    Args:
      cell: any :class:`~lstm_jax.cells.Cell`.
      params: the cell's parameters.
      x_TE: inputs, time first: ``(T, E)``, ``(T, B, E)`` or ``(T, ..., E)``.
      lengths: valid length of each sequence, shape ``x_TE.shape[1:-1]``; None means all ``T``.
      carry: initial carry; zeros when None. Its leaves broadcast over the batch shape
        ``x_TE.shape[1:-1]``, so one ``(H,)`` state (a learned initial state, say) starts every sequence.
      reverse: scan from the last step to the first (per sequence, with ``lengths``).
      unroll: ``lax.scan`` unroll factor.
      h_mask: recurrent-dropout mask for ``carry.h`` (see ``regularisers.recurrent_mask``).
      zoneout: zoneout rate on the whole carry (Krueger et al. 2017).
      key: PRNG key for zoneout in training.
      train: training mode (random zoneout) or evaluation (its expectation).

    Returns:
      ``(final_carry, y_TH)`` where padded steps of ``y_TH`` are zero.
    """
    _check_feature_axis(x_TE, "x_TE", "(T, E) or (T, ..., E)")
    lengths = None if lengths is None else _checked_lengths(lengths, x_TE.shape[1:-1], "x_TE's (T, ..., E)")
    num_steps = x_TE.shape[0]
    carry = initial_carry(cell, params, x_TE, carry, h_mask)
    valid_T = None if lengths is None else valid_mask(lengths, num_steps)
    carry = varying.vary(carry, varying.varying_axes(params, x_TE, valid_T, carry, h_mask, key))  # see lstm_jax.varying
    if cell.sequence is not None and zoneout == 0.0:
        return cell.sequence(params, x_TE, carry=carry, valid_T=valid_T, h_mask=h_mask, reverse=reverse, unroll=unroll)
    xp_TG = cell.project(params, x_TE)
    zoning = regularisers.check_key(key, zoneout, train, "zoneout")
    zone_keys_T = jax.random.split(key, num_steps) if zoning else None

    def step(carry, inputs):
        xp, valid, zone_key = inputs
        new_carry, y = cell.recur(params, carry, xp, h_mask)
        if zoneout > 0.0:  # the output is the zoned h (Krueger et al. 2017, eq. 4)
            new_carry = regularisers.zoneout(zone_key, carry, new_carry, zoneout, train=train)
            y = new_carry.h
        if valid is not None:
            valid = valid[..., None]
            new_carry = jax.tree.map(lambda new, old: jnp.where(valid, new, old), new_carry, carry)
            y = jnp.where(valid, y, jnp.zeros((), y.dtype))
        return new_carry, y

    return lax.scan(step, carry, (xp_TG, valid_T, zone_keys_T), reverse=reverse, unroll=unroll)


def initial_carry(cell: Cell, params, x_TE: jax.Array, carry: Carry | None = None, h_mask=None) -> Carry:
    """The carry a scan of ``cell`` over ``x_TE`` starts from: ``carry`` (zeros when None) broadcast over the batch
    shape ``x_TE.shape[1:-1]``, in the dtype of the step's arithmetic, which a scan's carry must keep."""
    batch_shape = x_TE.shape[1:-1]
    if carry is None:
        carry = cell.init_carry(params, batch_shape)
    else:
        carry = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (*batch_shape, leaf.shape[-1])), carry)
    step_dtype = jnp.result_type(x_TE, *jax.tree.leaves(params), *jax.tree.leaves(carry), *jax.tree.leaves(h_mask))
    return jax.tree.map(lambda leaf: leaf.astype(step_dtype), carry)


def _checked_lengths(lengths, batch_shape: tuple, layout: str, hint: str = "") -> jax.Array:
    """``lengths`` as an array, after checking that it broadcasts to ``batch_shape`` (from the right, as the step mask
    meets the carry); one length per sequence, or one for all. Longer than the steps reads as every step."""
    lengths = jnp.asarray(lengths)
    fits = lengths.ndim <= len(batch_shape) and all(a in (1, b) for a, b in zip(lengths.shape[::-1], batch_shape[::-1]))
    if not fits or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape {batch_shape}, one per sequence in {layout}; got "
                         f"{lengths.dtype} {lengths.shape}{hint}")
    return lengths


def _check_feature_axis(x, name: str, layout: str) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name} must be {layout}, with features last; got shape {jnp.shape(x)}: "
                         "pass x[:, None] for one feature per step, or x[None] for a single step")


def init_rnn(key, cell: Cell, input_size: int, hidden_size: int, *, num_layers=1, bidirectional=False, **options):
    """Parameters for a stack of ``num_layers`` layers of ``cell``.

    Returns:
      A list with one entry per layer: the cell's params, or ``{"fwd": ..., "bwd": ...}``
      when ``bidirectional``. ``options`` go to ``cell.init`` (e.g. ``proj_size``).
    """
    if num_layers < 1:
        raise ValueError(f"a stack needs a layer: pass num_layers >= 1, got {num_layers}")
    layers = []
    for layer_key in jax.random.split(key, num_layers):
        k_fwd, k_bwd = jax.random.split(layer_key)
        fwd = cell.init(k_fwd, input_size, hidden_size, **options)
        layers.append({"fwd": fwd, "bwd": cell.init(k_bwd, input_size, hidden_size, **options)} if bidirectional else fwd)
        input_size = output_size(fwd) * (2 if bidirectional else 1)
    return layers


def is_bidirectional(layer: Layer) -> bool:
    return set(layer) == {"fwd", "bwd"}


def rnn(
    cell: Cell,
    layers: list,
    x: jax.Array,
    lengths: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    train: bool = False,
    time_major: bool = False,
    reverse: bool = False,
    residual: bool = False,
    unroll: int = 1,
    dropout: float = 0.0,
    variational: bool = True,
    recurrent_dropout: float = 0.0,
    zoneout: float = 0.0,
    weight_drop: float = 0.0,
    initial_carries: list | None = None,
):
    """Run a stack of (optionally bidirectional, optionally residual) recurrent layers.

    Args:
      cell: the cell every layer uses.
      layers: from :func:`init_rnn`; a layer is bidirectional when its params are
        ``{"fwd", "bwd"}``, and then its output is ``[forward, backward]`` concatenated.
      x: ``(..., T, E)`` batch-major, or ``(T, ..., E)`` with ``time_major=True``.
      lengths: valid lengths, shape = the batch dimensions of ``x``.
      key: PRNG key, needed when ``train`` and any rate is positive.
      train: enables the regularisers below.
      reverse: run every (unidirectional) layer from the end of each sequence.
      residual: add each layer's input to its output, from the second layer on
        (Wu et al. 2016, GNMT).
      unroll: ``lax.scan`` unroll factor.
      dropout: dropout on the input of every layer after the first.
      variational: share that dropout mask over time (Gal & Ghahramani 2016).
      recurrent_dropout: Gal & Ghahramani dropout on ``h`` in the recurrent matmul.
      zoneout: zoneout rate on the carry (Krueger et al. 2017).
      weight_drop: DropConnect on the recurrent kernels (Merity et al. 2017).
      initial_carries: per layer, a carry (or ``(fwd, bwd)`` pair); zeros when None.

    Returns:
      ``(y, final_carries)``: ``y`` in the layout of ``x`` with padded steps zero, and
      one final carry (or ``(fwd, bwd)`` pair) per layer.
    """
    if not layers:
        raise ValueError("layers is empty: pass at least one layer, e.g. from init_rnn")
    if reverse and any(is_bidirectional(layer) for layer in layers):
        raise ValueError("reverse=True is for unidirectional layers; a bidirectional layer already runs both ways")
    _check_feature_axis(x, "x", "(T, ..., E) with time_major=True" if time_major else "(..., T, E)")
    if lengths is not None:
        layout, batch_shape, other_batch_shape = (
            ("(T, ..., E)", x.shape[1:-1], x.shape[:-2]) if time_major else ("(..., T, E)", x.shape[:-2], x.shape[1:-1])
        )
        hint = f" (is x the other way round? then pass time_major={not time_major})"
        lengths = _checked_lengths(lengths, batch_shape, f"x's {layout}",
                                   hint if np.shape(lengths) == other_batch_shape != batch_shape else "")
    x_TE = x if time_major else jnp.moveaxis(x, -2, 0)
    keys = jax.random.split(key, (len(layers), 2, 4)) if key is not None else [[[None] * 4] * 2] * len(layers)
    final_carries = []
    for index, (layer, layer_keys) in enumerate(zip(layers, keys)):
        inputs_TE = x_TE
        if index > 0:
            drop_key = layer_keys[0][3]
            inputs_TE = regularisers.dropout(drop_key, x_TE, dropout, train=train, shared_axes=(0,) if variational else ())
        directions = (layer["fwd"], layer["bwd"]) if is_bidirectional(layer) else (layer,)
        if initial_carries is None:
            starts = (None, None)
        else:
            start = initial_carries[index]
            starts = (start or (None, None)) if is_bidirectional(layer) else (start,)
        outputs, carries = [], []
        for backwards, params, start, (k_weights, k_mask, k_zone, _) in zip((reverse, True), directions, starts, layer_keys):
            params = regularisers.weight_drop(k_weights, params, weight_drop, train=train)
            h_shape = (*inputs_TE.shape[1:-1], output_size(params))
            h_mask = regularisers.recurrent_mask(k_mask, h_shape, recurrent_dropout, train=train, dtype=inputs_TE.dtype)
            carry, y_TH = scan_layer(
                cell, params, inputs_TE, lengths=lengths, carry=start, reverse=backwards, unroll=unroll,
                h_mask=h_mask, zoneout=zoneout, key=k_zone, train=train,
            )  # fmt: skip
            outputs.append(y_TH)
            carries.append(carry)
        y_TH = jnp.concatenate(outputs, axis=-1) if len(outputs) > 1 else outputs[0]
        if residual and index > 0:
            if y_TH.shape != x_TE.shape:
                raise ValueError(f"residual layers need equal widths: layer {index} maps {x_TE.shape[-1]} -> {y_TH.shape[-1]}")
            y_TH = y_TH + x_TE
        final_carries.append(tuple(carries) if len(carries) > 1 else carries[0])
        x_TE = y_TH
    return (x_TE if time_major else jnp.moveaxis(x_TE, 0, -2)), final_carries
