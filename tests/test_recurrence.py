"""Tests for lstm_jax.recurrence: the scan driver against step-by-step references.

The reference for every check below is a plain Python loop that calls ``cell.step``
one time step at a time on each sequence's unpadded part (flipped for the reverse
direction). Parameters are random (not the init) so that zero peepholes, unit norm
scales or zero biases cannot hide a mistake; padded steps hold large garbage.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import E, H, padded_batch, random_layers

import lstm_jax
from lstm_jax import (
    CELLS,
    GRU,
    LAYER_NORM_LSTM,
    LSTM,
    PROJECTED_LSTM,
    Carry,
    init_rnn,
    output_size,
    rnn,
    scan_layer,
    valid_mask,
)
from lstm_jax.recurrence import is_bidirectional

# --------------------------------------------------------------------------- helpers


def random_carry(cell, params, batch, seed):
    rng = np.random.default_rng(seed)
    zeros = cell.init_carry(params, (batch,))
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), zeros)


_JIT_STEPS = {}


def jit_step(cell):
    if cell not in _JIT_STEPS:
        _JIT_STEPS[cell] = jax.jit(cell.step)
    return _JIT_STEPS[cell]


def repad(x_BTE, lengths, num_steps, seed=2):
    """The same valid steps, padded (with fresh garbage) to ``num_steps``."""
    out = padded_batch(lengths, num_steps, seed=seed, input_size=x_BTE.shape[-1])
    for b, n in enumerate(lengths):
        out[b, :n] = x_BTE[b, :n]
    return out


def stack_trees(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def ref_direction(cell, params, x_BTE, lengths, *, reverse=False, carry=None):
    """Loop over each unpadded sequence with ``cell.step``; reverse = flip the valid part."""
    x_BTE = np.asarray(x_BTE)
    batch, num_steps = x_BTE.shape[:2]
    y = np.zeros((batch, num_steps, output_size(params)), np.float32)
    finals = []
    for b in range(batch):
        n = int(lengths[b])
        state = cell.init_carry(params) if carry is None else jax.tree.map(lambda a: a[b], carry)
        steps = range(n - 1, -1, -1) if reverse else range(n)
        for t in steps:
            state, y_t = jit_step(cell)(params, state, x_BTE[b, t])
            y[b, t] = np.asarray(y_t)
        finals.append(state)
    return stack_trees(finals), y


def ref_stack(cell, layers, x_BTE, lengths, *, reverse=False, residual=False, initial_carries=None):
    """The whole stack, layer by layer, from ``ref_direction``."""
    x = np.asarray(x_BTE)
    finals = []
    for index, layer in enumerate(layers):
        start = None if initial_carries is None else initial_carries[index]
        if is_bidirectional(layer):
            fwd_start, bwd_start = (None, None) if start is None else start
            c_f, y_f = ref_direction(cell, layer["fwd"], x, lengths, carry=fwd_start)
            c_b, y_b = ref_direction(cell, layer["bwd"], x, lengths, reverse=True, carry=bwd_start)
            y, carry = np.concatenate([y_f, y_b], -1), (c_f, c_b)
        else:
            carry, y = ref_direction(cell, layer, x, lengths, reverse=reverse, carry=start)
        if residual and index > 0:
            y = y + x
        finals.append(carry)
        x = y
    return x, finals


def assert_trees_close(actual, expected, atol=2e-5, rtol=2e-5):
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"structure {a_def} != {e_def}"
    for a, e in zip(a_leaves, e_leaves):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# ----------------------------------------------------------------- padding semantics


def test_valid_mask():
    mask = valid_mask(jnp.array([0, 2, 3]), 3)
    assert mask.shape == (3, 3)
    np.testing.assert_array_equal(mask[:, 0], [False, False, False])
    np.testing.assert_array_equal(mask[:, 1], [True, True, False])
    np.testing.assert_array_equal(mask[:, 2], [True, True, True])


# Every cell forwards; the reverse direction (cell-agnostic) for two of them here and
# for more through rnn below.
@pytest.mark.parametrize("cell_name, reverse", [(name, False) for name in CELLS] + [("lstm", True), ("gru", True)])
def test_scan_layer_matches_step_by_step_reference(cell_name, reverse):
    cell = CELLS[cell_name]
    (params,) = random_layers(cell)
    lengths = [9, 5, 1, 0]
    x = padded_batch(lengths, 9)
    carry, y_TH = scan_layer(cell, params, jnp.swapaxes(x, 0, 1), lengths=jnp.array(lengths), reverse=reverse)
    ref_carry, ref_y = ref_direction(cell, params, x, lengths, reverse=reverse)
    y = np.asarray(jnp.swapaxes(y_TH, 0, 1))
    assert_trees_close(carry, ref_carry)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    for b, n in enumerate(lengths):
        assert (y[b, n:] == 0).all(), "padded outputs must be exactly zero"
    # An empty sequence keeps its initial (zero) carry.
    assert all((np.asarray(leaf)[3] == 0).all() for leaf in jax.tree.leaves(carry))


@pytest.mark.parametrize("reverse", [False, True])
def test_rnn_stack_matches_step_by_step_reference(reverse):
    cell = LSTM
    layers = random_layers(cell, num_layers=2)
    lengths = [7, 3, 1]
    x = padded_batch(lengths, 7)
    y, finals = rnn(cell, layers, jnp.asarray(x), jnp.array(lengths), reverse=reverse)
    ref_y, ref_finals = ref_stack(cell, layers, x, lengths, reverse=reverse)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    for b, n in enumerate(lengths):
        assert (np.asarray(y)[b, n:] == 0).all()
    # The two directions differ, so this test tells them apart.
    other_y, _ = ref_stack(cell, layers, x, lengths, reverse=not reverse)
    assert np.abs(other_y - ref_y).max() > 1e-2


def test_rnn_unidirectional_default_carry():
    """initial_carries=None means zero carries (regression: it once passed carry=(None,))."""
    layers = random_layers(LSTM)
    x = jnp.asarray(padded_batch([4, 2], 4))
    y, finals = rnn(LSTM, layers, x, jnp.array([4, 2]))
    zeros = [LSTM.init_carry(layer, (2,)) for layer in layers]
    y_ref, finals_ref = rnn(LSTM, layers, x, jnp.array([4, 2]), initial_carries=zeros)
    assert_trees_close((y, finals), (y_ref, finals_ref), atol=0, rtol=0)


MODES = ["forward", "reverse", "bidirectional"]


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "layer_norm"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_invariance(cell_name, mode):
    cell = CELLS[cell_name]
    layers = random_layers(cell, num_layers=1, bidirectional=mode == "bidirectional")
    lengths = [10, 6, 1]
    x10 = padded_batch(lengths, 10)
    x50 = repad(x10, lengths, 50)
    y10, c10 = rnn(cell, layers, jnp.asarray(x10), jnp.array(lengths), reverse=mode == "reverse")
    y50, c50 = rnn(cell, layers, jnp.asarray(x50), jnp.array(lengths), reverse=mode == "reverse")
    np.testing.assert_allclose(y50[:, :10], y10, rtol=1e-6, atol=1e-6)
    assert (np.asarray(y50)[:, 10:] == 0).all()
    assert_trees_close(c50, c10, atol=1e-6, rtol=1e-6)
    # And both are right: the unpadded step-by-step reference (reverse = flip the valid part).
    ref_y, ref_c = ref_stack(cell, layers, x10, lengths, reverse=mode == "reverse")
    np.testing.assert_allclose(y10, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(c10, ref_c)


# (test_padding_invariance checks one bidirectional layer of more cells against the same reference.)
@pytest.mark.parametrize("cell_name, num_layers", [("lstm", 2), ("cifg", 1)])
def test_bidirectional_is_concat_of_forward_and_flipped_reverse(cell_name, num_layers):
    cell = CELLS[cell_name]
    layers = random_layers(cell, num_layers=num_layers, bidirectional=True)
    lengths = [8, 4, 2, 1]
    x = padded_batch(lengths, 8)
    y, finals = rnn(cell, layers, jnp.asarray(x), jnp.array(lengths))
    assert y.shape == (4, 8, 2 * H)
    ref_y, ref_finals = ref_stack(cell, layers, x, lengths)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in finals)
    assert_trees_close(finals, ref_finals)


# ------------------------------------------------------------------ initial carries


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "lstmp"])
def test_initial_carries_are_honoured(cell_name):
    cell = CELLS[cell_name]
    lengths = [5, 2, 0]
    x = padded_batch(lengths, 5)
    uni = random_layers(cell, num_layers=2)
    starts = [random_carry(cell, layer, 3, seed) for seed, layer in enumerate(uni)]
    y, finals = rnn(cell, uni, jnp.asarray(x), jnp.array(lengths), initial_carries=starts)
    ref_y, ref_finals = ref_stack(cell, uni, x, lengths, initial_carries=starts)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    # The empty sequence (length 0) ends with exactly the carry it started with.
    for final, start in zip(finals, starts):
        for a, s in zip(jax.tree.leaves(final), jax.tree.leaves(start)):
            np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(s)[2])
    # And the starts matter: zero carries give a different output.
    y0, _ = ref_stack(cell, uni, x, lengths)
    assert np.abs(y0 - np.asarray(y)).max() > 1e-3
    if cell_name != "lstm":
        return

    bi = random_layers(cell, num_layers=1, bidirectional=True)
    pair = (random_carry(cell, bi[0]["fwd"], 3, 4), random_carry(cell, bi[0]["bwd"], 3, 5))
    y, finals = rnn(cell, bi, jnp.asarray(x), jnp.array(lengths), initial_carries=[pair])
    ref_y, ref_finals = ref_stack(cell, bi, x, lengths, initial_carries=[pair])
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)


def test_a_none_entry_of_initial_carries_starts_that_layer_from_zeros():
    """Per layer, ``None`` means zeros, for a bidirectional layer as for a unidirectional one."""
    lengths = [5, 2, 0]
    x = jnp.asarray(padded_batch(lengths, 5))
    for bidirectional in (False, True):
        layers = random_layers(LSTM, num_layers=2, bidirectional=bidirectional)
        _, finals = rnn(LSTM, layers, x, jnp.array(lengths))
        zeros = jax.tree.map(jnp.zeros_like, finals[0])
        with_none = rnn(LSTM, layers, x, jnp.array(lengths), initial_carries=[None, finals[1]])
        with_zeros = rnn(LSTM, layers, x, jnp.array(lengths), initial_carries=[zeros, finals[1]])
        assert_trees_close(with_none, with_zeros, atol=0, rtol=0)


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_bfloat16_weights_on_float32_inputs_run_in_float32(cell_name):
    """Mixed operands promote as jnp does: the carry and outputs are float32, equal to float32 weights of the same
    values (before, the zero carry took the weights' bfloat16 and the scan refused the float32 step)."""
    cell = CELLS[cell_name]
    params = cell.init(jax.random.key(0), E, H, dtype=jnp.bfloat16)
    x = jnp.asarray(padded_batch([5, 2, 4], 5)).swapaxes(0, 1)
    got = scan_layer(cell, params, x, lengths=jnp.array([5, 2, 4]))
    want = scan_layer(cell, jax.tree.map(lambda a: a.astype(jnp.float32), params), x, lengths=jnp.array([5, 2, 4]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell_name, zoneout", [("lstm", 0.0), ("lstm", 0.2), ("gru", 0.0), ("lstmp", 0.0)])
def test_one_unbatched_carry_starts_every_sequence(cell_name, zoneout):
    """A carry without batch axes broadcasts, on the fused LSTM kernel and on the plain scan (zoneout, other cells)."""
    cell = CELLS[cell_name]
    lengths = [5, 2, 4]
    x = jnp.asarray(padded_batch(lengths, 5))
    layer = random_layers(cell)[0]
    one = jax.tree.map(lambda a: a[0], random_carry(cell, layer, 1, 7))
    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a, (3, *a.shape)), one)
    ran = [scan_layer(cell, layer, jnp.swapaxes(x, 0, 1), lengths=jnp.array(lengths), carry=start, zoneout=zoneout)
           for start in (one, tiled)]  # fmt: skip
    assert_trees_close(ran[0], ran[1], atol=0, rtol=0)
    assert ran[0][0].h.shape == (3, one.h.shape[-1])


# ---------------------------------------------------------- transforms and layouts


BIDIRECTIONALITY = [False, True]


# These use bidirectional layers, which run both a forward and a reverse scan.


def test_jit_matches_eager():
    layers = random_layers(LSTM, num_layers=2, bidirectional=True)
    lengths = jnp.array([7, 3])
    x = jnp.asarray(padded_batch([7, 3], 7))
    eager = rnn(LSTM, layers, x, lengths)
    jitted = jax.jit(lambda layers, x, lengths: rnn(LSTM, layers, x, lengths))(layers, x, lengths)
    assert_trees_close(jitted, eager, atol=1e-6, rtol=1e-6)


def test_vmap_over_unbatched_sequences_matches_batched():
    layers = random_layers(GRU, bidirectional=True)
    lengths = jnp.array([7, 3, 5])
    x = jnp.asarray(padded_batch([7, 3, 5], 7))
    batched = rnn(GRU, layers, x, lengths)
    mapped = jax.vmap(lambda x_TE, length: rnn(GRU, layers, x_TE, length))(x, lengths)
    assert_trees_close(mapped, batched, atol=1e-6, rtol=1e-6)
    # One unbatched sequence (T, E) with a scalar length also runs on its own.
    y_TH, _ = rnn(GRU, layers, x[1], lengths[1])
    np.testing.assert_allclose(y_TH, batched[0][1], rtol=1e-6, atol=1e-6)


def test_time_major_matches_batch_major():
    layers = random_layers(LSTM, bidirectional=True)
    lengths = jnp.array([6, 2])
    x_BTE = jnp.asarray(padded_batch([6, 2], 6))
    y_BTH, finals = rnn(LSTM, layers, x_BTE, lengths)
    y_TBH, finals_tm = rnn(LSTM, layers, jnp.swapaxes(x_BTE, 0, 1), lengths, time_major=True)
    np.testing.assert_allclose(jnp.swapaxes(y_TBH, 0, 1), y_BTH, rtol=1e-6, atol=1e-6)
    assert_trees_close(finals_tm, finals, atol=1e-6, rtol=1e-6)


def test_multiple_batch_dimensions():
    layers = random_layers(LSTM, bidirectional=True)
    lengths = np.array([[5, 1, 3], [2, 5, 4]])
    x = padded_batch(lengths.reshape(-1), 5).reshape(2, 3, 5, E)
    y, finals = rnn(LSTM, layers, jnp.asarray(x), jnp.asarray(lengths))
    assert y.shape == (2, 3, 5, 2 * H)
    flat_y, flat_finals = rnn(LSTM, layers, jnp.asarray(x.reshape(6, 5, E)), jnp.asarray(lengths.reshape(6)))
    np.testing.assert_allclose(np.asarray(y).reshape(6, 5, 2 * H), flat_y, rtol=1e-6, atol=1e-6)
    assert_trees_close(jax.tree.map(lambda a: a.reshape(6, *a.shape[2:]), finals), flat_finals, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- stacks


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_three_layer_shapes(bidirectional):
    layers = random_layers(LSTM, num_layers=3, bidirectional=bidirectional)
    assert len(layers) == 3
    width = 2 * H if bidirectional else H
    first = layers[1]["fwd"] if bidirectional else layers[1]
    assert first["w_x"].shape == (width, 4 * H)
    y, finals = jax.eval_shape(lambda: rnn(LSTM, layers, jnp.ones((4, 9, E)), jnp.array([9, 8, 1, 4])))
    assert y.shape == (4, 9, width)
    assert len(finals) == 3
    for final in finals:
        for carry in final if bidirectional else (final,):
            assert isinstance(carry, Carry)
            assert carry.h.shape == carry.c.shape == (4, H)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_residual_adds_layer_input_from_second_layer(bidirectional):
    layers = random_layers(LSTM, num_layers=2 if bidirectional else 3, bidirectional=bidirectional)
    lengths = [6, 3]
    x = padded_batch(lengths, 6)
    y, finals = rnn(LSTM, layers, jnp.asarray(x), jnp.array(lengths), residual=True)

    if not bidirectional:
        # By hand with scan_layer (time-major), adding each layer's input from layer 1 on.
        h_TE = jnp.swapaxes(jnp.asarray(x), 0, 1)
        manual_finals = []
        for index, layer in enumerate(layers):
            carry, out = scan_layer(LSTM, layer, h_TE, lengths=jnp.array(lengths))
            h_TE = out + h_TE if index > 0 else out
            manual_finals.append(carry)
        np.testing.assert_allclose(y, jnp.swapaxes(h_TE, 0, 1), rtol=1e-6, atol=1e-6)
        assert_trees_close(finals, manual_finals, atol=1e-6, rtol=1e-6)

    # The step-by-step reference agrees, and the residual actually changed something.
    ref_y, ref_finals = ref_stack(LSTM, layers, x, lengths, residual=True)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    plain, _ = ref_stack(LSTM, layers, x, lengths)
    assert np.abs(np.asarray(plain) - np.asarray(y)).max() > 1e-2
    assert (np.asarray(y)[1, 3:] == 0).all()


def test_residual_width_mismatch_raises():
    layers = random_layers(LSTM, bidirectional=True) + random_layers(LSTM, 1, 2 * H, H + 1, bidirectional=True)
    x = jnp.ones((2, 4, E))
    jax.eval_shape(lambda: rnn(LSTM, layers, x))  # fine without residual
    with pytest.raises(ValueError, match="residual"):
        jax.eval_shape(lambda: rnn(LSTM, layers, x, residual=True))


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])  # the LSTM's CPU kernel and the plain scan
def test_a_sequence_without_a_feature_axis_is_refused_with_the_fix(cell_name):
    cell = CELLS[cell_name]
    params = cell.init(jax.random.PRNGKey(0), 1, H)
    with pytest.raises(ValueError, match=r"got shape \(7,\): pass x\[:, None\] for one feature per step"):
        scan_layer(cell, params, jnp.ones(7))
    y_TH = scan_layer(cell, params, jnp.ones((7, 1)))[1]  # the fix it names runs
    assert y_TH.shape == (7, H)
    layers = init_rnn(jax.random.PRNGKey(0), cell, 1, H)
    for time_major, layout in ((False, r"\(\.\.\., T, E\)"), (True, r"\(T, \.\.\., E\) with time_major=True")):
        with pytest.raises(ValueError, match=rf"x must be {layout}, with features last; got shape \(7,\)"):
            rnn(cell, layers, jnp.ones(7), time_major=time_major)
    assert rnn(cell, layers, jnp.ones((7, 1)), time_major=True)[0].shape == (7, H)


