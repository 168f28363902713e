"""Regularisers for recurrent networks, driven by explicit PRNG keys.

Each function is the identity when ``train`` is False or the rate is 0, so a model
calls them unconditionally. Rates are Python floats (static under ``jit``). Kept
units are scaled by ``1 / (1 - rate)`` ("inverted" dropout), so nothing changes at
evaluation time, except for zoneout, whose evaluation form is its expectation.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _check_rate(rate: float, name: str) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} rate must be in [0, 1), got {rate}")


def check_key(key, rate: float, train: bool, name: str) -> bool:
    """Validate a rate; True when the regulariser is active (and then a key is required)."""
    _check_rate(rate, name)
    if train and rate > 0.0 and key is None:
        raise ValueError(f"{name} with rate {rate} in training needs a PRNG key: pass key=jax.random.key(seed)")
    return train and rate > 0.0


def dropout(key, x: jax.Array, rate: float, *, train: bool = True, shared_axes: Sequence[int] = ()) -> jax.Array:
    """Inverted dropout (Srivastava et al. 2014).

    Args:
      key: PRNG key (may be None when inactive).
      x: any array.
      rate: probability of zeroing a unit.
      train: inactive (identity) when False.
      shared_axes: axes along which one mask is shared (broadcast).

    Returns:
      ``x`` with units zeroed and survivors scaled by ``1 / (1 - rate)``.
    """
    if not check_key(key, rate, train, "dropout"):
        return x
    for axis in shared_axes:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"dropout shared axis {axis} is outside an array of {x.ndim} dimensions")
    mask_shape = [1 if axis % x.ndim in {a % x.ndim for a in shared_axes} else n for axis, n in enumerate(x.shape)]
    keep = jax.random.bernoulli(key, 1.0 - rate, mask_shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def locked_dropout(key, x: jax.Array, rate: float, *, train: bool = True, time_axis: int = 1) -> jax.Array:
    """Variational (locked) dropout: one mask for all time steps of a sequence.

    Gal & Ghahramani 2016, "A theoretically grounded application of dropout in
    recurrent neural networks"; Merity et al. 2017 (AWD-LSTM). ``time_axis`` is 1 for
    batch-major ``x_BTE`` and 0 for time-major ``x_TBE``.
    """
    return dropout(key, x, rate, train=train, shared_axes=(time_axis,))


def embedding_dropout(key, table_VE: jax.Array, rate: float, *, train: bool = True) -> jax.Array:
    """Drop whole rows (word types) of an embedding table.

    Gal & Ghahramani 2016, sec. 4.2; Merity et al. 2017. Every occurrence of a dropped
    word in the batch becomes a zero vector.
    """
    return dropout(key, table_VE, rate, train=train, shared_axes=(1,))


def word_dropout(key, tokens: jax.Array, rate: float, *, unk_id: int, pad_id: int = 0, train: bool = True):
    """Replace tokens by ``unk_id`` with probability ``rate``; padding is left alone.

    Iyyer et al. 2015, "Deep unordered composition rivals syntactic methods"; Bowman
    et al. 2016. No rescaling: this drops inputs, not activations.
    """
    if not check_key(key, rate, train, "word dropout"):
        return tokens
    drop = jax.random.bernoulli(key, rate, tokens.shape) & (tokens != pad_id)
    return jnp.where(drop, jnp.asarray(unk_id, tokens.dtype), tokens)


def recurrent_mask(key, shape: Sequence[int], rate: float, *, train: bool = True, dtype=jnp.float32):
    """A mask for ``h`` where it enters the recurrent matmul, fixed over time.

    Gal & Ghahramani 2016: the same units of ``h`` are dropped at every step of a
    sequence. Returns None when inactive, which the cells read as "no mask".
    """
    if not check_key(key, rate, train, "recurrent dropout"):
        return None
    return jax.random.bernoulli(key, 1.0 - rate, shape).astype(dtype) / (1.0 - rate)


def zoneout(key, old, new, rate: float, *, train: bool = True):
    """Zoneout (Krueger et al. 2017): each unit keeps its previous value with prob. ``rate``.

    Works on any pytree (e.g. an LSTM carry ``(h, c)``); in evaluation the update is
    its expectation ``rate * old + (1 - rate) * new``.
    """
    _check_rate(rate, "zoneout")
    if rate == 0.0:
        return new
    if not train:
        return jax.tree.map(lambda o, n: rate * o + (1.0 - rate) * n, old, new)
    check_key(key, rate, train, "zoneout")
    leaves_old, treedef = jax.tree.flatten(old)
    keys = jax.random.split(key, len(leaves_old))
    mixed = [
        jnp.where(jax.random.bernoulli(k, rate, jnp.broadcast_shapes(o.shape, n.shape)), o, n)
        for k, o, n in zip(keys, leaves_old, treedef.flatten_up_to(new))
    ]
    return jax.tree.unflatten(treedef, mixed)


def weight_drop(key, params: dict, rate: float, *, train: bool = True, name: str = "w_h") -> dict:
    """DropConnect on the recurrent kernel (Wan et al. 2013; Merity et al. 2017, AWD-LSTM).

    One mask for the whole sequence, so the scan still runs one recurrent matrix.
    """
    if not check_key(key, rate, train, "weight drop"):
        return params
    if name not in params:
        layer = " (a bidirectional layer: call it on layer['fwd'] and layer['bwd'])" if {"fwd", "bwd"} <= set(params) else ""
        raise ValueError(f"weight_drop takes one cell's params with {name!r}; got {', '.join(map(str, params))}{layer}")
    return {**params, name: dropout(key, params[name], rate)}


def adversarial_perturbation(grad_BTE: jax.Array, epsilon: float) -> jax.Array:
    """The perturbation of norm ``epsilon`` per sequence along the loss gradient.

    Miyato, Dai & Goodfellow 2017, "Adversarial training methods for semi-supervised text
    classification" (the fast gradient method of Goodfellow et al. 2015, applied to word
    embeddings): ``r = epsilon * g / ||g||_2`` with the norm over each sequence's steps and
    features. A sequence whose gradient is zero (batch padding) gets no perturbation. The
    gradient is treated as a constant, as in the paper. Unlike the paper (sec. 3), the embeddings
    are not first normalised to zero mean and unit variance under the word frequencies, so
    ``epsilon`` is relative to the raw, learned embedding scale. Where the squares of ``g`` would underflow
    (a confident prediction's gradient) or overflow, the norm is ``max|g| * ||g / max|g|||_2``, as in the
    paper's code; it is taken in float32 at least.
    """
    grad_BTE = jax.lax.stop_gradient(grad_BTE)
    g_BTE = grad_BTE.astype(jnp.promote_types(grad_BTE.dtype, jnp.float32))
    finfo = jnp.finfo(g_BTE.dtype)
    norm_B11 = jnp.sqrt(jnp.sum(jnp.square(g_BTE), axis=(1, 2), keepdims=True))
    scale_B11 = jnp.max(jnp.abs(g_BTE), axis=(1, 2), keepdims=True)
    scaled_BTE = g_BTE / jnp.where(scale_B11 > 0, scale_B11, 1.0)
    stable_norm_B11 = scale_B11 * jnp.sqrt(jnp.sum(jnp.square(scaled_BTE), axis=(1, 2), keepdims=True))
    exact_B11 = jnp.isfinite(norm_B11) & (norm_B11 >= math.sqrt(finfo.tiny) / finfo.eps)
    norm_B11 = jnp.where(exact_B11, norm_B11, jnp.where(scale_B11 > 0, stable_norm_B11, 1.0))
    return (epsilon * g_BTE / norm_B11).astype(grad_BTE.dtype)


def mixup_partners(key, num_rows: int, alpha: float, *, real_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """A partner row and a mixing share for each row, for mixup (Zhang et al. 2018, "mixup: Beyond
    empirical risk minimization").

    Returns ``partner_B``, a random permutation of the rows, and ``share_B = max(l, 1 - l)`` with
    ``l ~ Beta(alpha, alpha)`` per row, so each row keeps the larger share (in [0.5, 1]) of the mix
    and its own label stays the majority. Mix with :func:`mix_rows`. With ``real_B`` (bool, False on
    a batch's padding rows) the permutation keeps the real rows among themselves, so no real row is
    mixed with padding (and lost to the loss).
    """
    if not 0.0 < alpha < math.inf:
        raise ValueError(f"mixup alpha must be > 0 and finite, got {alpha}")
    if real_B is not None and jnp.shape(real_B) != (num_rows,):
        raise ValueError(f"real_B must have shape ({num_rows},), one flag per row: pass one for each of the {num_rows} rows; got {jnp.shape(real_B)}")
    partner_key, share_key = jax.random.split(key)
    l_B = jax.random.beta(share_key, alpha, alpha, (num_rows,))
    if real_B is None:
        partner_B = jax.random.permutation(partner_key, num_rows)
    else:  # two random orders of the rows, real ones first: the j-th row of one takes the j-th of the other
        order_a, order_b = (_real_rows_first(k, real_B) for k in jax.random.split(partner_key))
        partner_B = jnp.zeros(num_rows, order_b.dtype).at[order_a].set(order_b)
    return partner_B, jnp.maximum(l_B, 1.0 - l_B)


def _real_rows_first(key, real_B: jax.Array) -> jax.Array:
    """The row indices in random order, the real rows (``real_B``) before the others."""
    return jnp.argsort(jax.random.uniform(key, real_B.shape) + jnp.where(real_B, 0.0, 2.0))


def mix_rows(x_B: jax.Array, partner_B: jax.Array, share_B: jax.Array) -> jax.Array:
    """``share * x[b] + (1 - share) * x[partner[b]]`` for each row ``b`` (any trailing shape)."""
    share = share_B.reshape(-1, *([1] * (x_B.ndim - 1))).astype(x_B.dtype)
    return share * x_B + (1 - share) * x_B[partner_B]
