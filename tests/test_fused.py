"""The fused LSTM kernel against the plain scan over ``LSTM.recur`` (values and autodiff gradients).

The float64 finite-difference check in ``test_recurrence.py`` covers the kernel's
hand-written backward pass independently of autodiff.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import E, H, padded_batch, random_layers

from lstm_jax import LSTM, Carry, native, regularisers, scan_layer

SCANNED_LSTM = LSTM._replace(sequence=None)
LENGTHS = (7, 1, 4, 0, 7)


def random_inputs(batch_shape, num_steps=7, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(num_steps, *batch_shape, E)), jnp.float32)
    carry = Carry(*(jnp.asarray(rng.normal(size=(*batch_shape, H)), jnp.float32) for _ in range(2)))
    return x, carry


def run_both(loss_of_cell):
    """Value and gradient of the same loss through the fused kernel and through the plain scan."""
    fused = jax.value_and_grad(loss_of_cell(LSTM), argnums=(0, 1, 2))
    scanned = jax.value_and_grad(loss_of_cell(SCANNED_LSTM), argnums=(0, 1, 2))
    return fused, scanned


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def sequence_loss(cell, **options):
    """A loss that reads every output and both halves of the final carry, with uneven weights."""

    def loss(params, x, carry):
        final, y = scan_layer(cell, params, x, carry=carry, **options)
        weights = jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(final.h)) + jnp.sum(final.c**2)

    return loss


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_fused_matches_scanned_values_and_gradients(reverse, with_lengths):
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((len(LENGTHS),))
    lengths = jnp.array(LENGTHS) if with_lengths else None
    fused, scanned = run_both(lambda cell: sequence_loss(cell, lengths=lengths, reverse=reverse))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))


@pytest.mark.parametrize("kernel", [True, False])
def test_an_empty_sequence_passes_the_carry_through_both_ways(kernel):
    """T = 0: the final carry is the initial one, and so is the gradient (weights and inputs get zeros)."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((3,), num_steps=0)
    with native.disabled() if not kernel else contextlib.nullcontext():
        fused, scanned = run_both(lambda cell: sequence_loss(cell))
        got = fused(params, x, carry)
    assert_trees_close(got, scanned(params, x, carry), rtol=0, atol=0)
    _, (d_params, d_x, d_carry) = got
    assert d_x.shape == x.shape and all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(d_params))
    np.testing.assert_array_equal(d_carry.c, 2 * carry.c)  # d/dc of sum(c**2) with c the initial cell state


def test_fused_outputs_and_final_carry_match_with_padding():
    params = random_layers(LSTM)[0]
    x = jnp.moveaxis(jnp.asarray(padded_batch(LENGTHS, 7)), 1, 0)
    for reverse in (False, True):
        got = scan_layer(LSTM, params, x, lengths=jnp.array(LENGTHS), reverse=reverse)
        want = scan_layer(SCANNED_LSTM, params, x, lengths=jnp.array(LENGTHS), reverse=reverse)
        assert_trees_close(got, want)
        assert (np.asarray(got[1])[:, 3] == 0).all()  # the length-0 row emits zeros and keeps a zero carry
        assert (np.asarray(got[0].c)[3] == 0).all()


def test_fused_with_recurrent_dropout_mask():
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((len(LENGTHS),))
    h_mask = regularisers.recurrent_mask(jax.random.key(3), (len(LENGTHS), H), 0.4, train=True)
    assert (np.asarray(h_mask) == 0).any()
    fused, scanned = run_both(lambda cell: sequence_loss(cell, lengths=jnp.array(LENGTHS), h_mask=h_mask))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask_shape", [(len(LENGTHS), H), (H,)])
def test_a_learned_recurrent_mask_gets_the_scans_gradient(mask_shape, reverse):
    """A mask differentiated by its caller (a learned or concrete dropout, say) gets its gradient through the fused
    path as through the scan, with lengths and a mask broadcast over the batch."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((len(LENGTHS),))
    h_mask = jnp.asarray(np.random.default_rng(7).uniform(0.5, 1.5, mask_shape), jnp.float32)

    def of_mask(cell):
        return lambda mask: sequence_loss(cell, lengths=jnp.array(LENGTHS), h_mask=mask, reverse=reverse)(params, x, carry)

    got, want = jax.grad(of_mask(LSTM))(h_mask), jax.grad(of_mask(SCANNED_LSTM))(h_mask)
    assert float(jnp.abs(want).max()) > 1e-2
    assert_trees_close(got, want, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
def test_fused_any_batch_dimensions(batch_shape, with_mask):
    """Reversed, with lengths, and with a recurrent-dropout mask of the batch's own shape, as ``rnn`` builds it."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs(batch_shape)
    lengths = jnp.asarray(np.random.default_rng(1).integers(0, 8, batch_shape))
    h_mask = regularisers.recurrent_mask(jax.random.key(5), (*batch_shape, H), 0.4, train=True) if with_mask else None
    fused, scanned = run_both(lambda cell: sequence_loss(cell, lengths=lengths, reverse=True, h_mask=h_mask))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))


