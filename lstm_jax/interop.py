"""Move LSTM and GRU weights between lstm_jax and Flax.

Flax's ``linen.LSTMCell``, ``linen.OptimizedLSTMCell`` and ``nnx.LSTMCell`` keep one
kernel per gate (``ii, if, ig, io`` for the input, ``hi, hf, hg, ho`` with biases for
the hidden state); ``nnx.OptimizedLSTMCell`` keeps them fused (``dense_i``,
``dense_h``). Both layouts use the gate order ``i, f, g, o`` of :data:`lstm_jax.LSTM`, so
only the layout changes. All functions take and return plain nested dicts of arrays
(for ``nnx``, the ``nnx.State.to_pure_dict()`` form of the cell's ``nnx.Param`` state),
for one cell: one direction of one layer (``layers[i]``, or ``layers[i]["fwd"]``), or in
Flax the cell's own variables (``variables["params"]["cell"]`` of an ``nn.RNN``).

``linen.GRUCell`` has biases on its three input kernels (``ir, iz, in``) and on ``hn``
only, which is exactly :data:`lstm_jax.GRU`'s ``b`` and ``b_hn``. ``nnx.GRUCell`` has no
bias on ``hn`` at all, so it has no converter here.

What the converters cannot see or map:

- Only :data:`lstm_jax.LSTM` and :data:`lstm_jax.GRU` have Flax counterparts. The peephole,
  CIFG, layer-norm and projected LSTMs and the tanh RNN are refused with a ``ValueError``.
- A Flax cell built with another ``gate_fn`` or ``activation_fn`` than sigmoid and tanh
  computes something else from the same weights; nothing in its variables says so.
- Carries are not converted. Flax's LSTM carry is the tuple ``(c, h)``, ours is
  ``Carry(h, c)``: pass Flax's ``(c, h)`` to lstm_jax as ``Carry(h=h, c=c)``, and ours to
  Flax as ``(carry.c, carry.h)``. The GRU's carry is ``h`` in Flax, ``Carry(h)`` here.
"""

from collections.abc import Mapping

import jax.numpy as jnp

from lstm_jax.cells import gate_shapes_fit

LSTM_GATES = ("i", "f", "g", "o")
GRU_GATES = ("r", "z", "n")

_OTHER_CELLS = {  # a parameter only that cell has -> its name, to say what was passed
    "w_peep": "PEEPHOLE_LSTM",
    "ln_x_scale": "LAYER_NORM_LSTM",
    "w_proj": "PROJECTED_LSTM",
    "b_hn": "GRU",
}


def _split_gates(w, names):
    return dict(zip(names, jnp.split(w, len(names), axis=-1)))


def _check_ours(params, cell: str, keys: tuple, num_gates: int, fn: str) -> None:
    """Refuse, naming the fix, anything but one direction of one layer of ``lstm_jax.<cell>``."""
    takes = f"{fn} takes the params of one lstm_jax.{cell} cell"
    if not isinstance(params, Mapping):
        raise ValueError(f"{takes}, a dict with {', '.join(keys)}; got a {type(params).__name__} (for a stack from "
                         "init_rnn, convert one layer, layers[i])")  # fmt: skip
    if set(params) == {"fwd", "bwd"}:
        raise ValueError(
            f"{takes}; this is a bidirectional layer: convert each direction, layer['fwd'] and layer['bwd']"
        )
    if set(params) != set(keys):
        others = [name for key, name in _OTHER_CELLS.items() if key in params]
        if not others and {"w_x", "w_h", "b"} == set(params) and params["w_h"].ndim == 2:
            num = params["w_h"].shape[1] // max(params["w_h"].shape[0], 1)
            others = [{4: "LSTM", 3: "CIFG_LSTM", 1: "VANILLA_RNN"}.get(num)] if num in (1, 3, 4) else []
        what = f"lstm_jax.{others[0]} params" if others else f"params with {', '.join(sorted(params))}"
        raise ValueError(f"{takes} ({', '.join(keys)}); got {what}")
    if not gate_shapes_fit(params, num_gates):
        shapes = {k: tuple(params[k].shape) for k in ("w_x", "w_h", "b")}
        raise ValueError(
            f"{takes}: w_x (E, {num_gates}H), w_h (H, {num_gates}H), b ({num_gates}H,) for its {num_gates} gates; got "
            f"{', '.join(f'{k} {v}' for k, v in shapes.items())} (lstm_jax.CIFG_LSTM has 3 gates and "
            "lstm_jax.VANILLA_RNN 1; neither has a Flax counterpart)"
        )


def _check_flax(p, needed: tuple, cell: str, fn: str, ok: bool = True, shown: str = "") -> None:
    """Refuse Flax variables of another cell (without all of ``needed``, or not ``ok``), naming the converter
    (or the sub-dict) to use."""
    if ok and all(name in p for name in needed):
        return
    p = p.get("params", p)
    if "cell" in p:
        hint = "these are an nn.RNN's variables: pass the cell's, variables['params']['cell']"
    elif {"ii", "hi"} <= set(p) or {"ii", "if_"} <= set(p):
        hint = "these are an LSTM cell's: use from_flax_lstm"
    elif {"ir", "hr"} <= set(p):
        hint = "these are a linen.GRUCell's: use from_flax_gru"
    elif "dense_i" in p and "bias" in p["dense_i"]:
        hint = ("these look like an nnx.GRUCell's (or nnx.SimpleCell's), which has no bias on W_hn h: "
                "there is no converter for it")  # fmt: skip
    elif "dense_i" in p:
        hint = "these are an nnx.OptimizedLSTMCell's: use from_nnx_optimized_lstm"
    else:
        hint = f"got {', '.join(map(str, p)) or 'nothing'}"
    raise ValueError(f"{fn} takes the variables of {cell} ({shown or ', '.join(needed)}); {hint}")


