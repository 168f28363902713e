"""Tests for lstm_jax.train: the loss, the jitted train step, EMA, evaluation and hashing.

Most train-step properties are checked with a tiny least-squares ``loss_fn`` whose
batch can make the loss NaN or only the gradient non-finite, so that the step's
bookkeeping is visible without compiling a recurrent model. The classifier itself
is trained for a few steps on one fixed batch. The train step donates its input
state, so every state that is used again is copied first.
"""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lstm_jax import regularisers
from lstm_jax.data import Batch
from lstm_jax.model import ModelConfig, classifier_logits, init_classifier, member_config
from lstm_jax.optim import OptimConfig, make_optimizer
from lstm_jax.train import (
    STEP_STREAM,
    all_finite,
    classifier_loss,
    evaluate,
    init_train_state,
    make_eval_step,
    make_train_step,
    params_sha256,
    virtual_adversarial_loss,
    weighted_cross_entropy,
)


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def trees_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- the loss


def test_weighted_cross_entropy_matches_numpy_and_ignores_zero_weight_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    labels = np.array([0, 3, 1, 2, 2, 0], np.int32)
    weights = np.array([1, 1, 0, 1, 0, 1], np.float32)
    logits[2] = np.nan  # a padding row's garbage must not leak
    logits[4] = 1e30
    rows = weights > 0
    expected = -log_softmax(logits[rows])[np.arange(rows.sum()), labels[rows]].mean()
    np.testing.assert_allclose(float(weighted_cross_entropy(logits, labels, weights)), expected, rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_numpy_smoothed_targets(smoothing):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 3)).astype(np.float32) * 2
    labels = np.array([0, 2, 1, 1, 0], np.int32)
    weights = np.array([1, 1, 1, 0, 1], np.float32)
    targets = np.full((5, 3), smoothing / 3) + (1 - smoothing) * np.eye(3)[labels]
    rows = weights > 0
    expected = -(targets[rows] * log_softmax(logits[rows])).sum(-1).mean()
    got = weighted_cross_entropy(logits, labels, weights, label_smoothing=smoothing)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_weighted_cross_entropy_of_an_all_padding_batch_is_zero_with_zero_gradient():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    labels, weights = jnp.array([0, 1, 1]), jnp.zeros(3)
    value, grad = jax.jit(jax.value_and_grad(weighted_cross_entropy))(logits, labels, weights)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


# --------------------------------------------------------------------------- the train step, on a tiny loss


def tiny_loss(params, batch, key):
    """Least squares scaled by ``batch["scale"]`` (NaN makes the loss NaN); at ``w[0, 0] == kink`` only the
    gradient is non-finite (0 * d sqrt(|x|)/dx at 0). The aux output is a draw from the step's key."""
    mse = jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
    loss = batch["scale"] * mse + 0.0 * jnp.sqrt(jnp.abs(params["w"][0, 0] - batch["kink"]))
    return loss, jax.random.uniform(key)


def tiny_batch(seed=0, scale=1.0, kink=100.0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.normal(size=(8, 2)).astype(np.float32),
            "scale": np.float32(scale), "kink": np.float32(kink)}  # fmt: skip


TINY_PARAMS = {"w": jnp.asarray(np.random.default_rng(9).normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
TINY_OPTIMIZER = make_optimizer(OptimConfig(learning_rate=0.05, warmup_steps=0, schedule="constant"), total_steps=100)
TINY_STEP = make_train_step(tiny_loss, TINY_OPTIMIZER)


def tiny_state(seed=0, **kwargs):
    return init_train_state(copy(TINY_PARAMS), TINY_OPTIMIZER, seed, **kwargs)


def test_step_metrics_and_bookkeeping():
    state = tiny_state(seed=3)
    batch = tiny_batch()
    expected_loss = np.mean((batch["x"] @ np.asarray(TINY_PARAMS["w"]) - batch["y"]) ** 2)
    rng_before = np.asarray(state.rng)
    grads = jax.grad(lambda p: tiny_loss(p, batch, jax.random.key(0))[0])(TINY_PARAMS)
    state, metrics = TINY_STEP(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))), rtol=1e-5
    )
    assert bool(metrics["finite"]) and int(state.step) == 1 and int(state.nonfinite_steps) == 0
    np.testing.assert_array_equal(state.rng, rng_before)  # the base key is kept; steps fold in their index
    assert not trees_equal(state.params, TINY_PARAMS)