def test_fused_under_vmap_and_jit():
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((4,))
    lengths = jnp.array([7, 3, 0, 5])

    def one(x_TE, h, c, n):
        return scan_layer(LSTM, params, x_TE, carry=Carry(h, c), lengths=n)

    mapped = jax.jit(jax.vmap(one, in_axes=(1, 0, 0, 0), out_axes=(0, 1)))(x, carry.h, carry.c, lengths)
    assert_trees_close(mapped, scan_layer(SCANNED_LSTM, params, x, carry=carry, lengths=lengths))


def test_fused_unroll_matches():
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((3,), num_steps=9)
    fused, _ = run_both(lambda cell: sequence_loss(cell, unroll=4, lengths=jnp.array([9, 2, 5])))
    _, scanned = run_both(lambda cell: sequence_loss(cell, lengths=jnp.array([9, 2, 5])))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))


def test_fused_bfloat16_tracks_float32():
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((5,))
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, x, carry))
    _, y_low = scan_layer(LSTM, low[0], low[1], carry=low[2])
    _, y = scan_layer(LSTM, params, x, carry=carry)
    assert y_low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_low, np.float32), np.asarray(y), atol=0.05)


def test_bfloat16_scan_loops_track_float32_values_and_gradients():
    """The hand-written backward of the bfloat16 lax.scan loops (GPU, and CPUs without AMX), with lengths, a mask and
    reverse: values and gradients in bfloat16, within 2 % of float32's from the same (rounded) inputs (0.1-0.9 %
    measured on the AVX2 machine, leaf by leaf)."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((len(LENGTHS),))
    h_mask = regularisers.recurrent_mask(jax.random.key(4), (len(LENGTHS), H), 0.3, train=True)
    low_args = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, x, carry))

    def loss(params, x, carry):
        options = dict(lengths=jnp.array(LENGTHS), h_mask=h_mask.astype(x.dtype), reverse=True)
        final, y = scan_layer(LSTM, params, x, carry=carry, **options)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final.c.astype(jnp.float32))

    with native.disabled():
        gradient = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        assert native.TARGETS["backward"] not in gradient.lower(*low_args).as_text()
        low, high = gradient(*low_args), gradient(*jax.tree.map(lambda a: a.astype(jnp.float32), low_args))
    for a, e in zip(jax.tree.leaves(low), jax.tree.leaves(high), strict=True):
        assert a.dtype == (jnp.float32 if a.ndim == 0 else jnp.bfloat16)
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.linalg.norm(a - e) < 0.02 * np.linalg.norm(e)


def test_zoneout_falls_back_to_the_scan():
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((5,))
    options = {"carry": carry, "zoneout": 0.5, "train": False}
    zoned = scan_layer(LSTM, params, x, **options)
    assert_trees_close(zoned, scan_layer(SCANNED_LSTM, params, x, **options))
    assert np.abs(np.asarray(zoned[1]) - np.asarray(scan_layer(LSTM, params, x, carry=carry)[1])).max() > 1e-2


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler here")
def test_the_cpu_kernel_builds_wherever_there_is_a_compiler():
    """test_native.py skips itself where the kernel cannot be built; with a compiler at hand, that is a build error."""
    assert native.load(), "lstm_jax/csrc/lstm_cpu.cc did not build: see the RuntimeWarning above"


@pytest.mark.parametrize("case", ["input too wide", "input far too wide", "input too narrow", "carry too narrow",
                                  "weights that do not fit together"])
def test_shapes_that_do_not_fit_are_refused_as_the_plain_scan_refuses_them(case):
    """The kernel trusts its operands' shapes (a wider input once read past w_x, or crashed the process): every
    mismatch the plain scan's matmuls refuse is refused before the kernel, in one line."""
    params = LSTM.init(jax.random.key(0), E, H)
    x, carry = random_inputs((3,))
    if case == "input too wide":
        x = jnp.concatenate([x, x[..., :1]], axis=-1)
    elif case == "input far too wide":
        x = jnp.tile(x, (1, 1, 500))
    elif case == "input too narrow":
        x = x[..., :-1]
    elif case == "carry too narrow":
        carry = Carry(carry.h[..., :-1], carry.c[..., :-1])
    else:
        params = {**params, "w_h": params["w_h"][:, :-4]}
    with pytest.raises((TypeError, ValueError)):
        scan_layer(SCANNED_LSTM, params, x, carry=carry)
    with pytest.raises(ValueError) as info:
        scan_layer(LSTM, params, x, carry=carry)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mask_dtype", [jnp.float16, jnp.int32, bool])
