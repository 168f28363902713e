"""Move LSTM and GRU weights between lstm_jax and Flax.

Flax's ``linen.LSTMCell``, ``linen.OptimizedLSTMCell`` and ``nnx.LSTMCell`` keep one
kernel per gate (``ii, if, ig, io`` for the input, ``hi, hf, hg, ho`` with biases for
the hidden state); ``nnx.OptimizedLSTMCell`` keeps them fused (``dense_i``,
``dense_h``). Both use the gate order ``i, f, g, o`` and carry ``(c, h)``, so only
the layout changes. All functions take and return plain nested dicts of arrays
(for ``nnx``, the ``nnx.State.to_pure_dict()`` form of the cell's ``nnx.Param`` state).
"""

import jax.numpy as jnp

LSTM_GATES = ("i", "f", "g", "o")
GRU_GATES = ("r", "z", "n")


def _split_gates(w, names):
    return dict(zip(names, jnp.split(w, len(names), axis=-1)))


def to_flax_lstm(params: dict, *, nnx: bool = False) -> dict:
    """lstm_jax LSTM params -> ``{"params": ...}`` of ``linen.(Optimized)LSTMCell``
    (or, with ``nnx=True``, the pure-dict state of ``nnx.LSTMCell``)."""
    w_x, w_h, b = (_split_gates(params[k], LSTM_GATES) for k in ("w_x", "w_h", "b"))
    flax_params = {}
    for gate in LSTM_GATES:
        flax_params["i" + gate + ("_" if nnx and gate == "f" else "")] = {"kernel": w_x[gate]}
        flax_params["h" + gate] = {"kernel": w_h[gate], "bias": b[gate]}
    return flax_params if nnx else {"params": flax_params}


def from_flax_lstm(variables: dict) -> dict:
    """``linen.(Optimized)LSTMCell`` variables (or ``nnx.LSTMCell`` pure state) -> lstm_jax LSTM params."""
    p = variables.get("params", variables)
    input_kernel = lambda gate: p.get("i" + gate, p.get("i" + gate + "_"))["kernel"]  # nnx renames "if" to "if_"
    return {
        "w_x": jnp.concatenate([input_kernel(g) for g in LSTM_GATES], axis=1),
        "w_h": jnp.concatenate([p["h" + g]["kernel"] for g in LSTM_GATES], axis=1),
        "b": jnp.concatenate([p["h" + g]["bias"] for g in LSTM_GATES]),
    }


def to_nnx_optimized_lstm(params: dict) -> dict:
    """lstm_jax LSTM params -> pure-dict state of ``nnx.OptimizedLSTMCell``."""
    return {"dense_i": {"kernel": params["w_x"]}, "dense_h": {"kernel": params["w_h"], "bias": params["b"]}}


def from_nnx_optimized_lstm(state: dict) -> dict:
    """Pure-dict state of ``nnx.OptimizedLSTMCell`` -> lstm_jax LSTM params."""
    return {"w_x": state["dense_i"]["kernel"], "w_h": state["dense_h"]["kernel"], "b": state["dense_h"]["bias"]}


def to_flax_gru(params: dict) -> dict:
    """lstm_jax GRU params -> ``{"params": ...}`` of ``linen.GRUCell``."""
    w_x, w_h, b = (_split_gates(params[k], GRU_GATES) for k in ("w_x", "w_h", "b"))
    flax_params = {"i" + g: {"kernel": w_x[g], "bias": b[g]} for g in GRU_GATES}
    flax_params |= {"h" + g: {"kernel": w_h[g]} for g in GRU_GATES}
    flax_params["hn"]["bias"] = params["b_hn"]
    return {"params": flax_params}


def from_flax_gru(variables: dict) -> dict:
    """``linen.GRUCell`` variables -> lstm_jax GRU params."""
    p = variables.get("params", variables)
    return {
        "w_x": jnp.concatenate([p["i" + g]["kernel"] for g in GRU_GATES], axis=1),
        "w_h": jnp.concatenate([p["h" + g]["kernel"] for g in GRU_GATES], axis=1),
        "b": jnp.concatenate([p["i" + g]["bias"] for g in GRU_GATES]),
        "b_hn": p["hn"]["bias"],
    }
