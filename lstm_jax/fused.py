"""A fused LSTM sequence kernel with a hand-written backward pass.

:func:`lstm_sequence` computes exactly what scanning ``cells.LSTM.recur`` computes
(lengths, reverse, recurrent-dropout mask), but is laid out for speed:

* Each step does one matmul, ``[x_t, h] @ [W_x; W_h]``. On CPU this beats hoisting
  the input projection out of the loop: the hoisted ``(T, B, 4H)`` pre-activations do
  not fit in cache, and writing then re-reading them costs more than the small
  per-step matmul (see ``benchmarks/NOTES.md``).
* The backward pass is a second scan that carries only ``(dh, dc)`` and does one
  matmul per step, ``dz_t @ [W_x; W_h]^T``, which yields both ``dx_t`` and ``dh``. The
  weight gradient is one large matmul over all steps after the loop,
  ``[X, H_prev]^T dZ``, instead of ``T`` small accumulations inside it. This is the
  structure of cuDNN's LSTM (Appleyard, Kocisky & Blunsom 2016, "Optimizing
  performance of recurrent neural networks on GPUs").
* The forward pass saves the gate activations and the cell states, so the backward
  pass recomputes no matmul.
* On CPU, for float32, both loops run in the C++ kernel of :mod:`lstm_jax.native`,
  which keeps each core's slice of the weights in its cache across the steps; the
  backward pass's ``dx`` is then one matmul after its loop. For bfloat16 operands they
  run there too where the CPU has AMX: the matmuls multiply in bfloat16 with float32
  sums, the gates, cell state and saved activations stay float32, and the results are
  rounded to bfloat16 on the way out. Elsewhere they are ``lax.scan`` loops.

Gates are in the order ``i, f, g, o``, as everywhere in :mod:`lstm_jax.cells`. A
recurrent-dropout mask drawn from a key gets no gradient, as nothing differentiates it; a
mask that is differentiated gets the plain scan's gradient.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lstm_jax import native, varying


def lstm_sequence(params, x_TE, *, carry, valid_T=None, h_mask=None, reverse=False, unroll=1):
    """Run the LSTM over a time-major sequence with any batch dimensions.

    Args:
      params: LSTM params ``w_x`` (E x 4H), ``w_h`` (H x 4H), ``b`` (4H).
      x_TE: ``(T, ..., E)``.
      carry: the initial ``Carry(h, c)``, shapes ``(..., H)``.
      valid_T: bool ``(T, ...)``, False on padded steps (they keep the carry and emit 0).
      h_mask: multiplies ``h`` where it enters the recurrent matmul, shape ``(..., H)``.
      reverse: run from the last step to the first.
      unroll: ``lax.scan`` unroll factor of both passes.

    Returns:
      ``(final_carry, y_TH)``, as :func:`lstm_jax.recurrence.scan_layer`.
    """
    from lstm_jax.cells import Carry

    num_steps, *batch_shape, input_size = x_TE.shape
    hidden_size = _check_shapes(params, input_size, carry)
    if not (isinstance(unroll, bool) or isinstance(unroll, (int, np.integer)) and unroll >= 0):
        # the kernel has no unroll, so lax.scan's own check would be skipped on CPU
        raise ValueError(f"`unroll` must be a bool or a non-negative int, as lax.scan takes it; got {unroll!r}")
    rows = math.prod(batch_shape)
    x_TNE = x_TE.reshape(num_steps, rows, input_size)
    if valid_T is not None and 0 < jnp.ndim(valid_T) <= len(batch_shape):
        # its batch axes meet the batch's from the right, as the plain scan's step mask meets the carry (..., H):
        # one length serves every sequence, or one per column
        valid_T = jnp.expand_dims(valid_T, tuple(range(1, len(batch_shape) + 2 - jnp.ndim(valid_T))))
    h_NH = jnp.broadcast_to(carry.h, (*batch_shape, hidden_size)).reshape(rows, hidden_size)
    c_NH = jnp.broadcast_to(carry.c, (*batch_shape, hidden_size)).reshape(rows, hidden_size)
    valid_TN = (  # as bool, which the kernel takes (0/1 integers would be refused there)
        None
        if valid_T is None
        else jnp.broadcast_to(valid_T, (num_steps, *batch_shape)).reshape(num_steps, rows).astype(bool)
    )
    mask_NH = (  # in h's dtype, as h * h_mask is in the plain scan (the kernel takes float32 only, no bool or int)
        None
        if h_mask is None
        else jnp.broadcast_to(h_mask, (*batch_shape, hidden_size)).reshape(rows, hidden_size).astype(h_NH.dtype)
    )
    operands = (params["w_x"], params["w_h"], params["b"], x_TNE, h_NH, c_NH, valid_TN, mask_NH)
    h_NH, c_NH, y_TNH = _lstm_scan(reverse, unroll, *varying.vary(operands, varying.varying_axes(operands)))
    unflatten = functools.partial(jnp.reshape, shape=(*batch_shape, hidden_size))
    return Carry(unflatten(h_NH), unflatten(c_NH)), y_TNH.reshape(num_steps, *batch_shape, hidden_size)


def _check_shapes(params, input_size: int, carry) -> int:
    """The hidden size, after checking that the weights, the input's last axis and the carry agree (the CPU kernel
    trusts them: a mismatch there would read past the ends of its operands)."""
    from lstm_jax.cells import gate_shapes_fit

    w_x, w_h, b = (jnp.shape(params[name]) for name in ("w_x", "w_h", "b"))
    if not gate_shapes_fit(params, 4):
        raise ValueError(f"LSTM params of shapes w_x {w_x}, w_h {w_h}, b {b} do not fit together; expected "
                         "(E, 4H), (H, 4H) and (4H,), as lstm_jax.LSTM.init makes them")
    hidden_size = w_h[0]
    if w_x[0] != input_size:
        raise ValueError(f"the input's last axis has size {input_size} but the LSTM's w_x takes {w_x[0]} features; "
                         f"pass inputs shaped (..., {w_x[0]}) or init the params with input_size={input_size}")
    for name, state in zip(carry._fields, carry):
        if jnp.shape(state)[-1:] != (hidden_size,):
            raise ValueError(f"the initial carry's {name} has shape {jnp.shape(state)} but the LSTM's hidden size is "
                             f"{hidden_size}; give it a last axis of {hidden_size}")
    return hidden_size


def _gate_activations(z_NG):
    i, f, g, o = jnp.split(z_NG, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _kernel_precision(*arrays):
    """``native.precision`` of these operands on the CPU backend; None (the lax.scan loops) elsewhere."""
    return native.precision(*arrays) if jax.default_backend() == "cpu" else None


def _float32(arrays):
    """The floating-point arrays as float32 (the kernel's operand type; exact from bfloat16), the rest as they are."""
    return tuple(a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a for a in arrays)


def _forward(reverse, unroll, precision, w_x, w_h, b, x_TNE, h_NH, c_NH, valid_TN, mask_NH, save=True):
    """The forward loop, in the kernel at ``precision`` or (None) as lax.scan; also returns the gate activations
    and the carried states for the backward pass.

    ``save=False`` lets the CPU kernel skip storing them (they are then None). From the kernel they are
    float32 whatever the operands' dtype.
    """
    if precision is not None:
        operands = _float32((w_x, w_h, b, x_TNE, h_NH, c_NH, valid_TN, mask_NH))
        return _native_forward(reverse, unroll, save, precision == "bfloat16", *operands)
    return _scan_forward(reverse, unroll, w_x, w_h, b, x_TNE, h_NH, c_NH, valid_TN, mask_NH)


def _scan_forward(reverse, unroll, w_x, w_h, b, x_TNE, h_NH, c_NH, valid_TN, mask_NH):
    w_KG = jnp.concatenate([w_x, w_h], axis=0)

    def step(carry, inputs):
        h, c = carry
        x, valid = inputs
        h_in = h if mask_NH is None else h * mask_NH
        i, f, g, o = _gate_activations(jnp.concatenate([x, h_in], axis=-1) @ w_KG + b)
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        if valid is not None:
            keep = valid[:, None]
            c_new, h_new = jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)
        return (h_new, c_new), (jnp.concatenate([i, f, g, o], axis=-1), h_new, c_new)

    (h_NH, c_NH), (acts_TNG, h_TNH, c_TNH) = lax.scan(
        step, (h_NH, c_NH), (x_TNE, valid_TN), reverse=reverse, unroll=unroll
    )
    return h_NH, c_NH, acts_TNG, h_TNH, c_TNH


