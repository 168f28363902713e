"""Tests for lstm_jax.gates: traced gates against float64 NumPy equations, and the classifier explanation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import E, H, random_layers
from test_cells import chunks, layer_norm, sigmoid

import lstm_jax as lj
from lstm_jax import gates
from lstm_jax.model import ModelConfig, classifier_logits, init_classifier

FAMILY = ("lstm", "peephole", "cifg", "layer_norm", "lstmp")
jit_logits = jax.jit(classifier_logits, static_argnums=1)


def ref_gates(name, p, h, c_prev, x):
    """Input, forget and output gates from the papers' equations, by explicit slicing, in float64."""
    if name == "cifg":
        z_f, _, z_o = chunks(x @ p["w_x"] + h @ p["w_h"] + p["b"], 3)
        return 1.0 - sigmoid(z_f), sigmoid(z_f), sigmoid(z_o)
    if name == "layer_norm":
        z = (
            layer_norm(x @ p["w_x"], p["ln_x_scale"], p["ln_x_bias"], 4)
            + layer_norm(h @ p["w_h"], p["ln_h_scale"], p["ln_h_bias"], 4)
            + p["b"]
        )
    else:
        z = x @ p["w_x"] + h @ p["w_h"] + p["b"]
    z_i, z_f, z_g, z_o = chunks(z, 4)
    if name == "peephole":
        p_i, p_f, p_o = p["w_peep"]
        i, f = sigmoid(z_i + p_i * c_prev), sigmoid(z_f + p_f * c_prev)
        return i, f, sigmoid(z_o + p_o * (f * c_prev + i * np.tanh(z_g)))
    return sigmoid(z_i), sigmoid(z_f), sigmoid(z_o)


@pytest.mark.parametrize("name", FAMILY)
def test_traced_gates_match_the_equations_and_states_match_the_scan(name):
    cell = lj.get_cell(name)
    params = random_layers(cell)[0]
    x_TBE = np.random.default_rng(3).normal(size=(5, 2, E)).astype(np.float32)
    trace = jax.jit(gates.trace_gates, static_argnums=0)(cell, params, x_TBE)
    carry, y_TBH = jax.jit(lj.scan_layer, static_argnums=0)(cell, params, x_TBE)
    np.testing.assert_allclose(trace.h, y_TBH, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace.c[-1], carry.c, rtol=1e-5, atol=1e-6)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h, c = np.zeros_like(np.asarray(trace.h[0], np.float64)), np.zeros((2, H))
    for t in range(5):
        for got, want in zip(
            (trace.input[t], trace.forget[t], trace.output[t]), ref_gates(name, p, h, c, x_TBE[t].astype(np.float64))
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        h, c = np.asarray(trace.h[t], np.float64), np.asarray(trace.c[t], np.float64)


def test_the_cell_without_its_kernel_and_mixed_dtypes_are_traced_as_the_scan_runs_them():
    """``LSTM._replace(sequence=None)`` (the Cell docstring's advice for forward-mode autodiff) is still the LSTM, and
    bfloat16 params on float32 inputs trace in float32, as ``scan_layer`` runs them (both were refused)."""
    params = random_layers(lj.LSTM)[0]
    x_TBE = np.random.default_rng(4).normal(size=(5, 2, E)).astype(np.float32)
    trace = gates.trace_gates(lj.LSTM._replace(sequence=None), params, x_TBE)
    np.testing.assert_allclose(trace.h, lj.scan_layer(lj.LSTM, params, x_TBE)[1], rtol=1e-5, atol=1e-6)
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    trace = gates.trace_gates(lj.LSTM, bf16_params, x_TBE)
    _, y_TBH = lj.scan_layer(lj.LSTM._replace(sequence=None), bf16_params, x_TBE)
    assert trace.h.dtype == y_TBH.dtype == jnp.float32
    np.testing.assert_allclose(trace.h, y_TBH, rtol=1e-6, atol=1e-6)


def test_cells_without_lstm_gates_are_refused_by_name():
    params = random_layers(lj.GRU)[0]
    with pytest.raises(
        ValueError, match=r"defined for the LSTM family \(lstm, peephole, cifg, layer_norm, lstmp\), not gru"
    ):
        gates.trace_gates(lj.GRU, params, jnp.zeros((3, E)))


@pytest.fixture(scope="module")
def classifier():
    config = ModelConfig(embed_dim=8, hidden_size=6, num_layers=2, bidirectional=True, head_hidden=8, pooling="max")
    shapes = jax.eval_shape(lambda key: init_classifier(key, config, 30, 2), jax.random.key(0))  # no init compiled
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype), shapes), config


@pytest.mark.parametrize("layer, direction", [(0, "fwd"), (1, "bwd")])
def test_explanation_traces_the_chosen_half_and_scores_each_prefix(classifier, layer, direction):
    params, config = classifier
    tokens_T = np.array([3, 17, 5, 9, 22, 4], np.int32)
    explanation = gates.explain_classifier(params, config, tokens_T, layer=layer, direction=direction)
    y_TH, _ = jax.jit(lj.rnn, static_argnums=0, static_argnames="time_major")(
        lj.LSTM, params["rnn"][: layer + 1], params["embed"][tokens_T], time_major=True
    )
    half = slice(0, 6) if direction == "fwd" else slice(6, 12)
    np.testing.assert_allclose(explanation.trace.h, y_TH[:, half], rtol=1e-5, atol=1e-6)
    assert explanation.probabilities_TC.shape == (6, 2)
    for t in (2, 5):  # the model on the prefix tokens[: t + 1], as a batch of one
        logits = jit_logits(params, config, jnp.asarray(tokens_T[None, : t + 1]), jnp.array([t + 1]))
        np.testing.assert_allclose(explanation.probabilities_TC[t], jax.nn.softmax(logits[0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer 2 does not exist; the model has 2 recurrent layer"):
        gates.explain_classifier(params, config, tokens_T, layer=2)


def test_the_backward_direction_of_a_one_way_layer_is_refused_not_traced_forward():
    config = ModelConfig(embed_dim=8, hidden_size=6, bidirectional=False, head_hidden=8)
    params = init_classifier(jax.random.key(0), config, 30, 2)
    with pytest.raises(ValueError, match="layer 0 runs one way only; direction 'bwd' needs a bidirectional layer"):
        gates.explain_classifier(params, config, np.array([3, 17, 5], np.int32), direction="bwd")


def test_figure_formats_are_matplotlibs():
    assert {"png", "pdf", "svg"} <= gates.figure_formats() and "txt" not in gates.figure_formats()