def test_step_keys_are_fold_in_of_seed_stream_and_step():
    """A resumed run draws what an uninterrupted one does: step t's key is fold_in(fold_in(key(seed), stream), t)."""
    for stream in (STEP_STREAM, 12345):
        state = tiny_state(seed=7, stream=stream)
        draws = []
        for _ in range(3):
            state, metrics = TINY_STEP(state, tiny_batch())
            draws.append(float(metrics["aux"]))
        stream_key = jax.random.fold_in(jax.random.key(7), stream)
        assert draws == [float(jax.random.uniform(jax.random.fold_in(stream_key, t))) for t in range(3)]


def test_no_step_key_is_an_initialisers_key():
    """``init_classifier`` splits key(seed) (and splits those keys again); no step of the first thousand may get one of them."""
    seed = 3

    def bits(key):
        return tuple(np.asarray(jax.random.key_data(key)).tolist())

    init_keys = list(jax.random.split(jax.random.key(seed), 8))
    init_bits = {bits(k) for k in init_keys + [k for parent in init_keys for k in jax.random.split(parent, 8)]}
    step_base = jax.random.wrap_key_data(tiny_state(seed=seed).rng)
    step_bits = {bits(jax.random.fold_in(step_base, t)) for t in range(1000)}
    step_bits |= {bits(k) for t in range(8) for k in jax.random.split(jax.random.fold_in(step_base, t), 8)}
    assert len(init_bits) == 72 and len(step_bits) == 1064
    assert not init_bits & step_bits


def bad_batch_for(bad, state):
    if bad == "nan_loss":
        return tiny_batch(seed=1, scale=np.nan)
    if bad == "overflowing_gradient":  # finite loss and gradient, ~1e20: their squares overflow float32
        return tiny_batch(seed=1, scale=1e20)
    return tiny_batch(seed=1, kink=float(state.params["w"][0, 0]))


@pytest.mark.parametrize("bad", ["nan_loss", "nonfinite_gradient_only", "overflowing_gradient"])
def test_nonfinite_step_is_skipped_and_counted(bad):
    state = tiny_state()
    state, _ = TINY_STEP(state, tiny_batch(seed=0))
    before = copy(state)
    state, metrics = TINY_STEP(state, bad_batch_for(bad, state))
    assert not bool(metrics["finite"])
    assert np.isfinite(float(metrics["loss"])) == (bad != "nan_loss")
    assert trees_equal(state.params, before.params)
    assert trees_equal(state.opt_state, before.opt_state)
    assert int(state.step) == 2 and int(state.nonfinite_steps) == 1
    # the skipped batch leaves no trace: the next good step is the one a run without it would take
    state, metrics = TINY_STEP(state, tiny_batch(seed=2))
    assert bool(metrics["finite"]) and int(state.nonfinite_steps) == 1
    clean = tiny_state()
    for seed in (0, 2):
        clean, _ = TINY_STEP(clean, tiny_batch(seed=seed))
    assert trees_equal(state.params, clean.params)
    assert trees_equal(state.opt_state, clean.opt_state)