# The kernel's calls as functions that JAX can differentiate again. Training needs only their values (the
# kernel's backward pass is the VJP of its forward pass), but a gradient of a gradient, such as a penalty on
# the input gradient's norm, differentiates them too: those derivatives come from the lax.scan loops, which
# compute the same functions. (Adversarial and virtual adversarial training avoid it: lstm_jax.train takes
# their directions with the parameters held constant.) With bf16, those derivatives are the float32 loops': they
# leave out the rounding of the operands.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _native_forward(reverse, unroll, save, bf16, *operands):
    return native.forward(reverse, save, *operands, bf16=bf16)


@_native_forward.defjvp
def _native_forward_jvp(reverse, unroll, save, bf16, operands, tangents):
    _, tangents_out = jax.jvp(functools.partial(_scan_forward, reverse, unroll), operands, tangents)
    if not save:  # the kernel returned no gate activations nor cell states
        tangents_out = (*tangents_out[:2], None, tangents_out[3], None)
    return _native_forward(reverse, unroll, save, bf16, *operands), tangents_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _native_backward(reverse, unroll, weights, bf16, *operands):
    return native.backward(reverse, *operands, weights=weights, bf16=bf16)


@_native_backward.defjvp
def _native_backward_jvp(reverse, unroll, weights, bf16, operands, tangents):
    _, tangents_out = jax.jvp(functools.partial(_scan_backward, reverse, unroll), operands, tangents)
    if not weights:  # the kernel's dw_x and dw_h are zeros
        tangents_out = (*tangents_out[:2], *map(jnp.zeros_like, tangents_out[2:4]), *tangents_out[4:])
    return _native_backward(reverse, unroll, weights, bf16, *operands), tangents_out


