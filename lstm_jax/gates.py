"""Look inside an LSTM: trace its gates and cell state over a sequence.

:func:`trace_gates` runs any cell of the LSTM family (``lstm``, ``peephole``, ``cifg``,
``layer_norm``, ``lstmp``) over a sequence with the cell's own ``recur`` and, at every
step, recomputes the input, forget and output gate activations from the LSTM equations
(Hochreiter & Schmidhuber 1997; Gers et al. 2000):

    i = σ(z_i),  f = σ(z_f),  o = σ(z_o),  c' = f c + i tanh(z_g),  h' = o tanh(c')

with each variant's change (peepholes add ``p * c`` to ``z``; CIFG has ``i = 1 - f``;
the layer-norm LSTM normalises ``W_h h`` per gate). :func:`explain_classifier` does the
same for one layer of a trained sentiment classifier and adds the probability the
classifier gives after each prefix of the text; :func:`plot_explanation` draws it.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lstm_jax.cells import (
    CELLS,
    CIFG_LSTM,
    LAYER_NORM_LSTM,
    LSTM,
    PEEPHOLE_LSTM,
    PROJECTED_LSTM,
    Carry,
    Cell,
    _layer_norm,
    get_cell,
)
from lstm_jax.model import ModelConfig, classifier_logits
from lstm_jax.recurrence import initial_carry, is_bidirectional, rnn


class GateTrace(NamedTuple):
    """Per-step activations, time first: ``(T, ..., H)`` each (``h`` has the output width)."""

    input: jax.Array
    forget: jax.Array
    output: jax.Array
    c: jax.Array
    h: jax.Array


def _split_gates(params, carry, xp):
    """Pre-activations ``z_i, z_f, z_g, z_o`` of the fused-gate LSTMs."""
    return jnp.split(xp + carry.h @ params["w_h"], 4, axis=-1)


def _lstm_gates(params, carry, xp, new_carry):
    z_i, z_f, _, z_o = _split_gates(params, carry, xp)
    return jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jax.nn.sigmoid(z_o)


def _peephole_gates(params, carry, xp, new_carry):
    z_i, z_f, _, z_o = _split_gates(params, carry, xp)
    p_i, p_f, p_o = params["w_peep"]
    return (
        jax.nn.sigmoid(z_i + p_i * carry.c),
        jax.nn.sigmoid(z_f + p_f * carry.c),
        jax.nn.sigmoid(z_o + p_o * new_carry.c),
    )


def _cifg_gates(params, carry, xp, new_carry):
    z_f, _, z_o = jnp.split(xp + carry.h @ params["w_h"], 3, axis=-1)
    forget = jax.nn.sigmoid(z_f)
    return 1.0 - forget, forget, jax.nn.sigmoid(z_o)


def _layer_norm_gates(params, carry, xp, new_carry):
    hw = _layer_norm(carry.h @ params["w_h"], params["ln_h_scale"], params["ln_h_bias"], 4)
    z_i, z_f, _, z_o = jnp.split(xp + hw, 4, axis=-1)
    return jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jax.nn.sigmoid(z_o)


def _step_only(cell: Cell) -> Cell:
    """The cell without its whole-sequence kernel, which gate traces never use (``LSTM._replace(sequence=None)``
    is still the LSTM)."""
    return Cell(*cell._replace(sequence=None))


GATE_FUNCTIONS = {
    _step_only(LSTM): _lstm_gates,
    _step_only(PROJECTED_LSTM): _lstm_gates,
    _step_only(PEEPHOLE_LSTM): _peephole_gates,
    _step_only(CIFG_LSTM): _cifg_gates,
    _step_only(LAYER_NORM_LSTM): _layer_norm_gates,
}


def _gate_function(cell: Cell):
    if _step_only(cell) not in GATE_FUNCTIONS:
        traced = [name for name, c in CELLS.items() if _step_only(c) in GATE_FUNCTIONS]
        name = next((name for name, c in CELLS.items() if _step_only(c) == _step_only(cell)), "this cell")
        raise ValueError(f"gate traces are defined for the LSTM family ({', '.join(traced)}), not {name}")
    return GATE_FUNCTIONS[_step_only(cell)]


def trace_gates(cell: Cell, params, x_TE: jax.Array, carry: Carry | None = None) -> GateTrace:
    """Run ``cell`` over a time-major sequence and record its gates and state at every step.

    Args:
      cell: an LSTM-family cell (``lstm``, ``peephole``, ``cifg``, ``layer_norm``, ``lstmp``).
      params: its parameters.
      x_TE: inputs, ``(T, E)`` or ``(T, ..., E)``.
      carry: initial carry; zeros when None.

    Returns:
      A :class:`GateTrace`; ``c`` and ``h`` are the cell's own states after each step.

    Raises:
      ValueError: for a cell without LSTM gates (``gru``, ``rnn``).
    """
    gates = _gate_function(cell)
    carry = initial_carry(cell, params, x_TE, carry)

    def step(carry, xp):
        new_carry, _ = cell.recur(params, carry, xp)
        input_gate, forget_gate, output_gate = gates(params, carry, xp, new_carry)
        return new_carry, GateTrace(input_gate, forget_gate, output_gate, new_carry.c, new_carry.h)

    _, trace = lax.scan(step, carry, cell.project(params, x_TE))
    return trace


class Explanation(NamedTuple):
    """What :func:`explain_classifier` returns; arrays are NumPy, one row per token."""

    trace: GateTrace  # (T, H) each, for the chosen layer and direction
    probabilities_TC: np.ndarray  # class probabilities after reading tokens[: t + 1]


def explain_classifier(params, config: ModelConfig, tokens_T, *, layer: int = 0, direction: str = "fwd") -> Explanation:
    """Gates of one recurrent layer of a classifier over one text, and its running prediction.

    Args:
      params, config: a classifier from :func:`lstm_jax.model.init_classifier` (evaluation mode).
      tokens_T: the text's token ids, unpadded.
      layer: which recurrent layer to trace.
      direction: ``"fwd"`` or ``"bwd"`` for a bidirectional layer (``bwd`` is reported in text order).

    Returns:
      An :class:`Explanation`. ``probabilities_TC[t]`` is the classifier's output on the
      prefix ``tokens[: t + 1]``, so a bidirectional model is scored on what it has read so far.
    """
    if config.ensemble > 1:
        raise ValueError(f"the model is an ensemble of {config.ensemble}; explain one member: "
                         "jax.tree.map(lambda a: a[i], params) with lstm_jax.model.member_config(config)")  # fmt: skip
    num_layers = len(params["rnn"])
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} does not exist; the model has {num_layers} recurrent layer(s)")
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    if direction == "bwd" and not is_bidirectional(params["rnn"][layer]):
        raise ValueError(f"layer {layer} runs one way only; direction 'bwd' needs a bidirectional layer")
    trace, probabilities_TC = _explain(params, config, jnp.asarray(tokens_T, jnp.int32), layer, direction)
    return Explanation(jax.tree.map(np.asarray, trace), np.asarray(probabilities_TC))


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _explain(params, config: ModelConfig, tokens_T, layer: int, direction: str):
    cell, layers = get_cell(config.cell), params["rnn"]
    x_TE = params["embed"][tokens_T]
    if layer > 0:
        x_TE, _ = rnn(cell, layers[:layer], x_TE, time_major=True, residual=config.residual)
    chosen = layers[layer]
    backwards = is_bidirectional(chosen) and direction == "bwd"
    if is_bidirectional(chosen):
        chosen = chosen[direction]
    trace = trace_gates(cell, chosen, x_TE[::-1] if backwards else x_TE)
    if backwards:
        trace = jax.tree.map(lambda a: a[::-1], trace)
    num_tokens = tokens_T.shape[0]
    prefixes_TT = jnp.where(jnp.arange(num_tokens)[None, :] <= jnp.arange(num_tokens)[:, None], tokens_T[None, :], 0)
    logits_TC = classifier_logits(params, config, prefixes_TT, jnp.arange(1, num_tokens + 1))
    return trace, jax.nn.softmax(logits_TC, axis=-1)


def figure_formats() -> set[str]:
    """The file endings (without the dot) that :func:`plot_explanation` can write: matplotlib's."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot_explanation(
    explanation: Explanation,
    words: list[str],
    path,
    *,
    class_index: int = 1,
    class_name: str = "positive",
    title: str = "",
):
    """Mean gate values, cell-state norm and running class probability per token, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = explanation.trace
    steps = np.arange(len(words))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * len(words) + 2), 7), sharex=True)
    for name in ("input", "forget", "output"):
        axes[0].plot(steps, getattr(trace, name).mean(-1), "o-", label=f"{name} gate")
    axes[0].set(ylabel="mean gate value", ylim=(0, 1))
    axes[0].legend(fontsize=8, ncol=3)
    axes[1].plot(steps, np.linalg.norm(trace.c, axis=-1), "o-", color="tab:purple")
    axes[1].set(ylabel="cell state ‖c‖")
    axes[2].plot(steps, explanation.probabilities_TC[:, class_index], "o-", color="tab:red")
    axes[2].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[2].set(ylabel=f"P({class_name})", ylim=(0, 1))
    axes[2].set_xticks(steps, words, rotation=60, ha="right")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
