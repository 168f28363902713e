"""Synthetic long-range memory tasks, generated on the fly from a PRNG key.

Each task is a :class:`Task`: a generator ``(key, batch_size, T) -> TaskBatch`` that is a
pure function of its arguments (same key, same batch), a loss on the outputs of a
recurrent network, and the loss of the best input-blind guess (the baseline a model
must beat to show memory). :func:`init_task_model` / :func:`task_outputs` are the
network: one recurrent layer of any cell and a linear read-out at every step.

References:
  Hochreiter & Schmidhuber 1997, "Long short-term memory" (the adding problem, exp. 4).
  Le, Jaitly & Hinton 2015, "A simple way to initialize recurrent networks of rectified
  linear units" (the two-channel adding setup used here).
  Arjovsky, Shah & Bengio 2016, "Unitary evolution recurrent neural networks" (copy memory).
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lstm_jax.cells import Cell, output_size
from lstm_jax.recurrence import init_rnn, rnn

ADDING_TOLERANCE = 0.04  # an adding answer within this of the target counts as correct
COPY_LENGTH = 10  # symbols to remember in the copy task
COPY_ALPHABET = 8  # data symbols 1..8; 0 is the blank and 9 the delimiter


class TaskBatch(NamedTuple):
    """Inputs and targets of a synthetic task.

    ``weights_B`` is all ones (every row is real); it is there so that the shared
    training loop can count rows as it does for padded text batches.
    """

    x_BTE: jax.Array
    y: jax.Array  # adding: the sums, (B,); copy: a label per step, (B, T + 20)
    weights_B: jax.Array


@functools.partial(jax.jit, static_argnums=(1, 2))
def adding_problem(key: jax.Array, batch_size: int, num_steps: int) -> TaskBatch:
    """The adding problem in the form of Le et al. (2015).

    Channel 0 holds ``num_steps`` values drawn from U[0, 1]; channel 1 is 0 except for
    two markers of 1, one at a uniform position in the first half and one in the
    second half. The target is the sum of the two marked values.

    Returns:
      ``TaskBatch(x_BT2, sums_B, ones_B)``.
    """
    if num_steps < 2:
        raise ValueError(f"the adding problem needs T >= 2 steps, got {num_steps}")
    k_values, k_first, k_second = jax.random.split(key, 3)
    values_BT = jax.random.uniform(k_values, (batch_size, num_steps))
    half = num_steps // 2
    first_B = jax.random.randint(k_first, (batch_size,), 0, half)
    second_B = jax.random.randint(k_second, (batch_size,), half, num_steps)
    steps_T = jnp.arange(num_steps)
    markers_BT = ((steps_T == first_B[:, None]) | (steps_T == second_B[:, None])).astype(values_BT.dtype)
    sums_B = jnp.sum(values_BT * markers_BT, axis=1)
    return TaskBatch(jnp.stack([values_BT, markers_BT], axis=-1), sums_B, jnp.ones((batch_size,)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def copy_memory(key: jax.Array, batch_size: int, delay: int) -> TaskBatch:
    """The copy-memory task of Arjovsky et al. (2016), one-hot encoded.

    The input is 10 symbols from ``1..8``, ``delay - 1`` blanks (0), the delimiter (9)
    and 10 more blanks: ``delay + 20`` steps. The target is blank for ``delay + 10``
    steps, then the 10 symbols in order.

    Returns:
      ``TaskBatch(one_hot_BT10, labels_BT, ones_B)`` with labels in ``0..8``.
    """
    if delay < 1:
        raise ValueError(f"the copy task needs a delay T >= 1, got {delay}")
    symbols_BL = jax.random.randint(key, (batch_size, COPY_LENGTH), 1, COPY_ALPHABET + 1)
    blanks = lambda n: jnp.zeros((batch_size, n), symbols_BL.dtype)
    delimiter_B1 = jnp.full((batch_size, 1), COPY_ALPHABET + 1, symbols_BL.dtype)
    inputs_BT = jnp.concatenate([symbols_BL, blanks(delay - 1), delimiter_B1, blanks(COPY_LENGTH)], axis=1)
    labels_BT = jnp.concatenate([blanks(delay + COPY_LENGTH), symbols_BL], axis=1)
    x_BTE = jax.nn.one_hot(inputs_BT, COPY_ALPHABET + 2)
    return TaskBatch(x_BTE, labels_BT, jnp.ones((batch_size,)))


def adding_loss(outputs_BTO: jax.Array, batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    """Mean squared error of the last step's output; aux: answers within ``ADDING_TOLERANCE``."""
    error_B = outputs_BTO[:, -1, 0] - batch.y
    return jnp.mean(error_B**2), jnp.sum(jnp.abs(error_B) < ADDING_TOLERANCE)