def test_an_overflowing_gradient_without_clipping_does_not_freeze_the_weights():
    """Unskipped, a gradient of ~1e20 makes Adam's second moment inf, and every later update of those weights is
    m / sqrt(inf) = 0: the run goes on with frozen weights and nothing counted."""
    unclipped = make_optimizer(OptimConfig(learning_rate=0.05, warmup_steps=0, schedule="constant", clip_norm=0.0), 100)
    step = make_train_step(tiny_loss, unclipped)
    state, metrics = step(init_train_state(copy(TINY_PARAMS), unclipped, 0), tiny_batch(seed=1, scale=1e20))
    assert not bool(metrics["finite"]) and int(state.nonfinite_steps) == 1
    assert all_finite(state.opt_state)
    before = copy(state.params)
    state, metrics = step(state, tiny_batch(seed=2))
    assert bool(metrics["finite"]) and np.abs(np.asarray(state.params["w"]) - np.asarray(before["w"])).min() > 1e-3


@pytest.mark.parametrize("bad", ["nan_loss", "nonfinite_gradient_only", "overflowing_gradient"])
def test_nonfinite_step_leaves_the_average_and_its_warm_up_untouched(bad):
    step = make_train_step(tiny_loss, TINY_OPTIMIZER, ema_decay=0.9)
    state, _ = step(tiny_state(ema=True), tiny_batch(seed=0))
    before = copy(state.ema_params)
    assert not trees_equal(before, state.params)  # so pulling the average towards the params would show
    state, metrics = step(state, bad_batch_for(bad, state))
    assert not bool(metrics["finite"]) and int(state.nonfinite_steps) == 1
    assert trees_equal(state.ema_params, before)
    # the next good step averages at the rate of a run without the skipped batch: its warm-up counts applied updates
    state, _ = step(state, tiny_batch(seed=2))
    clean = tiny_state(ema=True)
    for seed in (0, 2):
        clean, _ = step(clean, tiny_batch(seed=seed))
    assert trees_equal(state.ema_params, clean.ema_params)


def test_ema_matches_hand_computed_average():
    decay = 0.9
    step = make_train_step(tiny_loss, TINY_OPTIMIZER, ema_decay=decay)
    state = tiny_state(ema=True)
    assert trees_equal(state.ema_params, state.params) and state.eval_params is state.ema_params
    ema = jax.tree.map(lambda a: np.asarray(a, np.float64), TINY_PARAMS)
    for t in (1, 2, 3):  # t = number of updates so far, the step counter after the update
        state, _ = step(state, tiny_batch(seed=t))
        rate = min(decay, (1 + t) / (10 + t))
        ema = jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * np.asarray(p, np.float64), ema, state.params)
    for actual, expected in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    assert not trees_equal(state.ema_params, state.params)
    assert state.eval_params is state.ema_params


def least_squares_gradient(params, batch):
    """The gradient of ``tiny_loss`` (without its kink term), in float64."""
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    residual = 2.0 * float(batch["scale"]) * (x @ w + b - y) / y.size
    return {"w": x.T @ residual, "b": residual.sum(0)}