def to_flax_lstm(params: dict, *, nnx: bool = False) -> dict:
    """lstm_jax LSTM params -> ``{"params": ...}`` of ``linen.(Optimized)LSTMCell``
    (or, with ``nnx=True``, the pure-dict state of ``nnx.LSTMCell``).

    Raises:
      ValueError: for anything but one :data:`lstm_jax.LSTM` cell's params.
    """
    _check_ours(params, "LSTM", ("w_x", "w_h", "b"), 4, "to_flax_lstm")
    w_x, w_h, b = (_split_gates(params[k], LSTM_GATES) for k in ("w_x", "w_h", "b"))
    flax_params = {}
    for gate in LSTM_GATES:
        flax_params["i" + gate + ("_" if nnx and gate == "f" else "")] = {"kernel": w_x[gate]}
        flax_params["h" + gate] = {"kernel": w_h[gate], "bias": b[gate]}
    return flax_params if nnx else {"params": flax_params}


def from_flax_lstm(variables: dict) -> dict:
    """``linen.(Optimized)LSTMCell`` variables (or ``nnx.LSTMCell`` pure state) -> lstm_jax LSTM params."""
    p = variables.get("params", variables)
    input_name = lambda gate: "i" + gate + ("_" if gate == "f" and "if" not in p else "")  # nnx renames "if" to "if_"
    _check_flax(p, tuple(input_name(g) for g in LSTM_GATES) + tuple("h" + g for g in LSTM_GATES),
                "a linen.LSTMCell, linen.OptimizedLSTMCell or nnx.LSTMCell", "from_flax_lstm",
                shown="ii, if (if_ in nnx), ig, io, hi, hf, hg, ho")  # fmt: skip
    return {
        "w_x": jnp.concatenate([p[input_name(g)]["kernel"] for g in LSTM_GATES], axis=1),
        "w_h": jnp.concatenate([p["h" + g]["kernel"] for g in LSTM_GATES], axis=1),
        "b": jnp.concatenate([p["h" + g]["bias"] for g in LSTM_GATES]),
    }


def to_nnx_optimized_lstm(params: dict) -> dict:
    """lstm_jax LSTM params -> pure-dict state of ``nnx.OptimizedLSTMCell``.

    Raises:
      ValueError: for anything but one :data:`lstm_jax.LSTM` cell's params.
    """
    _check_ours(params, "LSTM", ("w_x", "w_h", "b"), 4, "to_nnx_optimized_lstm")
    return {"dense_i": {"kernel": params["w_x"]}, "dense_h": {"kernel": params["w_h"], "bias": params["b"]}}


def from_nnx_optimized_lstm(state: dict) -> dict:
    """Pure-dict state of ``nnx.OptimizedLSTMCell`` -> lstm_jax LSTM params."""
    fused_lstm = "dense_i" in state and "bias" not in state["dense_i"] and "bias" in state.get("dense_h", {})
    _check_flax(state, ("dense_i", "dense_h"), "an nnx.OptimizedLSTMCell", "from_nnx_optimized_lstm", ok=fused_lstm)
    return {"w_x": state["dense_i"]["kernel"], "w_h": state["dense_h"]["kernel"], "b": state["dense_h"]["bias"]}


def to_flax_gru(params: dict) -> dict:
    """lstm_jax GRU params -> ``{"params": ...}`` of ``linen.GRUCell``.

    Raises:
      ValueError: for anything but one :data:`lstm_jax.GRU` cell's params.
    """
    _check_ours(params, "GRU", ("w_x", "w_h", "b", "b_hn"), 3, "to_flax_gru")
    w_x, w_h, b = (_split_gates(params[k], GRU_GATES) for k in ("w_x", "w_h", "b"))
    flax_params = {"i" + g: {"kernel": w_x[g], "bias": b[g]} for g in GRU_GATES}
    flax_params |= {"h" + g: {"kernel": w_h[g]} for g in GRU_GATES}
    flax_params["hn"]["bias"] = params["b_hn"]
    return {"params": flax_params}


def from_flax_gru(variables: dict) -> dict:
    """``linen.GRUCell`` variables -> lstm_jax GRU params."""
    p = variables.get("params", variables)
    _check_flax(p, tuple(k + g for k in "ih" for g in GRU_GATES), "a linen.GRUCell", "from_flax_gru")
    return {
        "w_x": jnp.concatenate([p["i" + g]["kernel"] for g in GRU_GATES], axis=1),
        "w_h": jnp.concatenate([p["h" + g]["kernel"] for g in GRU_GATES], axis=1),
        "b": jnp.concatenate([p["i" + g]["bias"] for g in GRU_GATES]),
        "b_hn": p["hn"]["bias"],
    }
