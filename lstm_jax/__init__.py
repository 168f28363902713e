"""lstm_jax: LSTM cells, one scan driver and regularisers as pure functions over parameter dicts."""

from lstm_jax import fused, interop, native, parallel, regularisers
from lstm_jax.cells import (
    CELLS,
    CIFG_LSTM,
    GRU,
    LAYER_NORM_LSTM,
    LSTM,
    PEEPHOLE_LSTM,
    PROJECTED_LSTM,
    VANILLA_RNN,
    Carry,
    Cell,
    get_cell,
    output_size,
)
from lstm_jax.recurrence import init_rnn, rnn, scan_layer, valid_mask

__all__ = [
    "CELLS",
    "CIFG_LSTM",
    "GRU",
    "LAYER_NORM_LSTM",
    "LSTM",
    "PEEPHOLE_LSTM",
    "PROJECTED_LSTM",
    "VANILLA_RNN",
    "Carry",
    "Cell",
    "fused",
    "get_cell",
    "init_rnn",
    "interop",
    "native",
    "output_size",
    "parallel",
    "regularisers",
    "rnn",
    "scan_layer",
    "valid_mask",
]

__version__ = "0.1.0"