def _scan_backward(reverse, unroll, w_x, w_h, x_TNE, h0_NH, c0_NH, acts_TNG, h_TNH, c_TNH, dy_TNH, dh_NH, dc_NH,
                   valid_TN, mask_NH):  # fmt: skip
    """What ``native.backward`` returns, from the lax.scan loop: ``(dz, dx, dw_x, dw_h, dh0, dc0)``."""
    dz_TNG, dx_TNE, dh0_NH, dc0_NH = _backward_scan(
        reverse, unroll, w_x, w_h, dy_TNH, acts_TNG, c_TNH, c0_NH, dh_NH, dc_NH, valid_TN, mask_NH
    )
    dw_x, dw_h = _weight_gradients(x_TNE, h_TNH, h0_NH, mask_NH, dz_TNG, reverse)
    return dz_TNG, dx_TNE, dw_x, dw_h, dh0_NH, dc0_NH


def _outputs(h_TNH, valid_TN):
    return h_TNH if valid_TN is None else jnp.where(valid_TN[..., None], h_TNH, jnp.zeros((), h_TNH.dtype))


def _results(h0_NH, c0_NH, valid_TN, h_NH, c_NH, h_TNH):
    """``(h, c, y)`` in the dtypes of the initial carry (the kernel returns float32 for bfloat16 operands)."""
    return h_NH.astype(h0_NH.dtype), c_NH.astype(c0_NH.dtype), _outputs(h_TNH, valid_TN).astype(h0_NH.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lstm_scan(reverse, unroll, w_x, w_h, b, x_TNE, h0_NH, c0_NH, valid_TN, mask_NH):
    precision = _kernel_precision(w_x, w_h, b, x_TNE, h0_NH, c0_NH)
    h_NH, c_NH, _, h_TNH, _ = _forward(reverse, unroll, precision, w_x, w_h, b, x_TNE, h0_NH, c0_NH, valid_TN, mask_NH,
                                       save=False)  # fmt: skip
    return _results(h0_NH, c0_NH, valid_TN, h_NH, c_NH, h_TNH)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Decisions:
    """What the forward rule decided, handed to the backward rule as static structure of the residuals: the
    backward pass runs where the forward pass ran (not where a later trace would choose, inside or outside
    ``native.disabled()``), skips the weight gradients where no weight is differentiated, and differentiates the
    mask only where a caller learns it."""

    precision: str | None  # the forward's native.precision; None: the lax.scan loops
    weights: bool
    mask_grad: bool
    bias_dtype: np.dtype  # b is not saved, but its gradient comes back in its dtype


def _lstm_scan_fwd(reverse, unroll, *primals):
    # With symbolic zeros, each primal says whether it is differentiated. Where no weight is (an input gradient
    # with the parameters held constant, as adversarial training takes), the kernel skips the weight gradients.
    weights = any(primal.perturbed for primal in primals[:3])  # w_x, w_h, b: arrays, so one primal each
    w_x, w_h, b, x_TNE, h0_NH, c0_NH, valid_TN, mask_NH = (
        jax.tree_util.tree_map(lambda p: p.value, primal) for primal in primals  # valid_TN, mask_NH may be None
    )
    precision = _kernel_precision(w_x, w_h, b, x_TNE, h0_NH, c0_NH)
    h_NH, c_NH, acts_TNG, h_TNH, c_TNH = _forward(reverse, unroll, precision, w_x, w_h, b, x_TNE, h0_NH, c0_NH, valid_TN,
                                                  mask_NH)  # fmt: skip
    # a mask is differentiated only where a caller learns it (a dropout mask drawn from a key is not)
    decisions = _Decisions(precision, weights, mask_NH is not None and primals[-1].perturbed, np.dtype(b.dtype))
    saved = (w_x, w_h, x_TNE, h0_NH, c0_NH, valid_TN, mask_NH, acts_TNG, h_TNH, c_TNH, decisions)
    return _results(h0_NH, c0_NH, valid_TN, h_NH, c_NH, h_TNH), saved


def _previous(series_TNH, initial_NH, reverse):
    """The state each step started from: the series shifted by one step, against the scan direction."""
    if series_TNH.shape[0] == 0:  # no steps, so no step started anywhere
        return series_TNH
    if reverse:
        return jnp.concatenate([series_TNH[1:], initial_NH[None]], axis=0)
    return jnp.concatenate([initial_NH[None], series_TNH[:-1]], axis=0)


def _backward_scan(reverse, unroll, w_x, w_h, dy_TNH, acts_TNG, c_TNH, c0_NH, dh_NH, dc_NH, valid_TN, mask_NH):
    """The backward loop as a scan: ``(dz_TNG, dx_TNE, dh0_NH, dc0_NH)``."""
    input_size = w_x.shape[0]
    w_GK = jnp.concatenate([w_x, w_h], axis=0).T
    c_prev_TNH = _previous(c_TNH, c0_NH, reverse)

    def step(carry, inputs):
        dh, dc = carry
        dy, acts, c_new, c_prev, valid = inputs
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        tanh_c = jnp.tanh(c_new)
        dh_new = dh + dy
        if valid is not None:  # a padded step passed the carry through untouched and emitted 0
            keep = valid[:, None]
            dh_new, dh_skip = jnp.where(keep, dh_new, 0), jnp.where(keep, 0, dh)
            dc_in, dc_skip = jnp.where(keep, dc, 0), jnp.where(keep, 0, dc)
        else:
            dc_in = dc
        dc_new = dc_in + dh_new * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc_new * g * i * (1 - i),
                dc_new * c_prev * f * (1 - f),
                dc_new * i * (1 - g * g),
                dh_new * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        dxh = dz @ w_GK
        dx, dh_prev = dxh[:, :input_size], dxh[:, input_size:]
        if mask_NH is not None:
            dh_prev = dh_prev * mask_NH
        dc_prev = dc_new * f
        if valid is not None:
            dh_prev, dc_prev = dh_prev + dh_skip, dc_prev + dc_skip
        return (dh_prev, dc_prev), (dz, dx)

    inputs = (dy_TNH, acts_TNG, c_TNH, c_prev_TNH, valid_TN)
    (dh0_NH, dc0_NH), (dz_TNG, dx_TNE) = lax.scan(step, (dh_NH, dc_NH), inputs, reverse=not reverse, unroll=unroll)
    return dz_TNG, dx_TNE, dh0_NH, dc0_NH


def _lstm_scan_bwd(reverse, unroll, saved, cotangents):
    w_x, w_h, x_TNE, h0_NH, c0_NH, valid_TN, mask_NH, acts_TNG, h_TNH, c_TNH, decisions = saved
    precision = decisions.precision
    # a cotangent that is symbolically zero, as zeros that vary along the mesh axes the outputs vary along
    zeros = lambda c: varying.vary(jnp.zeros(c.shape, c.dtype), varying.varying_axes(h_TNH))
    dh_NH, dc_NH, dy_TNH = (zeros(c) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c for c in cotangents)
    operands = (w_x, w_h, x_TNE, h0_NH, c0_NH, acts_TNG, h_TNH, c_TNH, dy_TNH, dh_NH, dc_NH, valid_TN, mask_NH)
    if precision is None:
        dz_TNG, dx_TNE, dw_x, dw_h, dh0_NH, dc0_NH = _scan_backward(reverse, unroll, *operands)
    else:
        backward = functools.partial(_native_backward, reverse, unroll, decisions.weights, precision == "bfloat16")
        dz_TNG, dx_TNE, dw_x, dw_h, dh0_NH, dc0_NH = backward(*_float32(operands))
    db = dz_TNG.reshape(-1, dz_TNG.shape[-1]).sum(0)
    # each in its primal's dtype: the kernel returns float32 for bfloat16, and with operands of mixed dtypes (bfloat16
    # params, float32 inputs) the scan loops' products are in the widest of them
    dtypes = (w_x.dtype, w_h.dtype, decisions.bias_dtype, x_TNE.dtype, h0_NH.dtype, c0_NH.dtype)
    grads = tuple(g.astype(dtype) for g, dtype in zip((dw_x, dw_h, db, dx_TNE, dh0_NH, dc0_NH), dtypes, strict=True))
    no_grad = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0 if a.dtype == bool else a.dtype)
    if not decisions.mask_grad:
        return *grads, no_grad(valid_TN), no_grad(mask_NH)
    # h_prev * mask entered every step's matmul: d mask = sum over steps of h_prev * (dz @ W_h^T)
    dh_in_TNH = jnp.einsum("tng,hg->tnh", dz_TNG, w_h.astype(dz_TNG.dtype))
    d_mask = jnp.sum(_previous(h_TNH, h0_NH, reverse) * dh_in_TNH, axis=0).astype(mask_NH.dtype)
    return *grads, no_grad(valid_TN), d_mask


def _weight_gradients(x_TNE, h_TNH, h0_NH, mask_NH, dz_TNG, reverse):
    """``[X, H_prev]^T dZ`` over all steps: one large matmul each instead of ``T`` small accumulations."""
    h_in_TNH = _previous(h_TNH, h0_NH, reverse)
    if mask_NH is not None:
        h_in_TNH = h_in_TNH * mask_NH
    dz_MG = dz_TNG.reshape(-1, dz_TNG.shape[-1])
    dw_x = x_TNE.reshape(-1, x_TNE.shape[-1]).T @ dz_MG
    dw_h = h_in_TNH.reshape(-1, h_in_TNH.shape[-1]).T @ dz_MG
    return dw_x, dw_h


_lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd, symbolic_zeros=True)