def test_sharpness_aware_step_takes_the_gradient_at_the_weights_moved_up_the_gradient():
    rho = 0.3
    sgd = optax.sgd(1.0)  # the update is minus the gradient the optimiser gets
    step = make_train_step(tiny_loss, sgd, sam_rho=rho)
    state = init_train_state(copy(TINY_PARAMS), sgd, 0)
    batch = tiny_batch(seed=4)
    state, metrics = step(state, batch)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), TINY_PARAMS)
    grads = least_squares_gradient(params, batch)
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    nearby = {name: params[name] + rho * grads[name] / norm for name in params}
    nearby_grads = least_squares_gradient(nearby, batch)
    for name in params:
        np.testing.assert_allclose(state.params[name], params[name] - nearby_grads[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(nearby_grads[name], grads[name], rtol=1e-3)  # the test can tell the two apart
    expected_loss = np.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)  # at the weights, not nearby


def test_sharpness_aware_ensemble_members_each_move_rho_along_their_own_gradient():
    """Two members side by side, a loss that is the sum of theirs: each takes the step it would take alone."""
    rho, sgd = 0.3, optax.sgd(1.0)
    members = [copy(TINY_PARAMS), jax.tree.map(lambda a: a * 3.0 + 0.5, copy(TINY_PARAMS))]  # gradients of other norms
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    batch = tiny_batch(seed=6)

    def ensemble_loss(params, batch, key):
        losses, aux = jax.vmap(lambda p: tiny_loss(p, batch, key))(params)
        return jnp.sum(losses), aux

    together, _ = make_train_step(ensemble_loss, sgd, sam_rho=rho, ensemble=2)(init_train_state(stacked, sgd, 0), batch)
    for k, params in enumerate(members):
        alone, _ = make_train_step(tiny_loss, sgd, sam_rho=rho)(init_train_state(params, sgd, 0), batch)
        for name in params:
            np.testing.assert_allclose(together.params[name][k], alone.params[name], rtol=1e-5, atol=1e-6)


def test_sharpness_aware_rho_zero_is_the_plain_step_bit_for_bit_and_a_negative_rho_is_refused():
    plain, _ = TINY_STEP(tiny_state(), tiny_batch(seed=5))
    off, _ = make_train_step(tiny_loss, TINY_OPTIMIZER, sam_rho=0.0)(tiny_state(), tiny_batch(seed=5))
    assert trees_equal(plain.params, off.params) and trees_equal(plain.opt_state, off.opt_state)
    with pytest.raises(ValueError, match="--sam-rho must be >= 0"):
        OptimConfig(sam_rho=-0.1)


def test_without_ema_eval_params_are_the_params():
    state, _ = TINY_STEP(tiny_state(), tiny_batch())
    assert state.ema_params is None and state.eval_params is state.params


def test_an_average_and_its_decay_come_together():
    """A state with an average stepped without ``ema_decay`` would keep it at the initial weights, and evaluation
    (``eval_params``, the average when there is one) would silently read those: refused, as the converse is."""
    with pytest.raises(ValueError, match="ema_decay > 0 needs a state with an average"):
        make_train_step(tiny_loss, TINY_OPTIMIZER, ema_decay=0.9)(tiny_state(), tiny_batch())
    with pytest.raises(ValueError, match="a state with an average needs ema_decay > 0"):
        TINY_STEP(tiny_state(ema=True), tiny_batch())


# --------------------------------------------------------------------------- the classifier

CONFIG = ModelConfig(cell="lstm", embed_dim=8, hidden_size=8, bidirectional=False, pooling="mean", head_hidden=0,
                     embed_dropout=0.1, input_dropout=0.1, layer_dropout=0.0, output_dropout=0.1)  # fmt: skip
VOCAB, CLASSES = 30, 3


def classifier_batch(lengths, num_steps, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    tokens = rng.integers(2, VOCAB, size=(len(lengths), num_steps)).astype(np.int32)
    tokens[np.arange(num_steps)[None, :] >= lengths[:, None]] = 0
    labels = rng.integers(0, CLASSES, size=len(lengths)).astype(np.int32)
    return Batch(tokens, lengths, labels, (lengths > 0).astype(np.float32))


@pytest.fixture(scope="module")
def classifier():
    shapes = jax.eval_shape(lambda k: init_classifier(k, CONFIG, VOCAB, CLASSES), jax.random.key(0))
    rng = np.random.default_rng(0)  # random parameters without compiling the initialisers
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    optimizer = make_optimizer(OptimConfig(learning_rate=0.02, warmup_steps=0, schedule="constant"), total_steps=100)
    step = make_train_step(lambda p, batch, key: classifier_loss(p, CONFIG, batch, key), optimizer)
    batch = classifier_batch([6, 5, 4, 6, 2, 3, 1, 0], 6)
    return params, optimizer, step, batch


def train_on_one_batch(step, state, batch, num_steps=30):
    """``num_steps`` steps on ``batch``, each checked finite; the final state and the losses."""
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    return state, losses


def test_classifier_loss_decreases_on_a_fixed_batch(classifier):
    params, optimizer, step, batch = classifier
    state, losses = train_on_one_batch(step, init_train_state(copy(params), optimizer, seed=0), batch)
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses  # with dropout on, so a mean over the last steps
    assert int(state.step) == 30 and int(state.nonfinite_steps) == 0


def test_same_state_and_batch_give_identical_bits_and_the_seed_matters(classifier):
    params, optimizer, step, batch = classifier
    state = init_train_state(copy(params), optimizer, seed=0)
    results = [step(copy(state), batch) for _ in range(2)]
    (a, metrics_a), (b, metrics_b) = results
    assert params_sha256(a.params) == params_sha256(b.params)
    assert trees_equal(a.opt_state, b.opt_state) and float(metrics_a["loss"]) == float(metrics_b["loss"])
    other_seed, _ = step(init_train_state(copy(params), optimizer, seed=1), batch)  # other dropout masks
    assert params_sha256(other_seed.params) != params_sha256(a.params)


def test_evaluate_counts_against_numpy(classifier):
    params, _, _, _ = classifier
    batches = [classifier_batch([6, 5, 1, 3, 0, 0], 6, seed=1), classifier_batch([9, 2, 7, 8, 4, 0], 9, seed=2)]
    logits_fn = jax.jit(classifier_logits, static_argnums=1)
    correct = count = loss_sum = 0.0
    for batch in batches:
        logits = np.asarray(logits_fn(params, CONFIG, batch.tokens_BT, batch.lengths_B))
        rows = batch.weights_B > 0
        correct += np.sum(logits[rows].argmax(-1) == batch.labels_B[rows])
        loss_sum += -log_softmax(logits[rows])[np.arange(rows.sum()), batch.labels_B[rows]].sum()
        count += rows.sum()
    result = evaluate(make_eval_step(CONFIG), params, batches)
    assert result["count"] == count == 9
    assert result["accuracy"] == pytest.approx(correct / count, abs=1e-9)
    assert result["loss"] == pytest.approx(loss_sum / count, rel=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("architecture", [{}, {"bidirectional": True, "pooling": "max"}])
def test_adversarial_loss_is_the_mean_of_clean_and_finite_difference_perturbed_losses(architecture, dropout):
    """The perturbation direction comes from central differences of the loss in the embedded inputs; with dropout,
    the clean and perturbed passes share the step's masks (the finite differences are taken under the step's key)."""
    config = dataclasses.replace(CONFIG, embed_dropout=dropout, input_dropout=dropout, output_dropout=dropout, adversarial_epsilon=0.5, **architecture)
    params = init_classifier(jax.random.key(3), config, VOCAB, CLASSES)
    batch = classifier_batch([4, 2, 3, 0], 4, seed=3)
    key = jax.random.key(0)

    @jax.jit
    def loss_at(delta_BTE):
        logits = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B, key=key, train=True, embed_delta_BTE=delta_BTE)
        return weighted_cross_entropy(logits, batch.labels_B, batch.weights_B)

    shape, h = (4, 4, config.embed_dim), 1e-3
    steps = np.eye(np.prod(shape), dtype=np.float32).reshape(-1, *shape) * h
    grad = np.array([float(loss_at(step) - loss_at(-step)) / (2 * h) for step in steps]).reshape(shape)
    norms = np.sqrt((grad**2).sum((1, 2), keepdims=True))
    assert norms[3, 0, 0] == 0.0 and np.all(grad[1, 2:] == 0) and np.all(grad[2, 3:] == 0)  # padding has no gradient
    assert np.all(norms[:3] > 0)
    delta = 0.5 * grad / np.where(norms > 0, norms, 1.0)
    clean, perturbed = float(loss_at(np.zeros(shape, np.float32))), float(loss_at(delta.astype(np.float32)))
    assert perturbed > clean + 0.01  # uphill
    loss, correct = classifier_loss(params, config, batch, key)
    np.testing.assert_allclose(float(loss), (clean + perturbed) / 2, rtol=1e-4)


@pytest.mark.parametrize("lengths", [None, [3, 2, 0, 1]])
def test_virtual_adversarial_loss_matches_numpy_power_iteration_on_a_linear_model(lengths):
    """For logits linear in the embedded inputs, the direction is A^T (q(probe) - p) per row, in float64; with
    lengths, the random start of the power iteration lies on the real steps only."""
    rng = np.random.default_rng(5)
    B, T, E, C, epsilon = 4, 3, 5, 3, 0.8
    A_TEC = rng.normal(size=(T, E, C))
    base_BC = rng.normal(size=(B, C)) * 2
    weights_B = np.array([1.0, 1.0, 0.0, 1.0])  # row 2 is batch padding
    key = jax.random.key(9)
    logits_at = lambda delta_BTE: jnp.asarray(base_BC, jnp.float32) + jnp.einsum("bte,tec->bc", delta_BTE, jnp.asarray(A_TEC, jnp.float32))
    lengths_B = None if lengths is None else jnp.asarray(lengths)
    loss = virtual_adversarial_loss(logits_at, jnp.asarray(base_BC, jnp.float32), jnp.asarray(weights_B, jnp.float32), key, (B, T, E), epsilon,
                                    lengths_B=lengths_B)  # fmt: skip

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def per_text(v_BTE, norm):
        return norm * v_BTE / np.sqrt((v_BTE**2).sum((1, 2), keepdims=True))

    def kl_B(delta_BTE):
        p, q = softmax(base_BC), softmax(base_BC + np.einsum("bte,tec->bc", delta_BTE, A_TEC))
        return (p * (np.log(p) - np.log(q))).sum(-1)

    start = np.asarray(jax.random.normal(key, (B, T, E)), np.float64)
    if lengths is not None:
        start[np.arange(T)[None, :] >= np.array(lengths)[:, None]] = 0.0
    with np.errstate(invalid="ignore"):  # row 2 has no real step: its probe is 0/0, and zero in the loss
        probe = np.nan_to_num(per_text(start, epsilon / 10))
    direction = np.einsum("tec,bc->bte", A_TEC, softmax(base_BC + np.einsum("bte,tec->bc", probe, A_TEC)) - softmax(base_BC))
    with np.errstate(invalid="ignore"):
        expected = (kl_B(np.nan_to_num(per_text(direction, epsilon))) * weights_B).sum() / weights_B.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=2e-3)
    # The direction found changes the prediction more than random directions of the same norm.
    random_kl = [(kl_B(per_text(rng.normal(size=(B, T, E)), epsilon)) * weights_B).sum() / weights_B.sum() for _ in range(20)]
    assert expected > max(random_kl)


def test_virtual_adversarial_direction_is_a_constant_of_the_parameter_gradient():
    """For logits ``base + delta . A``, the gradient in ``A`` with the direction ``r`` held fixed is
    ``sum_b w_b r_b (q_b - p_b) / sum_b w_b`` (float64 NumPy). The power iteration run with the
    parameters held constant (``probe_logits_at``, what the classifier's loss passes) gives it too."""
    rng = np.random.default_rng(6)
    B, T, E, C, epsilon = 4, 3, 5, 3, 0.8
    A_TEC = jnp.asarray(rng.normal(size=(T, E, C)), jnp.float32)
    base_BC = jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32)
    weights_B = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    key = jax.random.key(2)
    logits_with = lambda A: lambda delta_BTE: base_BC + jnp.einsum("bte,tec->bc", delta_BTE, A)

    def vat(A, freeze):
        probe = logits_with(jax.lax.stop_gradient(A)) if freeze else None
        return virtual_adversarial_loss(logits_with(A), base_BC, weights_B, key, (B, T, E), epsilon, probe)

    grads = {freeze: np.asarray(jax.grad(vat)(A_TEC, freeze), np.float64) for freeze in (True, False)}
    # the direction, rebuilt in float64 as in the power-iteration test above
    A, base, w = np.asarray(A_TEC, np.float64), np.asarray(base_BC, np.float64), np.asarray(weights_B, np.float64)
    softmax = lambda z: np.exp(log_softmax(z))
    per_text = lambda v, norm: norm * v / np.sqrt((v**2).sum((1, 2), keepdims=True))
    probe = per_text(np.asarray(jax.random.normal(key, (B, T, E)), np.float64), epsilon / 10)
    p = softmax(base)
    r = per_text(np.einsum("tec,bc->bte", A, softmax(base + np.einsum("bte,tec->bc", probe, A)) - p), epsilon)
    q = softmax(base + np.einsum("bte,tec->bc", r, A))
    expected = np.einsum("bte,bc->tec", r, (q - p) * w[:, None]) / w.sum()
    for grad in grads.values():
        np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(grads[True], grads[False], rtol=1e-5, atol=1e-8)


