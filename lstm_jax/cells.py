"""Recurrent cells as pure functions over parameter dicts.

A cell is a :class:`Cell`: a small tuple of pure functions, like an Optax
``GradientTransformation``. ``init(key, input_size, hidden_size)`` builds the
parameter dict; ``step(params, carry, x)`` advances one time step. ``step`` is
split into ``project`` (the input half of the gates, a matmul that the scan driver
applies to every time step at once, outside the loop) and ``recur`` (the part that
must run inside the loop). Cells are written for one example (``x_E``); leading
batch dimensions work directly, and ``jax.vmap`` works too.

Every cell has the parameters ``w_x`` (input kernel, ``E x G``), ``w_h``
(recurrent kernel, ``R x G``, where ``R`` is the size of ``carry.h``) and a bias.
Gates are fused along ``G`` in the order given in each cell's docstring (the LSTM
uses Flax's ``i, f, g, o``). Recurrent kernels are orthogonal per gate and the
forget-gate bias starts at 1 (Jozefowicz et al. 2015).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lstm_jax import fused

Params = dict[str, jax.Array]


class Carry(NamedTuple):
    """The recurrent state: ``h`` is fed back through ``w_h``; ``c`` is the LSTM cell state."""

    h: jax.Array
    c: Any = None


class Cell(NamedTuple):
    """A recurrent cell as pure functions.

    Attributes:
      init: ``(key, input_size, hidden_size, **options) -> params``.
      project: ``(params, x_...E) -> xp_...G``, valid for any leading dimensions.
      recur: ``(params, carry, xp_...G, h_mask=None) -> (carry, y)``. ``h_mask``
        multiplies ``carry.h`` where it enters the recurrent matmul (recurrent dropout).
      init_carry: ``(params, batch_shape=()) -> carry`` of zeros.
      sequence: optional fused kernel for a whole time-major sequence with the
        signature of :func:`lstm_jax.fused.lstm_sequence`; it must compute what
        scanning ``recur`` computes. The scan driver uses it when it is set (and no
        zoneout is asked for); ``cell._replace(sequence=None)`` turns it off. The LSTM's
        is a ``jax.custom_vjp``: reverse mode (``grad``, and ``hessian``, forward over
        reverse) passes it, forward mode alone (``jvp``, ``jacfwd``, ``linearize``)
        does not, so for those use ``LSTM._replace(sequence=None)``.
    """

    init: Callable[..., Params]
    project: Callable[[Params, jax.Array], jax.Array]
    recur: Callable[..., tuple[Carry, jax.Array]]
    init_carry: Callable[..., Carry]
    sequence: Callable[..., tuple[Carry, jax.Array]] | None = None

    def step(self, params: Params, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step: ``recur(params, carry, project(params, x))``."""
        return self.recur(params, carry, self.project(params, x))


def _documented(cell: Cell, doc: str) -> Cell:
    """``cell`` as an instance of a subclass of `Cell` whose docstring is ``doc``, so ``help(lj.LSTM)`` and
    ``lj.LSTM?`` show the cell's own equations and paper (a tuple instance cannot hold a docstring itself)."""
    return type(Cell.__name__, (Cell,), {"__doc__": doc, "__slots__": (), "__module__": __name__})(*cell)


def gate_shapes_fit(params: Params, num_gates: int) -> bool:
    """Whether ``w_x``, ``w_h`` and ``b`` have the shapes ``(E, G)``, ``(H, G)`` and ``(G,)`` with ``G = num_gates * H``
    (``H = w_h.shape[0]``), as ``init`` makes them for a cell whose ``carry.h`` has the cell's own width."""
    w_x, w_h, b = (jnp.shape(params[name]) for name in ("w_x", "w_h", "b"))
    return len(w_x) == 2 and len(w_h) == 2 and w_h[1] == num_gates * w_h[0] and w_x[1] == w_h[1] and b == (w_h[1],)


def output_size(params: Params) -> int:
    """Size of the output ``y`` (and of ``carry.h``) of any cell."""
    return params["w_h"].shape[0]


# ----------------------------------------------------------------------------- init


def _gate_kernels(key, input_size, recurrent_size, hidden_size, num_gates, dtype):
    """``w_x`` with LeCun-normal columns; ``w_h`` with one orthogonal block per gate."""
    kx, kh = jax.random.split(key)
    w_x = jax.nn.initializers.lecun_normal()(kx, (input_size, num_gates * hidden_size), dtype)
    orthogonal = jax.nn.initializers.orthogonal()
    blocks = [orthogonal(k, (recurrent_size, hidden_size), jnp.float32) for k in jax.random.split(kh, num_gates)]
    return {"w_x": w_x, "w_h": jnp.concatenate(blocks, axis=1).astype(dtype)}  # QR has no low-precision CPU kernel


def _gate_bias(hidden_size, num_gates, forget_gate, forget_bias, dtype):
    bias = jnp.zeros((num_gates, hidden_size), dtype)
    if forget_gate is not None:
        bias = bias.at[forget_gate].set(forget_bias)
    return bias.reshape(-1)


