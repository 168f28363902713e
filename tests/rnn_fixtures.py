"""Random recurrent parameters, padded batches and a NumPy sigmoid, shared by the cell, driver, kernel and
regulariser tests."""

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import init_rnn

E, H = 5, 6


def random_layers(cell, seed=0, input_size=E, hidden_size=H, **options):
    """Random parameters with the structure ``init_rnn`` gives, far from neutral values.

    Built from ``jax.eval_shape`` and NumPy so that no initialiser is compiled (each
    new shape costs about a second of XLA compilation).
    """
    shapes = jax.eval_shape(lambda k: init_rnn(k, cell, input_size, hidden_size, **options), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(centre + 0.5 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def padded_batch(lengths, num_steps, seed=1, input_size=E):
    """Random inputs with large garbage on padded steps, which must not leak anywhere."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), num_steps, input_size)).astype(np.float32)
    for b, n in enumerate(lengths):
        x[b, n:] = 1e3 * rng.normal(size=x[b, n:].shape)
    return x


def sigmoid(x):
    """The logistic function in NumPy (float64 for float64 input), for the tests' reference cells."""
    return 1.0 / (1.0 + np.exp(-x))