def test_a_recurrent_mask_of_another_dtype_multiplies_h_as_in_the_plain_scan(mask_dtype):
    """``h * h_mask`` promotes a float16, integer or boolean mask to the step's dtype in the plain scan; the kernel
    takes float32 only (such a mask once reached it and failed at run time, "Wrong buffer dtype")."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((len(LENGTHS),))
    keep = np.random.default_rng(2).random((len(LENGTHS), H)) < 0.7
    h_mask = jnp.asarray(keep, mask_dtype)
    options = dict(carry=carry, lengths=jnp.array(LENGTHS), h_mask=h_mask, reverse=True)
    got, want = scan_layer(LSTM, params, x, **options), scan_layer(SCANNED_LSTM, params, x, **options)
    assert_trees_close(got, want)
    assert got[1].dtype == want[1].dtype == jnp.float32
    fused, scanned = run_both(lambda cell: sequence_loss(cell, h_mask=h_mask))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))


@pytest.mark.parametrize("batch_shape, lengths", [((5,), 4), ((2, 3), [1, 7, 0]), ((2, 3), [[5], [0]])],
                         ids=["one length", "per column", "per row"])
def test_lengths_broadcast_over_the_batch_as_in_the_plain_scan(batch_shape, lengths):
    """The plain scan broadcasts ``lengths`` against the batch from the right (its step mask meets the carry
    ``(..., H)``), so one length, or one per column, serves a whole batch; the fused path once broadcast the
    ``(T, ...)`` step mask from the left, and refused these."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs(batch_shape)
    lengths = jnp.asarray(lengths)
    fused, scanned = run_both(lambda cell: sequence_loss(cell, lengths=lengths, reverse=True))
    assert_trees_close(fused(params, x, carry), scanned(params, x, carry))
    want = scan_layer(SCANNED_LSTM, params, x, lengths=jnp.broadcast_to(lengths, batch_shape))
    assert_trees_close(scan_layer(LSTM, params, x, lengths=lengths), want)


@pytest.mark.parametrize("unroll", [-1, 2.5, None])
def test_an_unroll_the_plain_scan_refuses_is_refused(unroll):
    """The kernel has no unroll: without a check, a value ``lax.scan`` refuses passed unnoticed on CPU only."""
    params = random_layers(LSTM)[0]
    x, carry = random_inputs((3,))
    with pytest.raises((TypeError, ValueError)):
        scan_layer(SCANNED_LSTM, params, x, carry=carry, unroll=unroll)
    with pytest.raises((TypeError, ValueError), match="unroll"):
        scan_layer(LSTM, params, x, carry=carry, unroll=unroll)


@pytest.mark.parametrize("params_dtype, x_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float16),
                                                   (jnp.float16, jnp.float32)])
def test_gradients_of_operands_of_mixed_dtypes_come_back_in_their_dtypes(params_dtype, x_dtype):
    """Mixed dtypes (bfloat16 params with float32 inputs, say) run in the fused path's scan loops: each gradient is
    in its operand's dtype, as autodiff of the plain scan gives it (they once all came back float32)."""
    params = jax.tree.map(lambda a: a.astype(params_dtype), random_layers(LSTM)[0])
    x, carry = random_inputs((len(LENGTHS),))
    x = x.astype(x_dtype)

    def loss(cell):
        def of(params, x, carry):
            final, y = scan_layer(cell, params, x, carry=carry, lengths=jnp.array(LENGTHS))
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final.c.astype(jnp.float32))
        return jax.grad(of, argnums=(0, 1, 2))

    got, want = loss(LSTM)(params, x, carry), loss(SCANNED_LSTM)(params, x, carry)
    assert [a.dtype for a in jax.tree.leaves(got)] == [a.dtype for a in jax.tree.leaves(want)]
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.linalg.norm(a - e) <= 0.02 * np.linalg.norm(e)