def test_virtual_adversarial_training_adds_a_label_free_term():
    config = dataclasses.replace(CONFIG, vat_epsilon=0.5, input_dropout=0.0, output_dropout=0.0, embed_dropout=0.0)
    params = init_classifier(jax.random.key(3), config, VOCAB, CLASSES)
    batch = classifier_batch([4, 2, 3, 0], 4, seed=3)
    plain, _ = classifier_loss(params, dataclasses.replace(config, vat_epsilon=0.0), batch, jax.random.key(0))
    with_vat, _ = classifier_loss(params, config, batch, jax.random.key(0))
    flipped, _ = classifier_loss(params, config, batch._replace(labels_B=(batch.labels_B + 1) % CLASSES), jax.random.key(0))
    flipped_plain, _ = classifier_loss(params, dataclasses.replace(config, vat_epsilon=0.0), batch._replace(labels_B=(batch.labels_B + 1) % CLASSES), jax.random.key(0))
    assert float(with_vat) > float(plain)
    np.testing.assert_allclose(float(with_vat) - float(plain), float(flipped) - float(flipped_plain), rtol=1e-4)  # no labels in it


def test_adversarial_training_steps_are_finite_and_reduce_the_loss(classifier):
    params, optimizer, _, batch = classifier
    config = dataclasses.replace(CONFIG, adversarial_epsilon=0.2)
    step = make_train_step(lambda p, b, key: classifier_loss(p, config, b, key), optimizer)
    _, losses = train_on_one_batch(step, init_train_state(copy(params), optimizer, seed=0), batch)
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


