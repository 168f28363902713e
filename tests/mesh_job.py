"""Data-parallel training on forced host devices; run by ``test_parallel.py`` in a subprocess.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts.
Prints one JSON object: per-step losses on each mesh, parameter differences,
the shardings seen inside the compiled step, and accuracies after restoring a
checkpoint onto another mesh.
"""

import contextlib
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import parallel
from lstm_jax.checkpoint import RunCheckpoints
from lstm_jax.data import Batch
from lstm_jax.model import ModelConfig, init_classifier
from lstm_jax.optim import OptimConfig, make_optimizer
from lstm_jax.train import classifier_loss, evaluate, init_train_state, make_eval_step, make_train_step

VOCAB, BATCH, STEPS_T, NUM_STEPS = 64, 16, 12, 20
CONFIG = ModelConfig(embed_dim=16, hidden_size=16, head_hidden=16)  # default dropouts: random masks must agree too
SEEN_SHARDINGS = []


def make_batches(count, seed):
    """Random sequences labelled by whether token 7 occurs: in half the rows (so the class prior alone scores 50 %),
    at about a third of their steps (so that 20 steps can learn it). The last batch has two padding rows."""
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        lengths = rng.integers(1, STEPS_T + 1, BATCH).astype(np.int32)
        tokens = rng.integers(2, VOCAB - 1, (BATCH, STEPS_T)).astype(np.int32)
        tokens[tokens >= 7] += 1  # no 7 yet
        labels = (np.arange(BATCH) % 2).astype(np.int32)
        positions = rng.integers(0, lengths)  # one valid step of each row, and about a third of the others
        tokens[(rng.random(tokens.shape) < 0.35) & (labels == 1)[:, None]] = 7
        tokens[np.arange(BATCH)[labels == 1], positions[labels == 1]] = 7
        tokens[np.arange(STEPS_T)[None, :] >= lengths[:, None]] = 0
        weights = np.ones(BATCH, np.float32)
        if index == count - 1:
            lengths[-2:], tokens[-2:], weights[-2:] = 0, 0, 0.0
        batches.append(Batch(tokens, lengths, labels, weights))
    return batches


def recording_loss(params, batch, key):
    jax.debug.inspect_array_sharding(batch.tokens_BT, callback=lambda s: SEEN_SHARDINGS.append(str(s.spec)))
    return classifier_loss(params, CONFIG, batch, key)


def fresh_state(optimizer):
    params = init_classifier(jax.random.key(0), CONFIG, VOCAB, 2)
    return init_train_state(params, optimizer, seed=0, ema=True)


def train_on(mesh, batches, optimizer, shard_embedding=False):
    state = fresh_state(optimizer)
    shardings = parallel.state_sharding(state, mesh, shard_embedding=shard_embedding)
    state = jax.device_put(state, shardings)
    step = make_train_step(
        recording_loss,
        optimizer,
        ema_decay=0.99,
        state_sharding=shardings,
        batch_sharding=parallel.batch_sharding(mesh),
    )
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.put_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def accuracy_on(mesh, params, batches):
    eval_step = make_eval_step(
        CONFIG, params_sharding=parallel.state_sharding(params, mesh), batch_sharding=parallel.batch_sharding(mesh)
    )
    return evaluate(eval_step, params, [parallel.put_batch(b, mesh) for b in batches])["accuracy"]


def restore_onto(mesh, workdir, optimizer):
    template = fresh_state(optimizer)
    template = jax.device_put(template, parallel.state_sharding(template, mesh))
    checkpoints = RunCheckpoints(workdir)
    restored = checkpoints.restore(template)
    checkpoints.close()
    return restored.state


def save(state, workdir):
    checkpoints = RunCheckpoints(workdir)
    checkpoints.save(int(state.step), state, {"note": "mesh test"})
    checkpoints.wait()
    checkpoints.close()


def embedding_leaves(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [leaf for path, leaf in leaves if "'embed'" in jax.tree_util.keystr(path) and np.ndim(leaf) == 2]


def max_relative_difference(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12)) for x, y in pairs
    )


