"""Tests for lstm_jax.interop: our LSTM and GRU against Flax's own cells.

Flax (``linen`` and ``nnx``) is the independent reference here: the parameters are
converted with :mod:`lstm_jax.interop`, both sides run in float32, and outputs and
carries must agree to float32 rounding.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_jax
from lstm_jax import GRU, LSTM, Carry, interop

B, T, E, H = 4, 12, 5, 7
RTOL, ATOL = 1e-5, 1e-6
LENGTHS = np.array([12, 5, 1, 9], np.int32)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def random_params(cell, seed=0, scale=0.5):
    """``cell.init`` with every leaf replaced by ``scale * N(0, 1)``, so biases matter too."""
    params = cell.init(jax.random.key(seed), E, H)
    rng = np.random.default_rng(seed + 100)
    return jax.tree.map(lambda w: jnp.asarray(scale * rng.standard_normal(w.shape), jnp.float32), params)


def random_array(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_same_layout(ours, theirs):
    """Same nested keys, same shapes and dtypes."""
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(ours) == shapes(theirs)


def nnx_load(module, pure):
    """Load a pure dict of parameters into an nnx module."""
    state = nnx.state(module, nnx.Param)
    assert_same_layout(pure, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return module



# ------------------------------------------------------------------- linen, whole sequences


def test_lstm_sequence_matches_linen_rnn_optimized_lstm():
    params = random_params(LSTM, seed=1)
    x_BTE = random_array((B, T, E), seed=2)
    flax_vars = interop.to_flax_lstm(params)
    rnn = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)
    assert_same_layout(flax_vars["params"], rnn.init(jax.random.key(0), x_BTE)["params"]["cell"])

    (c_flax, h_flax), y_flax = rnn.apply({"params": {"cell": flax_vars["params"]}}, x_BTE)
    y, carries = lstm_jax.rnn(LSTM, [params], x_BTE)

    assert y.shape == y_flax.shape == (B, T, H)
    np.testing.assert_allclose(y, y_flax, rtol=RTOL, atol=ATOL)
    assert isinstance(carries[0], Carry)
    np.testing.assert_allclose(carries[0].h, h_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].c, c_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].h, y[:, -1], rtol=0, atol=0)


def test_lstm_sequence_with_lengths_matches_linen_rnn_seq_lengths():
    params = random_params(LSTM, seed=3)
    x_BTE = random_array((B, T, E), seed=4)
    rnn = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)
    variables = {"params": {"cell": interop.to_flax_lstm(params)["params"]}}

    # Flax selects the carry at step seq_lengths - 1 of each sequence (its _select_last_carry);
    # its outputs at padded steps are whatever the cell computed there, so compare valid steps only.
    (c_flax, h_flax), y_flax = rnn.apply(variables, x_BTE, seq_lengths=jnp.asarray(LENGTHS))
    y, carries = lstm_jax.rnn(LSTM, [params], x_BTE, jnp.asarray(LENGTHS))

    valid_BT = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_allclose(np.asarray(y)[valid_BT], np.asarray(y_flax)[valid_BT], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(y)[~valid_BT], 0.0)
    np.testing.assert_allclose(carries[0].h, h_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].c, c_flax, rtol=RTOL, atol=ATOL)

    # Independently of Flax's carry slicing: the final carry of each sequence is the one
    # Flax reaches after running that sequence alone, truncated to its length.
    for b, length in enumerate(LENGTHS):
        (c_b, h_b), _ = rnn.apply(variables, x_BTE[b : b + 1, :length])
        np.testing.assert_allclose(carries[0].h[b], h_b[0], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(carries[0].c[b], c_b[0], rtol=RTOL, atol=ATOL)
    # and the lengths matter: without them the carries differ for the short sequences
    _, unmasked = lstm_jax.rnn(LSTM, [params], x_BTE)
    assert np.abs(np.asarray(unmasked[0].h[1:]) - np.asarray(carries[0].h[1:])).min() > 0


def test_gru_sequence_matches_linen_rnn_gru_cell():
    params = random_params(GRU, seed=5)
    x_BTE = random_array((B, T, E), seed=6)
    flax_vars = interop.to_flax_gru(params)
    rnn = nn.RNN(nn.GRUCell(H), return_carry=True)
    assert_same_layout(flax_vars["params"], rnn.init(jax.random.key(0), x_BTE)["params"]["cell"])

    h_flax, y_flax = rnn.apply({"params": {"cell": flax_vars["params"]}}, x_BTE, seq_lengths=jnp.asarray(LENGTHS))
    y, carries = lstm_jax.rnn(GRU, [params], x_BTE, jnp.asarray(LENGTHS))
    valid_BT = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_allclose(np.asarray(y)[valid_BT], np.asarray(y_flax)[valid_BT], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].h, h_flax, rtol=RTOL, atol=ATOL)
    assert carries[0].c is None


# ---------------------------------------------------------------------------- single steps


def random_lstm_step_inputs(seed):
    params = random_params(LSTM, seed=seed)
    h, c = random_array((B, H), seed + 1, 0.8), random_array((B, H), seed + 2, 0.8)
    x = random_array((B, E), seed + 3)
    return params, h, c, x


def assert_lstm_step_matches(params, h, c, x, flax_step):
    """``flax_step((c, h), x) -> ((c, h), y)`` against our ``LSTM.step``."""
    (c_flax, h_flax), y_flax = flax_step((c, h), x)
    carry, y = LSTM.step(params, Carry(h, c), x)
    np.testing.assert_allclose(y, y_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carry.h, h_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carry.c, c_flax, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("flax_cell", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_lstm_step_matches_linen_cells(flax_cell):
    params, h, c, x = random_lstm_step_inputs(10)
    cell = flax_cell(H)
    variables = interop.to_flax_lstm(params)
    assert_same_layout(variables, cell.init(jax.random.key(0), (c, h), x))
    assert_lstm_step_matches(params, h, c, x, lambda carry, x: cell.apply(variables, carry, x))


def test_lstm_step_matches_nnx_lstm_cell():
    params, h, c, x = random_lstm_step_inputs(20)
    pure = interop.to_flax_lstm(params, nnx=True)
    assert "if_" in pure and "if" not in pure
    module = nnx_load(nnx.LSTMCell(E, H, rngs=nnx.Rngs(0)), pure)
    assert_lstm_step_matches(params, h, c, x, module)


def test_lstm_step_matches_nnx_optimized_lstm_cell():
    params, h, c, x = random_lstm_step_inputs(30)
    module = nnx_load(nnx.OptimizedLSTMCell(E, H, rngs=nnx.Rngs(0)), interop.to_nnx_optimized_lstm(params))
    assert_lstm_step_matches(params, h, c, x, module)


def test_gru_step_matches_linen_gru_cell():
    params = random_params(GRU, seed=40)
    h, x = random_array((B, H), 41, 0.8), random_array((B, E), 42)
    cell = nn.GRUCell(H)
    variables = interop.to_flax_gru(params)
    assert_same_layout(variables, cell.init(jax.random.key(0), h, x))
    h_flax, y_flax = cell.apply(variables, h, x)
    carry, y = GRU.step(params, Carry(h), x)
    np.testing.assert_allclose(y, y_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carry.h, h_flax, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- round trips


def test_round_trips_are_exact():
    lstm, gru = random_params(LSTM, seed=50), random_params(GRU, seed=51)
    assert_trees_equal(interop.from_flax_lstm(interop.to_flax_lstm(lstm)), lstm)
    assert_trees_equal(interop.from_flax_lstm(interop.to_flax_lstm(lstm, nnx=True)), lstm)
    assert_trees_equal(interop.from_nnx_optimized_lstm(interop.to_nnx_optimized_lstm(lstm)), lstm)
    assert_trees_equal(interop.from_flax_gru(interop.to_flax_gru(gru)), gru)
    # from_flax_* also take the bare params dict (without the "params" collection)
    assert_trees_equal(interop.from_flax_lstm(interop.to_flax_lstm(lstm)["params"]), lstm)
    assert_trees_equal(interop.from_flax_gru(interop.to_flax_gru(gru)["params"]), gru)


def test_round_trips_from_flax_side_are_exact():
    x, h = jnp.ones((1, E)), jnp.zeros((1, H))
    linen_lstm = nn.OptimizedLSTMCell(H).init(jax.random.key(1), (h, h), x)
    linen_lstm = jax.tree.map(lambda a: a + random_array(a.shape, 52), linen_lstm)  # non-zero biases
    assert_trees_equal(interop.to_flax_lstm(interop.from_flax_lstm(linen_lstm)), linen_lstm)

    nnx_lstm = nnx.to_pure_dict(nnx.state(nnx.LSTMCell(E, H, rngs=nnx.Rngs(2)), nnx.Param))
    assert_trees_equal(interop.to_flax_lstm(interop.from_flax_lstm(nnx_lstm), nnx=True), nnx_lstm)

    nnx_opt = nnx.to_pure_dict(nnx.state(nnx.OptimizedLSTMCell(E, H, rngs=nnx.Rngs(3)), nnx.Param))
    assert_trees_equal(interop.to_nnx_optimized_lstm(interop.from_nnx_optimized_lstm(nnx_opt)), nnx_opt)

    linen_gru = nn.GRUCell(H).init(jax.random.key(4), h, x)
    linen_gru = jax.tree.map(lambda a: a + random_array(a.shape, 53), linen_gru)
    assert_trees_equal(interop.to_flax_gru(interop.from_flax_gru(linen_gru)), linen_gru)


def test_flax_initialised_lstm_runs_identically_in_lstm_jax():
    """Weights initialised by Flax, converted once, give Flax's outputs in our scan."""
    x_BTE = random_array((B, T, E), seed=60)
    variables = nn.OptimizedLSTMCell(H).init(jax.random.key(7), (jnp.zeros((B, H)),) * 2, x_BTE[:, 0])
    params = interop.from_flax_lstm(variables)
    assert set(params) == {"w_x", "w_h", "b"}
    assert params["w_x"].shape == (E, 4 * H) and params["w_h"].shape == (H, 4 * H) and params["b"].shape == (4 * H,)

    (c_flax, h_flax), y_flax = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True).apply(
        {"params": {"cell": variables["params"]}}, x_BTE
    )
    y, carries = lstm_jax.rnn(LSTM, [params], x_BTE)
    np.testing.assert_allclose(y, y_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].h, h_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(carries[0].c, c_flax, rtol=RTOL, atol=ATOL)