def test_mixup_targets_match_numpy_and_drop_rows_mixed_with_padding():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 3)).astype(np.float32) * 2
    labels = np.array([0, 2, 1, 1, 0], np.int32)
    weights = np.array([1, 1, 1, 0, 1], np.float32)
    partner, share = np.array([1, 0, 3, 4, 2]), np.array([0.6, 1.0, 0.8, 0.5, 0.75], np.float32)
    one_hot = np.eye(3)[labels]
    targets = share[:, None] * one_hot + (1 - share[:, None]) * one_hot[partner]
    rows = (weights > 0) & (weights[partner] > 0)  # row 2's partner is padding
    expected = -(targets[rows] * log_softmax(logits[rows])).sum(-1).mean()
    got = weighted_cross_entropy(logits, labels, weights, mixup=(jnp.asarray(partner), jnp.asarray(share)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_mixup_mixes_the_pooled_vectors_before_the_head():
    """With a linear head and no dropout, the mixed logits are the same mix of the rows' own logits."""
    config = dataclasses.replace(CONFIG, embed_dropout=0.0, input_dropout=0.0, output_dropout=0.0, mixup_alpha=1.0)
    params = init_classifier(jax.random.key(4), config, VOCAB, CLASSES)
    batch = classifier_batch([4, 2, 3, 1], 4, seed=4)
    partner, share = regularisers.mixup_partners(jax.random.key(1), 4, 1.0)
    clean = np.asarray(classifier_logits(params, config, batch.tokens_BT, batch.lengths_B), np.float64)
    mixed = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B, key=jax.random.key(2), train=True, mixup=(partner, share))
    share = np.asarray(share, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(mixed), share * clean + (1 - share) * clean[np.asarray(partner)], rtol=1e-5, atol=1e-6)


def test_mixup_with_adversarial_training_steps_are_finite_and_reduce_the_loss(classifier):
    params, optimizer, _, batch = classifier
    config = dataclasses.replace(CONFIG, mixup_alpha=0.4, adversarial_epsilon=0.2)
    step = make_train_step(lambda p, b, key: classifier_loss(p, config, b, key), optimizer)
    _, losses = train_on_one_batch(step, init_train_state(copy(params), optimizer, seed=0), batch, num_steps=40)
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses  # mixed targets keep a floor above 0


def test_ensemble_members_step_as_if_each_trained_alone():
    """One step of a 2-member ensemble against each member's own gradient, clipped and stepped alone."""
    config = dataclasses.replace(CONFIG, ensemble=2)
    params = init_classifier(jax.random.key(1), config, VOCAB, CLASSES)
    optim_config = OptimConfig(learning_rate=0.05, warmup_steps=0, schedule="constant", clip_norm=0.01)  # clips every member
    step = make_train_step(lambda p, b, key: classifier_loss(p, config, b, key), make_optimizer(optim_config, 10, ensemble=2))
    state = init_train_state(copy(params), make_optimizer(optim_config, 10, ensemble=2), seed=0)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    batch = classifier_batch([6, 5, 4, 6, 2, 3, 1, 0], 6)
    new_state, metrics = step(state, batch)
    alone, member_losses = make_optimizer(optim_config, 10), []
    member_loss_and_grad = jax.jit(jax.value_and_grad(classifier_loss, has_aux=True), static_argnums=1)  # eager takes 10x longer
    for i, member_key in enumerate(jax.random.split(step_key, 2)):
        member_params = jax.tree.map(lambda leaf: leaf[i], params)
        (loss, _), grads = member_loss_and_grad(member_params, member_config(config), batch, member_key)
        assert float(optax.tree.norm(grads)) > 0.01
        updates, _ = alone.update(grads, alone.init(member_params), member_params)
        expected = optax.apply_updates(member_params, updates)
        # atol covers float32 rounding between the vmapped and the lone computation (seen: 1.6e-7 with jax 0.10.2).
        # Adam's first step is g / |g|, blind to a gradient's scale, so this one step cannot tell joint from per-member
        # clipping (measured: 6e-8 apart); it checks each member's own keys, gradient and step, and
        # test_optim.test_ensemble_members_are_clipped_and_stepped_each_on_its_own checks the clipping over two steps
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6), new_state.params, expected)
        member_losses.append(float(loss))
    assert float(metrics["loss"]) == pytest.approx(np.mean(member_losses), rel=1e-6)