def copy_loss(outputs_BTO: jax.Array, batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy averaged over every step (as in Arjovsky et al.); aux: per-row fraction of the 10 symbols recalled."""
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs_BTO, batch.y))
    recalled_BL = outputs_BTO[:, -COPY_LENGTH:].argmax(-1) == batch.y[:, -COPY_LENGTH:]
    return loss, jnp.sum(jnp.mean(recalled_BL, axis=1))


def adding_baseline(num_steps: int) -> float:
    """MSE of always answering 1: the variance of a sum of two U[0, 1] values, 2/12."""
    return 1.0 / 6.0


def copy_baseline(delay: int) -> float:
    """Cross-entropy of blanks until the delimiter, then uniform guesses: ``10 ln 8 / (T + 20)``."""
    return COPY_LENGTH * math.log(COPY_ALPHABET) / (delay + 2 * COPY_LENGTH)


class Task(NamedTuple):
    """A synthetic task: its generator, sizes, loss and baselines.

    Attributes:
      generate: ``(key, batch_size, T) -> TaskBatch``.
      input_size, output_size: widths of ``x`` and of the read-out.
      loss: ``(outputs_BTO, batch) -> (mean loss, number correct)``.
      baseline: ``T -> loss`` of the best guess that ignores the input.
      solved: ``T -> loss`` below which the task counts as solved.
      aux_name: what "number correct" counts.
      min_T: the smallest ``T`` the generator takes.
    """

    generate: Callable[..., TaskBatch]
    input_size: int
    output_size: int
    loss: Callable[[jax.Array, TaskBatch], tuple[jax.Array, jax.Array]]
    baseline: Callable[[int], float]
    solved: Callable[[int], float]
    aux_name: str
    min_T: int = 1


TASKS: dict[str, Task] = {
    "adding": Task(adding_problem, 2, 1, adding_loss, adding_baseline, lambda T: 0.01, f"answers within {ADDING_TOLERANCE}", 2),
    "copy": Task(copy_memory, COPY_ALPHABET + 2, COPY_ALPHABET + 1, copy_loss, copy_baseline,
                 lambda T: copy_baseline(T) / 10, "symbols recalled"),
}  # fmt: skip


def get_task(name: str) -> Task:
    """Look a task up by name, with an error that lists the choices."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def init_task_model(key: jax.Array, cell: Cell, task: Task, hidden_size: int) -> dict:
    """``{"rnn": [cell params], "out": {"w": H x O, "b": O}}``: one recurrent layer and a linear read-out."""
    k_rnn, k_out = jax.random.split(key)
    layers = init_rnn(k_rnn, cell, task.input_size, hidden_size)
    w = jax.nn.initializers.lecun_normal()(k_out, (output_size(layers[0]), task.output_size))
    return {"rnn": layers, "out": {"w": w, "b": jnp.zeros((task.output_size,))}}


def task_outputs(cell: Cell, params: dict, x_BTE: jax.Array, *, unroll: int = 1) -> jax.Array:
    """Read-out at every step, ``(B, T, O)``."""
    y_BTH, _ = rnn(cell, params["rnn"], x_BTE, unroll=unroll)
    return y_BTH @ params["out"]["w"] + params["out"]["b"]


def make_task_loss(cell: Cell, task: Task, *, unroll: int = 1) -> Callable:
    """``(params, batch, key) -> (loss, correct)``, the signature ``train.make_train_step`` takes."""

    def loss_fn(params, batch: TaskBatch, key=None):
        return task.loss(task_outputs(cell, params, batch.x_BTE, unroll=unroll), batch)

    return loss_fn