def test_nnx_initialised_lstms_run_identically_in_lstm_jax():
    _, h, c, x = random_lstm_step_inputs(70)
    lstm_cell = nnx.LSTMCell(E, H, rngs=nnx.Rngs(8))
    params = interop.from_flax_lstm(nnx.to_pure_dict(nnx.state(lstm_cell, nnx.Param)))
    assert_lstm_step_matches(params, h, c, x, lstm_cell)

    opt_cell = nnx.OptimizedLSTMCell(E, H, rngs=nnx.Rngs(9))
    params = interop.from_nnx_optimized_lstm(nnx.to_pure_dict(nnx.state(opt_cell, nnx.Param)))
    assert_lstm_step_matches(params, h, c, x, opt_cell)


def test_rnn_default_initial_carry_is_zeros():
    """Regression: ``rnn`` once passed ``(None,)`` as a unidirectional layer's start and crashed."""
    params = random_params(LSTM, seed=80)
    x_BTE = random_array((B, T, E), seed=81)
    y, carries = lstm_jax.rnn(LSTM, [params], x_BTE)
    zeros = LSTM.init_carry(params, (B,))
    y_zero, carries_zero = lstm_jax.rnn(LSTM, [params], x_BTE, initial_carries=[zeros])
    np.testing.assert_array_equal(y, y_zero)
    assert_trees_equal(carries, carries_zero)