def test_a_stack_without_layers_is_refused():
    """``init_rnn(num_layers=0)`` returned ``[]``, and ``rnn`` then returned its input unchanged as the output."""
    for num_layers in (0, -1):
        with pytest.raises(ValueError, match=rf"a stack needs a layer: pass num_layers >= 1, got {num_layers}$"):
            init_rnn(jax.random.key(0), LSTM, E, H, num_layers=num_layers)
    with pytest.raises(ValueError, match=r"layers is empty: pass at least one layer, e.g. from init_rnn$"):
        rnn(LSTM, [], jnp.ones((2, 5, E)))


def test_lengths_that_do_not_fit_the_batch_are_refused_naming_the_layout():
    """A list is taken as an array; the wrong count, floats, or a time-major x without time_major=True get one line
    (they were a TypeError on the list, or XLA's broadcasting error); longer than T reads as T."""
    layers = init_rnn(jax.random.PRNGKey(0), LSTM, E, H)
    x_BTE = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, E)), jnp.float32)
    y_BTH, _ = rnn(LSTM, layers, x_BTE, [10, 6, 3])
    np.testing.assert_array_equal(y_BTH, rnn(LSTM, layers, x_BTE, jnp.asarray([10, 6, 3]))[0])
    np.testing.assert_array_equal(rnn(LSTM, layers, x_BTE, jnp.asarray([12, 6, 3]))[0], y_BTH)
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \(3,\), one per sequence in x's "
                                         r"\(\.\.\., T, E\); got int32 \(2,\)$"):
        rnn(LSTM, layers, x_BTE, jnp.asarray([10, 6]))
    with pytest.raises(ValueError, match=r"got float32 \(3,\)"):
        rnn(LSTM, layers, x_BTE, jnp.asarray([10.0, 6.0, 3.0]))
    with pytest.raises(ValueError, match=r"shape \(10,\).*got int32 \(3,\) \(is x the other way round\? then pass "
                                         r"time_major=True\)"):
        rnn(LSTM, layers, jnp.swapaxes(x_BTE, 0, 1), jnp.asarray([10, 6, 3]))
    with pytest.raises(ValueError, match=r"shape \(3,\), one per sequence in x_TE's \(T, \.\.\., E\); got int32 \(3, 1\)"):
        scan_layer(LSTM, layers[0], jnp.swapaxes(x_BTE, 0, 1), lengths=jnp.asarray([[10], [6], [3]]))


