"""Tests for lstm_jax.tasks: generators against NumPy re-derivations, losses, baselines, the model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax as lj
from lstm_jax import tasks


def test_adding_problem_markers_and_targets_match_a_numpy_recount():
    T = 30
    batch = tasks.adding_problem(jax.random.key(3), 256, T)
    x, y = np.asarray(batch.x_BTE, np.float64), np.asarray(batch.y, np.float64)
    assert x.shape == (256, T, 2) and y.shape == (256,) and np.all(np.asarray(batch.weights_B) == 1)
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0.0 and values.max() < 1.0
    assert set(np.unique(markers)) == {0.0, 1.0}
    first, second = [], []
    for b in range(256):
        (positions,) = np.nonzero(markers[b])
        assert len(positions) == 2, positions
        first.append(positions[0])
        second.append(positions[1])
        assert positions[0] < T // 2 <= positions[1]
        np.testing.assert_allclose(y[b], values[b, positions[0]] + values[b, positions[1]], rtol=1e-6)
    assert len(set(first)) > 5 and len(set(second)) > 5  # positions vary across the batch


def test_adding_baseline_is_the_mse_of_always_answering_one():
    batch = tasks.adding_problem(jax.random.key(0), 200_000, 4)
    empirical = float(np.mean((np.asarray(batch.y, np.float64) - 1.0) ** 2))
    assert abs(empirical - tasks.adding_baseline(200)) < 0.003
    assert abs(tasks.adding_baseline(200) - 0.1667) < 1e-3


def test_copy_memory_layout_matches_arjovsky_et_al():
    delay = 7
    batch = tasks.copy_memory(jax.random.key(1), 64, delay)
    x, labels = np.asarray(batch.x_BTE), np.asarray(batch.y)
    assert x.shape == (64, delay + 20, 10) and labels.shape == (64, delay + 20)
    np.testing.assert_array_equal(x.sum(-1), 1.0)  # one-hot
    inputs = x.argmax(-1)
    symbols = inputs[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8 and len(np.unique(symbols)) == 8
    np.testing.assert_array_equal(inputs[:, 10 : 10 + delay - 1], 0)
    np.testing.assert_array_equal(inputs[:, 10 + delay - 1], 9)  # the delimiter
    np.testing.assert_array_equal(inputs[:, delay + 10 :], 0)
    np.testing.assert_array_equal(labels[:, : delay + 10], 0)
    np.testing.assert_array_equal(labels[:, delay + 10 :], symbols)


@pytest.mark.parametrize("generate, T", [(tasks.adding_problem, 50), (tasks.copy_memory, 20)])
def test_generators_are_deterministic_in_the_key(generate, T):
    a, b = generate(jax.random.key(5), 16, T), generate(jax.random.key(5), 16, T)
    other = generate(jax.random.key(6), 16, T)
    for leaf_a, leaf_b in zip(a, b):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))
    assert not np.array_equal(np.asarray(a.x_BTE), np.asarray(other.x_BTE))


def test_copy_baseline_is_the_loss_of_the_blind_guess():
    delay = 100
    batch = tasks.copy_memory(jax.random.key(2), 8, delay)
    blind_T9 = np.full((delay + 20, 9), -1e9, np.float32)
    blind_T9[: delay + 10, 0] = 0.0  # certain blank while nothing is asked
    blind_T9[delay + 10 :, 1:] = 0.0  # then uniform over the 8 symbols
    loss, recalled = tasks.copy_loss(jnp.broadcast_to(blind_T9, (8, *blind_T9.shape)), batch)
    np.testing.assert_allclose(float(loss), 10 * math.log(8) / (delay + 20), rtol=1e-5)
    np.testing.assert_allclose(float(loss), tasks.copy_baseline(delay), rtol=1e-5)
    perfect = jax.nn.one_hot(batch.y, 9) * 50.0
    loss, recalled = tasks.copy_loss(perfect, batch)
    assert float(loss) < 1e-6 and float(recalled) == 8.0


def test_adding_loss_reads_the_last_step_and_counts_close_answers():
    batch = tasks.TaskBatch(jnp.zeros((3, 4, 2)), jnp.array([0.5, 1.0, 1.5]), jnp.ones(3))
    outputs = np.zeros((3, 4, 1), np.float32)
    outputs[:, -1, 0] = [0.5, 1.03, 1.0]
    outputs[:, 0, 0] = 100.0  # earlier steps are ignored
    loss, correct = tasks.adding_loss(jnp.asarray(outputs), batch)
    np.testing.assert_allclose(float(loss), (0.03**2 + 0.5**2) / 3, rtol=1e-5)
    assert int(correct) == 2


def test_bad_lengths_and_names_fail_clearly():
    with pytest.raises(ValueError, match="T >= 2"):
        tasks.adding_problem(jax.random.key(0), 2, 1)
    with pytest.raises(ValueError, match="delay T >= 1"):
        tasks.copy_memory(jax.random.key(0), 2, 0)
    with pytest.raises(ValueError, match="unknown task 'add'; choose one of adding, copy"):
        tasks.get_task("add")


def test_task_model_reads_out_every_step_from_the_cell_output():
    task, cell = tasks.get_task("copy"), lj.PROJECTED_LSTM  # its output (the projection) is half its cell width
    params = jax.eval_shape(lambda key: tasks.init_task_model(key, cell, task, 16), jax.random.key(0))
    assert params["out"]["w"].shape == (8, 9) and params["rnn"][0]["w_x"].shape == (10, 64)
    outputs = jax.eval_shape(lambda p, x: tasks.task_outputs(cell, p, x), params, jnp.zeros((3, 25, 10)))
    assert outputs.shape == (3, 25, 9)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_min_T_is_the_shortest_length_the_generator_takes(name):
    task = tasks.get_task(name)
    assert task.generate(jax.random.key(0), 2, task.min_T).x_BTE.shape[0] == 2
    with pytest.raises(ValueError, match="T >="):
        task.generate(jax.random.key(0), 2, task.min_T - 1)