def _init_gated(num_gates, forget_gate):
    def init(key, input_size, hidden_size, *, forget_bias=1.0, dtype=jnp.float32):
        params = _gate_kernels(key, input_size, hidden_size, hidden_size, num_gates, dtype)
        params["b"] = _gate_bias(hidden_size, num_gates, forget_gate, forget_bias, dtype)
        return params

    return init


def _zero_carry(with_cell_state, num_gates):
    def init_carry(params, batch_shape=()):
        dtype = params["w_h"].dtype
        h = jnp.zeros((*batch_shape, params["w_h"].shape[0]), dtype)
        c = jnp.zeros((*batch_shape, params["w_x"].shape[1] // num_gates), dtype) if with_cell_state else None
        return Carry(h, c)

    return init_carry


# ---------------------------------------------------------------------- shared math


def _project(params, x):
    return x @ params["w_x"] + params["b"]


def _recurrent_input(carry, h_mask):
    return carry.h if h_mask is None else carry.h * h_mask


def _layer_norm(x, scale, bias, num_groups, eps=1e-5):
    """Normalise each of ``num_groups`` equal chunks of the last axis separately."""
    x_GH = x.reshape(*x.shape[:-1], num_groups, -1)
    mean = x_GH.mean(-1, keepdims=True)
    var = ((x_GH - mean) ** 2).mean(-1, keepdims=True)
    x_GH = (x_GH - mean) * jax.lax.rsqrt(var + eps)
    return x_GH.reshape(x.shape) * scale + bias


def _lstm_update(gates, c, normalise_c=lambda c: c):
    """LSTM gating on fused ``i, f, g, o`` pre-activations: returns ``(c, o * tanh(c))``."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(normalise_c(c))


# ---------------------------------------------------------------------- the cells


def _lstm_recur(params, carry, xp, h_mask=None):
    gates = xp + _recurrent_input(carry, h_mask) @ params["w_h"]
    c, h = _lstm_update(gates, carry.c)
    return Carry(h, c), h


LSTM = _documented(
    Cell(_init_gated(4, forget_gate=1), _project, _lstm_recur, _zero_carry(True, 4), fused.lstm_sequence),
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of
    Gers et al. 2000). Gates ``i, f, g, o``; parameters match ``flax.linen.OptimizedLSTMCell``
    through :mod:`lstm_jax.interop`. Sequences run through the fused kernel
    :func:`lstm_jax.fused.lstm_sequence`.""",
)


def _init_peephole(key, input_size, hidden_size, *, forget_bias=1.0, dtype=jnp.float32):
    params = _init_gated(4, forget_gate=1)(key, input_size, hidden_size, forget_bias=forget_bias, dtype=dtype)
    params["w_peep"] = jnp.zeros((3, hidden_size), dtype)
    return params


def _peephole_recur(params, carry, xp, h_mask=None):
    i, f, g, o = jnp.split(xp + _recurrent_input(carry, h_mask) @ params["w_h"], 4, axis=-1)
    p_i, p_f, p_o = params["w_peep"]
    c = jax.nn.sigmoid(f + p_f * carry.c) * carry.c + jax.nn.sigmoid(i + p_i * carry.c) * jnp.tanh(g)
    h = jax.nn.sigmoid(o + p_o * c) * jnp.tanh(c)
    return Carry(h, c), h


PEEPHOLE_LSTM = _documented(
    Cell(_init_peephole, _project, _peephole_recur, _zero_carry(True, 4)),
    """Peephole LSTM (Gers & Schmidhuber 2000, "Recurrent nets that time and count").
    The input and forget gates see ``c[t-1]``, the output gate sees ``c[t]``, through the
    diagonal weights ``w_peep = [p_i, p_f, p_o]`` (initialised to zero).""",
)


def _cifg_recur(params, carry, xp, h_mask=None):
    f, g, o = jnp.split(xp + _recurrent_input(carry, h_mask) @ params["w_h"], 3, axis=-1)
    forget = jax.nn.sigmoid(f)
    c = forget * carry.c + (1.0 - forget) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return Carry(h, c), h


CIFG_LSTM = _documented(
    Cell(_init_gated(3, forget_gate=0), _project, _cifg_recur, _zero_carry(True, 3)),
    """Coupled input-forget gate LSTM (Greff et al. 2017, "LSTM: A search space odyssey"):
    the input gate is ``1 - f``. Gates ``f, g, o``.""",
)


def _init_layer_norm(key, input_size, hidden_size, *, forget_bias=1.0, dtype=jnp.float32):
    params = _init_gated(4, forget_gate=1)(key, input_size, hidden_size, forget_bias=forget_bias, dtype=dtype)
    for name, size in (("x", 4 * hidden_size), ("h", 4 * hidden_size), ("c", hidden_size)):
        params[f"ln_{name}_scale"] = jnp.ones((size,), dtype)
        params[f"ln_{name}_bias"] = jnp.zeros((size,), dtype)
    return params


def _layer_norm_project(params, x):
    return _layer_norm(x @ params["w_x"], params["ln_x_scale"], params["ln_x_bias"], 4) + params["b"]


def _layer_norm_recur(params, carry, xp, h_mask=None):
    hw = _recurrent_input(carry, h_mask) @ params["w_h"]
    gates = xp + _layer_norm(hw, params["ln_h_scale"], params["ln_h_bias"], 4)
    c, h = _lstm_update(gates, carry.c, lambda c: _layer_norm(c, params["ln_c_scale"], params["ln_c_bias"], 1))
    return Carry(h, c), h


LAYER_NORM_LSTM = _documented(
    Cell(_init_layer_norm, _layer_norm_project, _layer_norm_recur, _zero_carry(True, 4)),
    """Layer-normalised LSTM (Ba, Kiros & Hinton 2016, "Layer normalization", supplementary
    material, LSTM equations). ``W_x x`` and ``W_h h`` are normalised before they are summed, and
    the cell state is normalised before the output ``tanh``. Unlike the paper, which normalises each
    whole ``4H`` vector with one mean and variance, each gate's block is normalised on its own (as
    TensorFlow's ``LayerNormBasicLSTMCell`` does), so no gate's scale is set by another's. Gates
    ``i, f, g, o``.""",
)


def _init_projected(key, input_size, hidden_size, *, proj_size=None, forget_bias=1.0, dtype=jnp.float32):
    proj_size = hidden_size // 2 if proj_size is None else proj_size
    if proj_size < 1:
        raise ValueError(f"the LSTMP's projection needs proj_size >= 1, got {proj_size}"
                         + (f" (hidden_size {hidden_size} // 2); pass proj_size, or hidden_size >= 2" if hidden_size < 2 else ""))
    k_gates, k_proj = jax.random.split(key)
    params = _gate_kernels(k_gates, input_size, proj_size, hidden_size, 4, dtype)
    params["b"] = _gate_bias(hidden_size, 4, 1, forget_bias, dtype)
    params["w_proj"] = jax.nn.initializers.lecun_normal()(k_proj, (hidden_size, proj_size), dtype)
    return params


def _projected_recur(params, carry, xp, h_mask=None):
    c, h_full = _lstm_update(xp + _recurrent_input(carry, h_mask) @ params["w_h"], carry.c)
    h = h_full @ params["w_proj"]
    return Carry(h, c), h


PROJECTED_LSTM = _documented(
    Cell(_init_projected, _project, _projected_recur, _zero_carry(True, 4)),
    """LSTM with a recurrent projection layer, LSTMP (Sak, Senior & Beaufays 2014).
    The cell has ``hidden_size`` units; its output ``r = (o * tanh(c)) W_proj`` has
    ``proj_size`` units (default ``hidden_size // 2``) and is what recurs. Without the paper's
    peephole connections and its optional non-recurrent projection.""",
)


def _init_gru(key, input_size, hidden_size, *, dtype=jnp.float32):
    params = _gate_kernels(key, input_size, hidden_size, hidden_size, 3, dtype)
    params["b"] = jnp.zeros((3 * hidden_size,), dtype)
    params["b_hn"] = jnp.zeros((hidden_size,), dtype)
    return params


def _gru_recur(params, carry, xp, h_mask=None):
    x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(_recurrent_input(carry, h_mask) @ params["w_h"], 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * (h_n + params["b_hn"]))
    h = (1.0 - z) * n + z * carry.h
    return Carry(h), h


GRU = _documented(
    Cell(_init_gru, _project, _gru_recur, _zero_carry(False, 3)),
    """Gated recurrent unit (Cho et al. 2014), in the form of ``flax.linen.GRUCell``
    (the reset gate multiplies ``W_hn h + b_hn``). Gates ``r, z, n``.""",
)


def _rnn_recur(params, carry, xp, h_mask=None):
    h = jnp.tanh(xp + _recurrent_input(carry, h_mask) @ params["w_h"])
    return Carry(h), h


def _init_rnn(key, input_size, hidden_size, *, dtype=jnp.float32):
    return _init_gated(1, forget_gate=None)(key, input_size, hidden_size, dtype=dtype)


VANILLA_RNN = _documented(
    Cell(_init_rnn, _project, _rnn_recur, _zero_carry(False, 1)),
    """Elman (1990) tanh RNN: ``h = tanh(W_x x + W_h h + b)``; the baseline whose
    gradient vanishes over long gaps.""",
)

CELLS: dict[str, Cell] = {
    "lstm": LSTM,
    "peephole": PEEPHOLE_LSTM,
    "cifg": CIFG_LSTM,
    "layer_norm": LAYER_NORM_LSTM,
    "lstmp": PROJECTED_LSTM,
    "gru": GRU,
    "rnn": VANILLA_RNN,
}


def get_cell(name: str) -> Cell:
    """Look a cell up by name, with an error that lists the choices."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; choose one of {', '.join(CELLS)}")
    return CELLS[name]