def test_reverse_with_bidirectional_layer_raises():
    layers = random_layers(LSTM, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        rnn(LSTM, layers, jnp.ones((2, 4, E)), reverse=True)
    mixed = layers + random_layers(LSTM, 0, 2 * H, H)
    y, _ = jax.eval_shape(lambda: rnn(LSTM, mixed, jnp.ones((2, 4, E))))  # a mixed stack runs forwards ...
    assert y.shape == (2, 4, H)
    with pytest.raises(ValueError, match="bidirectional"):  # ... but not in reverse
        rnn(LSTM, mixed, jnp.ones((2, 4, E)), reverse=True)


def test_unroll_does_not_change_the_result():
    # reverse=True with lengths is the delicate case; unroll=8 is the whole (16-step) sequence in two.
    layers = random_layers(LSTM)
    lengths = jnp.array([16, 11, 1])
    x = jnp.asarray(padded_batch([16, 11, 1], 16))
    results = [rnn(LSTM, layers, x, lengths, reverse=True, unroll=u) for u in (1, 2, 8)]
    ref_y, _ = ref_stack(LSTM, layers, np.asarray(x), [16, 11, 1], reverse=True)
    np.testing.assert_allclose(results[0][0], ref_y, rtol=2e-5, atol=2e-5)
    for other in results[1:]:
        assert_trees_close(other, results[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", [LSTM, GRU, LAYER_NORM_LSTM], ids=["lstm", "gru", "layer_norm"])
def test_five_thousand_steps_stay_finite(cell):
    layers = init_rnn(jax.random.key(0), cell, 16, 32)
    x = jax.random.normal(jax.random.key(1), (8, 5000, 16))
    y, (final,) = jax.jit(lambda layers, x: rnn(cell, layers, x))(layers, x)
    y = np.asarray(y)
    assert y.shape == (8, 5000, 32)
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= 1.0  # every one of these outputs is bounded by construction
    assert np.abs(y[:, -1]).max() > 1e-3  # and still alive at the end
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(final))
    np.testing.assert_array_equal(final.h, y[:, -1])


def test_projected_lstm_bidirectional_stack():
    proj = 3
    layers = random_layers(PROJECTED_LSTM, num_layers=2, bidirectional=True, proj_size=proj)
    assert layers[1]["fwd"]["w_x"].shape == (2 * proj, 4 * H)
    lengths = [5, 2]
    x = padded_batch(lengths, 5)
    y, finals = rnn(PROJECTED_LSTM, layers, jnp.asarray(x), jnp.array(lengths))
    assert y.shape == (2, 5, 2 * proj)
    for fwd, bwd in finals:
        for carry in (fwd, bwd):
            assert carry.h.shape == (2, proj) and carry.c.shape == (2, H)
    ref_y, ref_finals = ref_stack(PROJECTED_LSTM, layers, x, lengths)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)


# ---------------------------------------------------------------------- gradients
# (last in the file: the float64 subprocess runs while the tests above do)

GRAD_SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from lstm_jax import get_cell, init_rnn, rnn

    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    CONFIGS = json.loads(sys.argv[2])
    B, T, E, H = 3, 6, 3, 4
    LENGTHS = jnp.array([6, 4, 1])

    def randomised(tree, rng, scale):
        # Random values in the structure of ``tree`` (float64), norm scales around 1.
        def fill(path, leaf):
            centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
            return jnp.asarray(centre + scale * rng.standard_normal(leaf.shape), jnp.float64)
        return jax.tree_util.tree_map_with_path(fill, tree)

    out = {}
    for seed, (name, (cell_name, bidirectional, with_carries)) in enumerate(CONFIGS.items()):
        cell = get_cell(cell_name)
        rng = np.random.default_rng(seed)
        init = lambda k: init_rnn(k, cell, E, H, num_layers=2, bidirectional=bidirectional, dtype=jnp.float64)
        shapes = jax.eval_shape(init, jax.random.key(0))
        assert all(s.dtype == jnp.float64 for s in jax.tree.leaves(shapes))
        layers = randomised(shapes, rng, 0.5)
        x = jnp.asarray(rng.standard_normal((B, T, E)))
        carries = None
        if with_carries:
            carries = [randomised(cell.init_carry(layer, (B,)), rng, 0.5) for layer in layers]

        def loss(tree):
            y, finals = rnn(cell, tree[0], x, LENGTHS, initial_carries=tree[1])
            assert y.dtype == jnp.float64
            return sum(jnp.sum(v ** 2) for v in jax.tree.leaves((y, finals)))

        tree = (layers, carries)
        leaves, treedef = jax.tree.flatten(tree)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        flat_loss = jax.jit(lambda leaves: loss(jax.tree.unflatten(treedef, leaves)))
        grads = jax.tree.leaves(jax.jit(jax.grad(loss))(tree))
        base = [np.asarray(l) for l in leaves]
        checks = []
        h = 1e-4
        for i, (path, leaf, grad) in enumerate(zip(paths, base, grads)):
            for flat in rng.choice(leaf.size, size=min(3, leaf.size), replace=False):
                idx = np.unravel_index(flat, leaf.shape)
                def f(delta):
                    moved = list(base)
                    moved[i] = leaf.copy()
                    moved[i][idx] += delta
                    return float(flat_loss(moved))
                # Fourth-order central difference: error O(h^4), rounding O(eps / h).
                fd = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
                checks.append([path, float(np.asarray(grad)[idx]), fd])
        out[name] = checks
    print("RESULT" + json.dumps(out))
    '''
)

GRAD_CONFIGS = {
    # name: (cell, bidirectional, random initial carries (also differentiated))
    "lstm": ("lstm", False, True),
    "layer_norm_bidirectional": ("layer_norm", True, False),
    "gru": ("gru", False, True),
}


@pytest.fixture(scope="module", autouse=True)
def _float64_gradient_job(request):
    """Start the float64 script when this module's first test runs, so that it overlaps
    with the other tests (the gradient tests come last in the file)."""
    wanted = any(
        item.module is request.module and item.originalname == "test_gradients_match_finite_differences_float64"
        for item in request.session.items
    )
    if not wanted:
        yield None
        return
    package_root = str(Path(lstm_jax.__file__).resolve().parents[1])
    env = {**os.environ, "JAX_ENABLE_X64": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", GRAD_SCRIPT, package_root, json.dumps(GRAD_CONFIGS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def float64_gradient_checks(_float64_gradient_job):
    stdout, stderr = _float64_gradient_job.communicate(timeout=600)
    assert _float64_gradient_job.returncode == 0, stderr[-4000:]
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradients_match_finite_differences_float64(float64_gradient_checks, name):
    checks = float64_gradient_checks[name]
    paths = {path for path, _, _ in checks}
    # Every parameter of both layers (and both directions) was probed ...
    for layer in (0, 1):
        for leaf in ("w_x", "w_h", "b"):
            assert any(p.startswith(f"[0][{layer}]") and p.endswith(f"['{leaf}']") for p in paths), (layer, leaf)
    variant_leaf = {"layer_norm_bidirectional": "ln_c_scale", "gru": "b_hn"}.get(name)
    if variant_leaf:
        assert any(p.endswith(f"['{variant_leaf}']") for p in paths)
    if GRAD_CONFIGS[name][2]:  # ... and the initial carries too.
        assert any(p.startswith("[1][1]") for p in paths)
    errors = [(abs(ad - fd) / max(abs(ad), abs(fd), 1e-3), path, ad, fd) for path, ad, fd in checks]
    worst = max(errors)
    assert worst[0] < 1e-6, f"worst relative error {worst}"
    assert max(abs(ad) for _, ad, _ in checks) > 1e-2  # the loss is not trivially flat
