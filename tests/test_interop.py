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


# --------------------------------------------------------------- what cannot map is refused


OTHER_CELLS = ["peephole", "cifg", "layer_norm", "lstmp", "gru", "rnn"]


def flax_lstm_step_of_converted(params, h, c, x, target):
    """Convert ``params`` with ``target`` and run Flax's matching cell one step: ``(c, h), y``."""
    if target == "linen":
        return nn.LSTMCell(params["w_h"].shape[0]).apply(interop.to_flax_lstm(params), (c, h), x)
    if target == "nnx":
        pure = interop.to_flax_lstm(params, nnx=True)
    else:
        pure = interop.to_nnx_optimized_lstm(params)
    hidden = pure["dense_h" if target == "nnx_optimized" else "hi"]["kernel"].shape[-1]
    module = (nnx.LSTMCell if target == "nnx" else nnx.OptimizedLSTMCell)(E, hidden, rngs=nnx.Rngs(0))
    return nnx_load(module, pure)((c, h), x)


@pytest.mark.parametrize("target", ["linen", "nnx", "nnx_optimized"])
@pytest.mark.parametrize("name", OTHER_CELLS)
def test_lstm_converters_refuse_other_cells(name, target):
    """A conversion either gives a Flax cell that computes what ours does, or is refused with a
    ValueError naming the lstm_jax cell it takes; never a Flax cell computing something else.

    Regression: peephole, layer-norm and projected LSTMs were converted with their extra
    weights dropped, and the 3-gate CIFG and GRU (and the 1-gate tanh RNN, where the
    widths divide) were cut into four "gates", all without a word.
    """
    cell = lstm_jax.get_cell(name)
    hidden = 8  # 3 * 8 and 1 * 8 split into four equal "gates": nothing fails by accident
    params = cell.init(jax.random.key(90), E, hidden)
    rng = np.random.default_rng(91)
    params = jax.tree.map(lambda w: jnp.asarray(0.5 * rng.standard_normal(w.shape), jnp.float32), params)
    carry = cell.init_carry(params, (B,))
    h = random_array(carry.h.shape, 92, 0.8)
    c = random_array((B, hidden), 93, 0.8)
    x = random_array((B, E), 94)
    ours, y = cell.step(params, Carry(h, c if carry.c is not None else None), x)
    try:
        (c_flax, h_flax), y_flax = flax_lstm_step_of_converted(params, h, c, x, target)
    except ValueError as error:
        assert "lstm_jax.LSTM" in str(error)
        return
    # converted without complaint: then Flax must compute what our cell computes
    assert y_flax.shape == y.shape
    np.testing.assert_allclose(y_flax, y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lstm", "peephole", "cifg", "layer_norm", "lstmp", "rnn"])
def test_gru_converter_refuses_other_cells(name):
    params = lstm_jax.get_cell(name).init(jax.random.key(95), E, 6)  # 4 * 6 splits into three "gates"
    with pytest.raises(ValueError, match="lstm_jax.GRU"):
        interop.to_flax_gru(params)


def test_converters_refuse_a_whole_layer_or_stack_naming_the_fix():
    layers = lstm_jax.init_rnn(jax.random.key(96), LSTM, E, H, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"\['fwd'\]"):
        interop.to_flax_lstm(layers[0])
    with pytest.raises(ValueError, match=r"one layer"):
        interop.to_flax_lstm(layers)
    gru_layers = lstm_jax.init_rnn(jax.random.key(97), GRU, E, H, bidirectional=True)
    with pytest.raises(ValueError, match=r"\['fwd'\]"):
        interop.to_flax_gru(gru_layers[0])


def test_from_flax_converters_name_the_right_converter():
    """Flax variables of another cell (or a whole ``nn.RNN``) get a ValueError naming what to call."""
    x, h = jnp.ones((1, E)), jnp.zeros((1, H))
    linen_gru = nn.GRUCell(H).init(jax.random.key(1), h, x)
    linen_lstm = nn.LSTMCell(H).init(jax.random.key(2), (h, h), x)
    linen_rnn = nn.RNN(nn.OptimizedLSTMCell(H)).init(jax.random.key(3), jnp.ones((1, T, E)))
    nnx_opt = nnx.to_pure_dict(nnx.state(nnx.OptimizedLSTMCell(E, H, rngs=nnx.Rngs(4)), nnx.Param))
    nnx_gru = nnx.to_pure_dict(nnx.state(nnx.GRUCell(E, H, rngs=nnx.Rngs(5)), nnx.Param))

    with pytest.raises(ValueError, match="from_flax_gru"):
        interop.from_flax_lstm(linen_gru)
    with pytest.raises(ValueError, match="from_nnx_optimized_lstm"):
        interop.from_flax_lstm(nnx_opt)
    with pytest.raises(ValueError, match=r"\['cell'\]"):
        interop.from_flax_lstm(linen_rnn)
    with pytest.raises(ValueError, match="from_flax_lstm"):
        interop.from_flax_gru(linen_lstm)
    with pytest.raises(ValueError, match="nnx.GRUCell"):
        interop.from_flax_gru(nnx_gru)
    with pytest.raises(ValueError, match="from_flax_lstm"):
        interop.from_nnx_optimized_lstm(linen_lstm)
    # and the nn.RNN variables work once the cell's are picked out
    assert_trees_equal(
        interop.to_flax_lstm(interop.from_flax_lstm(linen_rnn["params"]["cell"]))["params"], linen_rnn["params"]["cell"]
    )


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_bfloat16_weights_convert_exactly_and_match_flax(cell_name):
    """bfloat16 parameters keep their dtype both ways, and Flax's bfloat16 cell agrees with ours to
    bfloat16 rounding; both are compared with a NumPy float64 run of the same weights."""
    cell = lstm_jax.get_cell(cell_name)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cell, seed=98))
    x_BTE = random_array((2, 3, T, E), seed=99).astype(jnp.bfloat16)  # two batch axes
    if cell_name == "lstm":
        variables, flax_cell = interop.to_flax_lstm(params), nn.OptimizedLSTMCell
        assert_trees_equal(interop.from_flax_lstm(variables), params)
    else:
        variables, flax_cell = interop.to_flax_gru(params), nn.GRUCell
        assert_trees_equal(interop.from_flax_gru(variables), params)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    rnn = nn.RNN(flax_cell(H, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    y_flax = rnn.apply({"params": {"cell": variables["params"]}}, x_BTE)
    y, _ = lstm_jax.rnn(cell, [params], x_BTE)
    assert y.dtype == y_flax.dtype == jnp.bfloat16 and y.shape == y_flax.shape == (2, 3, T, H)

    reference = numpy_float64_run(cell_name, params, x_BTE)
    np.testing.assert_allclose(np.asarray(y, np.float64), reference, atol=0.03)
    np.testing.assert_allclose(np.asarray(y_flax, np.float64), reference, atol=0.03)


def numpy_float64_run(cell_name, params, x_BTE):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x_BTE = np.asarray(x_BTE, np.float64)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
    h = np.zeros((*x_BTE.shape[:-2], H))
    c = np.zeros_like(h)
    ys = []
    for t in range(x_BTE.shape[-2]):
        xw = x_BTE[..., t, :] @ p["w_x"] + p["b"]
        hw = h @ p["w_h"]
        if cell_name == "lstm":
            i, f, g, o = np.split(xw + hw, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
        else:
            (x_r, x_z, x_n), (h_r, h_z, h_n) = np.split(xw, 3, axis=-1), np.split(hw, 3, axis=-1)
            r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
            h = (1 - z) * np.tanh(x_n + r * (h_n + p["b_hn"])) + z * h
        ys.append(h)
    return np.stack(ys, axis=-2)