def test_evaluate_of_no_batches_is_empty():
    assert evaluate(None, None, []) == {"loss": 0.0, "accuracy": 0.0, "count": 0}


# --------------------------------------------------------------------------- hashing


def test_params_sha256_is_the_hash_of_leaf_bytes_in_sorted_key_order():
    params = {"z": np.arange(3, dtype=np.float32), "a": {"k": np.ones((2, 2), np.float32)}}
    expected = hashlib.sha256(
        np.ones((2, 2), np.float32).tobytes() + np.arange(3, dtype=np.float32).tobytes()
    ).hexdigest()
    assert params_sha256(params) == expected
    assert params_sha256(params) == params_sha256({"a": params["a"], "z": params["z"]})  # insertion order is irrelevant
    assert params_sha256(jax.tree.map(jnp.asarray, params)) == expected  # device arrays hash the same


def test_params_sha256_sees_a_one_ulp_change():
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, np.float32)}
    changed = {"w": params["w"].copy(), "b": params["b"]}
    changed["w"][1, 2] = np.nextafter(changed["w"][1, 2], np.float32(np.inf))
    assert params_sha256(changed) != params_sha256(params)
    swapped = {"w": params["w"][::-1].copy(), "b": params["b"]}
    assert params_sha256(swapped) != params_sha256(params)