def shard_map_gradient_differences(mesh) -> dict:
    """The gradient of a stacked, bidirectional LSTM with lengths (and, as a generic cell, a GRU), taken inside
    ``jax.shard_map`` over a batch split along ``data``, against the same gradient on one device; per system."""
    from jax.sharding import PartitionSpec as P

    import lstm_jax as lj
    from lstm_jax import native

    x = jax.random.normal(jax.random.key(1), (8, 5, 6))
    lengths = jnp.array([5, 3, 1, 4, 5, 2, 2, 5])
    differences = {}
    for cell_name, cell in (("lstm", lj.LSTM), ("gru", lj.GRU)):
        params = lj.init_rnn(jax.random.key(0), cell, 6, 10, num_layers=2, bidirectional=True)
        loss = lambda p, x, lengths: jnp.sum(jnp.sin(lj.rnn(cell, p, x, lengths)[0]))
        split = (P(), P("data"), P("data"))
        for name, context in (("kernel", contextlib.nullcontext), ("scan_loops", native.disabled)):
            with context():
                sharded = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=split, out_specs=P()))
                whole = jax.jit(jax.grad(loss))
                differences[f"{cell_name}_{name}"] = max_relative_difference(
                    sharded(params, x, lengths), whole(params, x, lengths)
                )
    return differences


def main():
    assert len(jax.devices()) == 4, "set XLA_FLAGS=--xla_force_host_platform_device_count=4"
    train_batches, eval_batches = make_batches(NUM_STEPS, seed=1), make_batches(4, seed=2)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=2), NUM_STEPS)
    one, four, two_by_two = (
        parallel.make_mesh("", jax.devices()[:1]),
        parallel.make_mesh(""),
        parallel.make_mesh("data=2,model=2"),
    )

    placed = parallel.put_batch(train_batches[0], four)
    state_1, losses_1 = train_on(one, train_batches, optimizer)
    seen_single = list(SEEN_SHARDINGS)
    SEEN_SHARDINGS.clear()
    state_4, losses_4 = train_on(four, train_batches, optimizer)
    seen_four = list(SEEN_SHARDINGS)
    state_22, losses_22 = train_on(two_by_two, train_batches, optimizer, shard_embedding=True)

    report = {
        "losses_1": losses_1, "losses_4": losses_4, "losses_2x2": losses_22,
        "params_difference_4": max_relative_difference(state_4.params, state_1.params),
        "params_difference_2x2": max_relative_difference(state_22.params, state_1.params),
        "batch_spec": str(placed.tokens_BT.sharding.spec),
        "batch_shard_shapes": [list(s.data.shape) for s in placed.tokens_BT.addressable_shards],
        "specs_in_step_1": seen_single, "specs_in_step_4": seen_four,
        "state_param_specs_4": sorted({str(a.sharding.spec) for a in jax.tree.leaves(state_4.params)}),
        "embed_spec_2x2": str(state_22.params["embed"].sharding.spec),
        "embed_moment_specs_2x2": sorted({str(a.sharding.spec) for a in embedding_leaves(state_22.opt_state)}),
        "embed_shard_shapes_2x2": [list(s.data.shape) for s in state_22.params["embed"].addressable_shards],
        "head_spec_2x2": str(state_22.params["head"]["out"]["w"].sharding.spec),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as from_four, tempfile.TemporaryDirectory() as from_one:
        save(state_4, from_four)
        save(state_1, from_one)
        on_one, on_four = restore_onto(one, from_four, optimizer), restore_onto(four, from_one, optimizer)
        report["restored_4_to_1_devices"] = len(on_one.params["embed"].sharding.device_set)
        report["restored_1_to_4_devices"] = len(on_four.params["embed"].sharding.device_set)
        report["accuracy_4"] = accuracy_on(four, state_4.eval_params, eval_batches)
        report["accuracy_4_restored_on_1"] = accuracy_on(one, on_one.eval_params, eval_batches)
        report["accuracy_1"] = accuracy_on(one, state_1.eval_params, eval_batches)
        report["accuracy_1_restored_on_4"] = accuracy_on(four, on_four.eval_params, eval_batches)
        report["restored_difference_4_to_1"] = max_relative_difference(
            (on_one.params, on_one.ema_params, on_one.opt_state), (state_4.params, state_4.ema_params, state_4.opt_state)
        )
        report["restored_difference_1_to_4"] = max_relative_difference(
            (on_four.params, on_four.ema_params, on_four.opt_state), (state_1.params, state_1.ema_params, state_1.opt_state)
        )
    report["shard_map_gradient_differences"] = shard_map_gradient_differences(four)
    try:
        parallel.check_batch_size(6, four)
    except ValueError as error:
        report["indivisible_error"] = str(error)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
