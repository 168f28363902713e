"""Tests for lstm_jax.model: pooling and head against NumPy references, padding, modes.

The references take the recurrent outputs ``y`` of ``rnn`` (tested on its own in
test_recurrence.py) and redo everything after it in NumPy: pooling over the valid
steps only, then the MLP head. "last" is read from ``y`` too (forward output at the
true end, backward output at step 0), and checked against the final carries where
they must agree (no residual connection into the top layer). Parameters are random, not the init: the zero attention vector
``v`` of the init would make attention pooling equal mean pooling and hide a mistake.
Each distinct config compiles once, so the tests share a handful of configs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax.cells import LSTM
from lstm_jax.data import Batch
from lstm_jax.gates import explain_classifier
from lstm_jax.model import (
    POOLINGS,
    ModelConfig,
    classifier_logits,
    init_classifier,
    language_model_loss,
    language_model_sums,
    member_config,
    pool,
    rnn_width,
)
from lstm_jax.recurrence import rnn
from lstm_jax.train import (
    classifier_loss,
    language_model_pretraining_loss,
    make_language_model_eval_step,
    weighted_cross_entropy,
)
from lstm_jax.vocab import PAD_ID

V, E, H, HEAD, C = 23, 4, 5, 6, 3
NO_DROPOUT = {
    "embed_dropout": 0.0,
    "word_dropout": 0.0,
    "input_dropout": 0.0,
    "layer_dropout": 0.0,
    "output_dropout": 0.0,
}
LENGTHS = np.array([7, 3, 1, 0, 4], np.int32)  # row 3 is batch padding (length 0)
T = 7
LABELS = np.array([0, 1, 2, 1, 0], np.int32)


def small_config(**overrides) -> ModelConfig:
    fields = {"embed_dim": E, "hidden_size": H, "head_hidden": HEAD, "bidirectional": True, "pooling": "attention"}
    fields.update(NO_DROPOUT)
    return ModelConfig(**{**fields, **overrides})


def random_params(config: ModelConfig, seed=0, num_classes=C):
    """Parameters in the structure of ``init_classifier``, every leaf random (no initialiser is compiled)."""
    shapes = jax.eval_shape(lambda k: init_classifier(k, config, V, num_classes), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


def padded_tokens(lengths, num_steps, seed=1):
    """Token ids in [2, V) on valid steps and PAD (0) after them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, V, size=(len(lengths), num_steps)).astype(np.int32)
    tokens[np.arange(num_steps)[None, :] >= np.asarray(lengths)[:, None]] = 0
    return tokens


@functools.partial(jax.jit, static_argnames=("config", "train"))
def logits_fn(params, config, tokens, lengths, key=None, train=False):
    return classifier_logits(params, config, tokens, lengths, key=key, train=train)


@jax.jit
def lstm_outputs(params, tokens, lengths):
    """The recurrent outputs and final carries the model pools (an LSTM stack, evaluation mode)."""
    return rnn(LSTM, params["rnn"], params["embed"][tokens], lengths)


def ref_pool(y_BTH, lengths, pooling, attention=None, bidirectional=True):
    """Pooling in NumPy float64, a loop over the valid steps of each row; zeros for empty rows."""
    y_BTH = np.asarray(y_BTH, np.float64)
    width = y_BTH.shape[-1]
    if pooling == "mean_max":
        return np.concatenate([ref_pool(y_BTH, lengths, "mean"), ref_pool(y_BTH, lengths, "max")], axis=-1)
    out = np.zeros((len(lengths), width))
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        valid = y_BTH[b, :n]
        if pooling == "mean":
            out[b] = valid.mean(0)
        elif pooling == "max":
            out[b] = valid.max(0)
        elif pooling == "last":
            half = width // 2
            out[b] = np.concatenate([valid[n - 1, :half], valid[0, half:]]) if bidirectional else valid[n - 1]
        else:
            w, bias, v = (np.asarray(attention[k], np.float64) for k in ("w", "b", "v"))
            scores = np.tanh(valid @ w + bias) @ v
            weights = np.exp(scores - scores.max())
            out[b] = (weights / weights.sum()) @ valid
    return out


def ref_head(features, head):
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), head)
    if "hidden" in head:
        features = np.maximum(features @ head["hidden"]["w"] + head["hidden"]["b"], 0.0)
    return features @ head["out"]["w"] + head["out"]["b"]


def ref_loss(logits, labels, weights):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    rows = weights > 0
    return -log_probs[rows, labels[rows]].mean()


# --------------------------------------------------------------------------- pooling


@pytest.fixture(scope="module")
def bidirectional_outputs():
    """Random attention-model params, and ``y`` / final carries of its bidirectional LSTM on a padded batch."""
    config = small_config()
    params = random_params(config)
    tokens = padded_tokens(LENGTHS, T)
    y, carries = lstm_outputs(params, tokens, LENGTHS)
    return config, params, tokens, y, carries


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_matches_numpy_over_valid_steps_only(pooling, bidirectional_outputs):
    _, params, _, y, carries = bidirectional_outputs
    assert np.all(np.asarray(y)[np.arange(T)[None, :] >= LENGTHS[:, None]] == 0.0)  # what a leaky pooling would read
    pooled = pool(y, jnp.asarray(LENGTHS), pooling, params.get("attention"), bidirectional=True)
    expected = ref_pool(y, LENGTHS, pooling, params["attention"])
    assert pooled.shape == (len(LENGTHS), (4 if pooling == "mean_max" else 2) * H)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[LENGTHS == 0], 0.0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_gradient_is_finite_and_zero_on_padding(pooling, bidirectional_outputs):
    """d(pooled)/dy vanishes on length-0 rows (and on padded steps, but for mean), and is never NaN."""
    _, params, _, y, carries = bidirectional_outputs
    width = (4 if pooling == "mean_max" else 2) * H
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((len(LENGTHS), width)), jnp.float32)

    def pooled_dot(y, attention):
        return jnp.sum(pool(y, jnp.asarray(LENGTHS), pooling, attention, bidirectional=True) * cotangent)

    grad_y, grad_attention = jax.grad(pooled_dot, argnums=(0, 1))(y, params["attention"])
    assert np.all(np.isfinite(grad_y)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad_attention))
    padded = np.arange(T)[None, :] >= LENGTHS[:, None]
    np.testing.assert_array_equal(np.asarray(grad_y)[LENGTHS == 0], 0.0)
    if pooling not in ("mean", "mean_max"):  # mean sums every step and relies on rnn's zeros at padded steps (checked above)
        np.testing.assert_array_equal(np.asarray(grad_y)[padded], 0.0)
    assert np.any(np.asarray(grad_y)[~padded] != 0.0)


def test_last_pooling_of_a_unidirectional_stack_uses_the_top_layer_at_the_true_end():
    config = small_config(pooling="last", bidirectional=False, num_layers=2, head_hidden=0)
    params = random_params(config, seed=5)
    tokens = padded_tokens(LENGTHS, T)
    y, carries = lstm_outputs(params, tokens, LENGTHS)
    np.testing.assert_allclose(
        pool(y, jnp.asarray(LENGTHS), "last", bidirectional=False), ref_pool(y, LENGTHS, "last", bidirectional=False), atol=1e-6
    )
    # end to end, with the linear head (head_hidden=0)
    assert set(params["head"]) == {"out"} and params["head"]["out"]["w"].shape == (H, C)
    expected = ref_head(ref_pool(y, LENGTHS, "last", bidirectional=False), params["head"])
    np.testing.assert_allclose(logits_fn(params, config, tokens, LENGTHS), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "mean_max", "attention"])
def test_lengths_beyond_the_padded_steps_pool_as_the_whole_row(bidirectional_outputs, pooling):
    """Lengths kept from before the tokens were cut read as T, as the recurrence's step mask reads them (mean
    divided a T-step sum by the longer length; last read outside the array, NaN)."""
    _, params, _, y, _ = bidirectional_outputs
    T_y = y.shape[1]
    full = pool(y, jnp.full(len(LENGTHS), T_y), pooling, params["attention"], bidirectional=True)
    beyond = pool(y, jnp.full(len(LENGTHS), T_y + 7), pooling, params["attention"], bidirectional=True)
    np.testing.assert_array_equal(beyond, full)
    with pytest.raises(ValueError, match=r"lengths_B must have shape \(%d,\), one length per row; got \(%d, 1\)"
                       % (len(LENGTHS), len(LENGTHS))):
        pool(y, jnp.asarray(LENGTHS)[:, None], pooling, params["attention"], bidirectional=True)


def test_an_unknown_pooling_is_refused_naming_the_choices(bidirectional_outputs):
    """It fell into the attention branch: attention pooling with the params given, a TypeError without them."""
    _, params, _, y, _ = bidirectional_outputs
    for attention in (params["attention"], None):
        with pytest.raises(ValueError, match=r"unknown pooling 'avg'; choose one of last, mean, max, mean_max, attention$"):
            pool(y, jnp.asarray(LENGTHS), "avg", attention, bidirectional=True)


def test_last_pooling_agrees_with_the_final_carries_without_residual(bidirectional_outputs):
    _, _, _, y, carries = bidirectional_outputs
    from_carries = np.concatenate([c.h for c in carries[-1]], axis=-1)
    pooled = pool(y, jnp.asarray(LENGTHS), "last", bidirectional=True)
    np.testing.assert_array_equal(np.asarray(pooled)[LENGTHS > 0], from_carries[LENGTHS > 0])


def test_last_pooling_of_a_residual_stack_includes_the_residual_input():
    """The top layer's carries leave out the residual ``x`` added to its outputs; "last" must not."""
    config = small_config(pooling="last", num_layers=2, residual=True, head_hidden=0)
    params = random_params(config, seed=6)
    tokens = padded_tokens(LENGTHS, T)
    y, carries = jax.jit(lambda p: rnn(LSTM, p["rnn"], p["embed"][tokens], jnp.asarray(LENGTHS), residual=True))(params)
    expected = ref_head(ref_pool(y, LENGTHS, "last"), params["head"])
    np.testing.assert_allclose(logits_fn(params, config, tokens, LENGTHS), expected, rtol=2e-5, atol=2e-5)
    from_carries = np.concatenate([c.h for c in carries[-1]], axis=-1)
    assert np.abs(ref_pool(y, LENGTHS, "last") - from_carries)[LENGTHS > 0].max() > 1e-2  # the case the carries get wrong


def test_logits_match_numpy_pooling_and_mlp_head(bidirectional_outputs):
    config, params, tokens, y, _ = bidirectional_outputs
    expected = ref_head(ref_pool(y, LENGTHS, "attention", params["attention"]), params["head"])
    actual = np.asarray(logits_fn(params, config, tokens, LENGTHS))
    assert actual.shape == (len(LENGTHS), C)
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5)


def test_mean_max_head_reads_both_halves_end_to_end():
    """mean_max feeds a 4H-wide vector to the head; logits match NumPy pooling and head on it."""
    config = small_config(pooling="mean_max")
    params = random_params(config, seed=3)
    assert "attention" not in params and params["head"]["hidden"]["w"].shape == (4 * H, HEAD)
    tokens = padded_tokens(LENGTHS, T)
    y, _ = lstm_outputs(params, tokens, LENGTHS)
    expected = ref_head(ref_pool(y, LENGTHS, "mean_max"), params["head"])
    np.testing.assert_allclose(logits_fn(params, config, tokens, LENGTHS), expected, rtol=2e-5, atol=2e-5)


def test_max_pooling_of_all_negative_outputs_is_not_a_padding_zero():
    """Max over valid steps must not see the zeros the padded steps hold (tanh outputs can all be < 0)."""
    y = -1.0 - np.random.default_rng(0).random((len(LENGTHS), T, 3)).astype(np.float32)
    y[np.arange(T)[None, :] >= LENGTHS[:, None]] = 0.0
    pooled = np.asarray(pool(jnp.asarray(y), jnp.asarray(LENGTHS), "max", bidirectional=False))
    assert np.all(pooled[LENGTHS > 0] < -1.0)
    np.testing.assert_array_equal(pooled, ref_pool(y, LENGTHS, "max").astype(np.float32))


def test_empty_rows_give_finite_gradients_and_contribute_nothing(bidirectional_outputs):
    """Batch padding (length 0, weight 0) must not poison the loss or its gradient, whatever its tokens."""
    config, params, tokens, _, _ = bidirectional_outputs
    weights = (LENGTHS > 0).astype(np.float32)

    @jax.jit
    def value_and_grad(params, tokens, labels):
        loss = lambda p: weighted_cross_entropy(classifier_logits(p, config, tokens, LENGTHS), labels, weights)
        return jax.value_and_grad(loss)(params)

    value, grads = value_and_grad(params, tokens, LABELS)
    logits = logits_fn(params, config, tokens, LENGTHS)
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(float(value), ref_loss(logits, LABELS, weights), rtol=1e-5)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    garbage_tokens, garbage_labels = tokens.copy(), LABELS.copy()
    garbage_tokens[LENGTHS == 0] = np.arange(2, 2 + T) % V
    garbage_labels[LENGTHS == 0] = 2
    value_garbage, grads_garbage = value_and_grad(params, garbage_tokens, garbage_labels)
    assert float(value_garbage) == float(value)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_garbage)):
        np.testing.assert_array_equal(a, b)


def test_logits_are_padding_invariant(bidirectional_outputs):
    """The same tokens padded to 7 or to 24 steps give the same logits (both directions start right)."""
    config, params, tokens, _, _ = bidirectional_outputs
    long = np.zeros((len(LENGTHS), 24), np.int32)
    long[:, :T] = tokens
    np.testing.assert_allclose(
        logits_fn(params, config, tokens, LENGTHS), logits_fn(params, config, long, LENGTHS), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- modes


# every regulariser the model applies itself; zoneout and weight drop are keyed inside rnn (test_regularisers.py)
DROPPY = small_config(
    embed_dropout=0.2, word_dropout=0.2, input_dropout=0.3, layer_dropout=0.3, output_dropout=0.3,
    recurrent_dropout=0.2, num_layers=2, bidirectional=False, pooling="mean",
)  # fmt: skip


def test_eval_mode_is_deterministic_and_ignores_the_key():
    params = random_params(DROPPY)
    tokens = padded_tokens(LENGTHS, T)
    without = np.asarray(logits_fn(params, DROPPY, tokens, LENGTHS))
    for seed in (0, 1):
        np.testing.assert_array_equal(logits_fn(params, DROPPY, tokens, LENGTHS, key=jax.random.key(seed)), without)


def test_train_mode_depends_on_the_key():
    params = random_params(DROPPY)
    tokens = padded_tokens(LENGTHS, T)
    a, a_again, b = (
        np.asarray(logits_fn(params, DROPPY, tokens, LENGTHS, key=jax.random.key(s), train=True)) for s in (0, 0, 1)
    )
    evaluation = np.asarray(logits_fn(params, DROPPY, tokens, LENGTHS))
    np.testing.assert_array_equal(a, a_again)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    valid = LENGTHS > 0
    assert not np.allclose(a[valid], b[valid])
    assert not np.allclose(a[valid], evaluation[valid])


@pytest.mark.parametrize("field", ["embed_dropout", "word_dropout", "input_dropout", "layer_dropout", "recurrent_dropout",
                                   "zoneout", "weight_drop", "output_dropout"])  # fmt: skip
def test_each_regulariser_alone_reaches_the_logits_in_training_only(field):
    """Each one on its own changes the training logits (so none is silently dropped on the way to rnn or the head)
    and leaves evaluation as without it; zoneout evaluates with its expectation (Krueger et al. 2017), so not."""
    config = small_config(num_layers=2, bidirectional=False, pooling="mean", **{field: 0.5})
    plain = small_config(num_layers=2, bidirectional=False, pooling="mean")
    params = random_params(config)
    tokens = padded_tokens(LENGTHS, T)
    trained = np.asarray(logits_fn(params, config, tokens, LENGTHS, key=jax.random.key(2), train=True))
    if field != "zoneout":
        np.testing.assert_array_equal(logits_fn(params, config, tokens, LENGTHS), logits_fn(params, plain, tokens, LENGTHS))
    without = np.asarray(logits_fn(params, plain, tokens, LENGTHS, key=jax.random.key(2), train=True))
    valid = LENGTHS > 0
    assert not np.allclose(trained[valid], without[valid], rtol=1e-4, atol=1e-4), field


def test_train_mode_without_dropout_equals_eval_mode(bidirectional_outputs):
    config, params, tokens, _, _ = bidirectional_outputs
    np.testing.assert_allclose(
        logits_fn(params, config, tokens, LENGTHS, key=jax.random.key(5), train=True),
        logits_fn(params, config, tokens, LENGTHS),
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip


def test_train_mode_with_dropout_needs_a_key():
    config = small_config(output_dropout=0.5)
    params = random_params(config)
    run = lambda p: classifier_logits(p, config, padded_tokens(LENGTHS, T), LENGTHS, train=True)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jax.eval_shape(run, params)


# --------------------------------------------------------------------------- config and params


def test_config_rejects_unknown_cell_and_pooling_listing_the_choices():
    with pytest.raises(ValueError, match="unknown cell 'lsmt'.*lstm, peephole, cifg, layer_norm, lstmp, gru, rnn"):
        ModelConfig(cell="lsmt")
    with pytest.raises(ValueError, match="unknown pooling 'min'.*last, mean, max, mean_max, attention"):
        ModelConfig(pooling="min")
    with pytest.raises(ValueError, match="--cell lstmp projects to --hidden-size // 2 units: pass --hidden-size >= 2"):
        ModelConfig(cell="lstmp", hidden_size=1)


def test_config_is_hashable_and_compares_by_value():
    assert hash(small_config()) == hash(small_config())
    assert small_config() == small_config() and small_config() != small_config(pooling="mean")


@pytest.mark.parametrize(
    "cell,bidirectional,pooling,head_hidden,width",
    [
        ("lstm", True, "attention", HEAD, 2 * H),
        ("gru", False, "max", HEAD, H),
        ("lstmp", True, "last", 0, 2 * (H // 2)),
    ],
)
def test_param_shapes(cell, bidirectional, pooling, head_hidden, width):
    config = small_config(
        cell=cell, bidirectional=bidirectional, pooling=pooling, head_hidden=head_hidden, num_layers=2
    )
    shapes = jax.eval_shape(lambda k: init_classifier(k, config, V, C), jax.random.key(0))
    assert shapes["embed"].shape == (V, E)
    assert len(shapes["rnn"]) == 2
    gates = {"lstm": 4, "gru": 3, "lstmp": 4}[cell]
    for index, layer in enumerate(shapes["rnn"]):
        directions = (layer["fwd"], layer["bwd"]) if bidirectional else (layer,)
        assert (set(layer) == {"fwd", "bwd"}) == bidirectional
        for direction in directions:
            assert direction["w_x"].shape == (E if index == 0 else width, gates * H)
            assert direction["w_h"].shape == (width // (2 if bidirectional else 1), gates * H)
    assert rnn_width(shapes["rnn"]) == width
    assert ("attention" in shapes) == (pooling == "attention")
    if pooling == "attention":
        assert shapes["attention"]["w"].shape == (width, width)
        assert shapes["attention"]["b"].shape == (width,)
        assert shapes["attention"]["v"].shape == (width,)
    if head_hidden:
        assert shapes["head"]["hidden"]["w"].shape == (width, head_hidden)
        assert shapes["head"]["out"]["w"].shape == (head_hidden, C)
    else:
        assert set(shapes["head"]) == {"out"} and shapes["head"]["out"]["w"].shape == (width, C)
    assert shapes["head"]["out"]["b"].shape == (C,)


# --------------------------------------------------------------------------- ensembles


def test_ensemble_members_are_the_single_models_of_their_split_keys():
    config = small_config(ensemble=3, pooling="max")
    key = jax.random.key(4)
    params = init_classifier(key, config, V, C)
    for i, member_key in enumerate(jax.random.split(key, 3)):
        single = init_classifier(member_key, member_config(config), V, C)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), params, single)
    assert params["embed"].shape == (3, V, E)


def test_ensemble_logits_are_the_log_of_the_members_mean_probabilities():
    config = small_config(ensemble=3, pooling="mean")
    params = random_params(config, seed=5)
    tokens = padded_tokens(LENGTHS, T)
    probabilities = []
    for i in range(3):
        member = jax.tree.map(lambda leaf: leaf[i], params)
        logits = np.asarray(logits_fn(member, member_config(config), tokens, LENGTHS), np.float64)
        probabilities.append(np.exp(logits - logits.max(-1, keepdims=True)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    got = np.asarray(logits_fn(params, config, tokens, LENGTHS))
    np.testing.assert_allclose(np.exp(got), np.mean(probabilities, 0), rtol=1e-5, atol=1e-7)


def test_ensemble_loss_is_the_mean_of_member_losses_with_their_own_dropout():
    config = small_config(ensemble=2, pooling="mean", input_dropout=0.3, output_dropout=0.3)
    params = random_params(config, seed=6)
    batch = Batch(padded_tokens(LENGTHS, T), LENGTHS, LABELS, (LENGTHS > 0).astype(np.float32))
    key = jax.random.key(7)
    member_results = [classifier_loss(jax.tree.map(lambda leaf: leaf[i], params), member_config(config), batch, k)
                      for i, k in enumerate(jax.random.split(key, 2))]  # fmt: skip
    loss, correct = classifier_loss(params, config, batch, key)
    np.testing.assert_allclose(float(loss), np.mean([float(m[0]) for m in member_results]), rtol=1e-5)
    np.testing.assert_allclose(float(correct), np.mean([float(m[1]) for m in member_results]), rtol=1e-6)


def test_ensemble_must_have_a_member_and_explain_asks_for_one():
    with pytest.raises(ValueError, match="--ensemble must be >= 1"):
        small_config(ensemble=0)
    config = small_config(ensemble=2, pooling="max")
    with pytest.raises(ValueError, match="ensemble of 2; explain one member"):
        explain_classifier(random_params(config), config, np.array([3, 4, 5]))
    with pytest.raises(ValueError, match="with_outputs apply to one model"):
        classifier_logits(random_params(config), config, jnp.asarray(padded_tokens(LENGTHS, T)), jnp.asarray(LENGTHS), with_outputs=True)


def numpy_language_model_target(word, lm_words):
    """The class of ``word`` as the ``lm_words`` help says: the ids below ``lm_words`` each their own, the rest one
    class, the one of [PAD] (id 0, never a target itself)."""
    return word if word < lm_words else PAD_ID


def numpy_language_model_terms(lm, y_BTH, tokens_BT, lengths_B, lm_words):
    """``(nll, correct)`` of every prediction, by a loop over rows and steps: forward output t predicts
    word t + 1, backward output t word t - 1."""
    y_BTH, lm = np.asarray(y_BTH, np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), lm)
    width = lm["fwd"]["w"].shape[0]

    def term(outputs_H, head, word):
        logits, target = outputs_H @ head["w"] + head["b"], numpy_language_model_target(word, lm_words)
        top = logits.max()
        return top + np.log(np.exp(logits - top).sum()) - logits[target], float(np.argmax(logits) == target)

    terms = []
    for row, length in enumerate(lengths_B):
        for t in range(length - 1):
            terms.append(term(y_BTH[row, t, :width], lm["fwd"], tokens_BT[row, t + 1]))
            if "bwd" in lm:
                terms.append(term(y_BTH[row, t + 1, width:], lm["bwd"], tokens_BT[row, t]))
    return np.array(terms)


def numpy_language_model_loss(lm, y_BTH, tokens_BT, lengths_B, lm_words):
    return numpy_language_model_terms(lm, y_BTH, tokens_BT, lengths_B, lm_words)[:, 0].mean()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_language_model_loss_matches_numpy(bidirectional):
    lm_words = 9  # below V, so some words fall in the shared rare class
    config = small_config(bidirectional=bidirectional, lm_weight=0.5, lm_words=lm_words)
    params = random_params(config, seed=8)
    assert set(params["lm"]) == ({"fwd", "bwd"} if bidirectional else {"fwd"})
    tokens = padded_tokens(LENGTHS, T)
    _, y_BTH = classifier_logits(params, config, jnp.asarray(tokens), jnp.asarray(LENGTHS), with_outputs=True)
    loss = language_model_loss(params["lm"], y_BTH, jnp.asarray(tokens), jnp.asarray(LENGTHS), lm_words)
    expected = numpy_language_model_loss(params["lm"], y_BTH, tokens, LENGTHS, lm_words)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # The training loss adds it with its weight to the classification loss.
    batch = Batch(tokens, LENGTHS, LABELS, (LENGTHS > 0).astype(np.float32))
    without = {name: value for name, value in params.items() if name != "lm"}
    plain, _ = classifier_loss(without, small_config(bidirectional=bidirectional), batch, jax.random.key(0))
    with_lm, _ = classifier_loss(params, config, batch, jax.random.key(0))
    np.testing.assert_allclose(float(with_lm), float(plain) + 0.5 * expected, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_language_model_sums_count_the_predictions_and_the_right_ones(bidirectional):
    lm_words = 9
    config = small_config(bidirectional=bidirectional, lm_weight=0.5, lm_words=lm_words)
    params = random_params(config, seed=3)
    tokens = padded_tokens(LENGTHS, T)
    _, y_BTH = classifier_logits(params, config, jnp.asarray(tokens), jnp.asarray(LENGTHS), with_outputs=True)
    loss_sum, correct, count = language_model_sums(params["lm"], y_BTH, jnp.asarray(tokens), jnp.asarray(LENGTHS), lm_words)
    terms = numpy_language_model_terms(params["lm"], y_BTH, tokens, LENGTHS, lm_words)
    assert int(count) == len(terms) == (2 if bidirectional else 1) * sum(max(n - 1, 0) for n in LENGTHS)
    np.testing.assert_allclose(float(loss_sum), terms[:, 0].sum(), rtol=1e-5)
    assert int(correct) == int(terms[:, 1].sum()) > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_language_model_tells_apart_every_id_below_lm_words_and_pools_the_rest(bidirectional):
    """``--lm-words N``: "tells apart the ids below this; the rest are one class". With heads that always predict
    class ``c``, the right predictions are the targets of class ``c``: for ``c = N - 1`` the word ``N - 1`` alone
    (not the rarer ids too), and every rarer id together in one class that no word below ``N`` has."""
    lm_words, width = 6, 2
    tokens = np.array([[2, lm_words - 1, lm_words, 3, lm_words + 4, lm_words - 1, 1, lm_words + 9]], np.int32)
    lengths = np.array([tokens.shape[1]], np.int32)
    y_BTH = jnp.ones((1, tokens.shape[1], 2 * width if bidirectional else width))
    words = list(tokens[0, 1:]) + (list(tokens[0, :-1]) if bidirectional else [])  # what the outputs predict
    rare_class_hits = []
    for c in range(lm_words):
        head = {"w": jnp.zeros((width, lm_words)), "b": 5.0 * jax.nn.one_hot(c, lm_words)}
        lm = {"fwd": head, "bwd": head} if bidirectional else {"fwd": head}
        _, correct, count = language_model_sums(lm, y_BTH, jnp.asarray(tokens), jnp.asarray(lengths), lm_words)
        assert int(count) == len(words)
        own = sum(word == c for word in words if word < lm_words)
        rare_class_hits.append(int(correct) - own)
    rare = sum(word >= lm_words for word in words)
    assert rare_class_hits.count(rare) == 1 and rare_class_hits.count(0) == lm_words - 1, rare_class_hits
    assert {word for word in words if word < lm_words}.isdisjoint({rare_class_hits.index(rare)})


@pytest.mark.parametrize("num_layers", [1, 2])
def test_language_model_targets_reach_the_outputs_that_predict_them_only_in_a_deeper_bidirectional_stack(num_layers):
    """Forward output t predicts word t + 1 and backward output t + 1 word t: in one bidirectional layer neither has
    read its target; from the second layer on both have, through the other direction, which is why the config refuses
    the language-model loss there."""
    config = small_config(num_layers=num_layers)
    params = random_params(config, seed=4)
    embedded = params["embed"][jnp.asarray(padded_tokens([T], T))]
    t = 2

    def outputs_at(x_BTE):
        y_BTH, _ = rnn(LSTM, params["rnn"], x_BTE, jnp.asarray([T]))
        return y_BTH[0, t, :H], y_BTH[0, t + 1, H:]  # forward output t, backward output t + 1

    d_forward, d_backward = jax.jacobian(outputs_at)(embedded)
    leaks = [float(jnp.abs(d_forward[:, 0, t + 1]).max()), float(jnp.abs(d_backward[:, 0, t]).max())]
    if num_layers == 1:
        assert leaks == [0.0, 0.0]
    else:
        assert min(leaks) > 1e-4
        with pytest.raises(ValueError, match="--num-layers 1"):
            small_config(num_layers=2, lm_weight=0.5)
        with pytest.raises(ValueError, match="--num-layers 1"):
            small_config(num_layers=2, lm_pretrain_epochs=1)
        small_config(num_layers=2, bidirectional=False, lm_weight=0.5)  # one direction never reads ahead


def test_the_language_model_eval_step_sums_the_numpy_terms_in_evaluation_mode():
    lm_words = 9
    config = small_config(lm_weight=0.5, lm_words=lm_words, input_dropout=0.5, output_dropout=0.5)
    params = random_params(config, seed=11)
    tokens = padded_tokens(LENGTHS, T)
    batch = Batch(tokens, LENGTHS, LABELS, (LENGTHS > 0).astype(np.float32))
    loss_sum, correct, count = make_language_model_eval_step(config)(params, batch)
    _, y_BTH = classifier_logits(params, config, jnp.asarray(tokens), jnp.asarray(LENGTHS), with_outputs=True)  # no key: eval
    terms = numpy_language_model_terms(params["lm"], np.asarray(y_BTH), tokens, LENGTHS, lm_words)
    assert int(count) == len(terms) and int(correct) == int(terms[:, 1].sum())
    np.testing.assert_allclose(float(loss_sum), terms[:, 0].sum(), rtol=1e-5)


def test_language_model_pretraining_loss_trains_the_stack_not_the_head():
    """The pre-training loss is the language-model loss alone; its aux is the rows times next-word accuracy."""
    lm_words = 9
    config = small_config(lm_words=lm_words)
    params = random_params(config, seed=5)
    params["lm"] = random_params(small_config(lm_weight=1.0, lm_words=lm_words), seed=6)["lm"]
    tokens = padded_tokens(LENGTHS, T)
    batch = Batch(tokens, LENGTHS, LABELS, (LENGTHS > 0).astype(np.float32))
    (loss, aux), grads = jax.value_and_grad(language_model_pretraining_loss, has_aux=True)(params, config, batch, jax.random.key(0))
    _, y_BTH = classifier_logits(params, config, jnp.asarray(tokens), jnp.asarray(LENGTHS), with_outputs=True)
    terms = numpy_language_model_terms(params["lm"], y_BTH, tokens, LENGTHS, lm_words)
    np.testing.assert_allclose(float(loss), terms[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux), 4 * terms[:, 1].mean(), rtol=1e-6)  # four real rows
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["head"]))
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves((grads["rnn"], grads["lm"])))
    assert np.any(np.asarray(grads["embed"]))


def init_classifier_shapes(config: ModelConfig, **options) -> dict:
    return jax.eval_shape(lambda k: init_classifier(k, config, V, C, **options), jax.random.key(0))


def test_init_classifier_adds_language_model_heads_for_pretraining_and_pretraining_refuses_an_ensemble():
    config = small_config()
    assert "lm" not in init_classifier_shapes(config)
    heads = init_classifier_shapes(config, language_model=True)["lm"]
    assert set(heads) == {"fwd", "bwd"} and heads["fwd"]["w"].shape == (H, config.lm_words)
    with pytest.raises(ValueError, match="--lm-pretrain-epochs pre-trains one model"):
        small_config(lm_pretrain_epochs=1, ensemble=2)
    with pytest.raises(ValueError, match="--lm-pretrain-epochs must be >= 0"):
        small_config(lm_pretrain_epochs=-1)


def test_bfloat16_compute_tracks_float32_with_float32_logits_and_gradients():
    config = small_config(pooling="max")
    low = ModelConfig(**{**config.__dict__, "compute_dtype": "bfloat16"})
    params = random_params(config, seed=4)
    tokens, lengths = jnp.asarray(padded_tokens(LENGTHS, T)), jnp.asarray(LENGTHS)
    logits = np.asarray(classifier_logits(params, config, tokens, lengths))
    logits_low = classifier_logits(params, low, tokens, lengths)
    assert logits_low.dtype == jnp.float32
    gap = np.abs(np.asarray(logits_low) - logits).max()
    assert 0.0 < gap < 0.05 * np.abs(logits).max()  # rounded, so it did run in bfloat16, but close
    batch = Batch(np.asarray(tokens), LENGTHS, LABELS, (LENGTHS > 0).astype(np.float32))
    grads = jax.grad(lambda p: classifier_loss(p, config, batch, jax.random.key(0))[0])(params)
    grads_low = jax.grad(lambda p: classifier_loss(p, low, batch, jax.random.key(0))[0])(params)
    for exact, rounded in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_low)):
        exact, rounded = np.ravel(exact), np.ravel(rounded)
        assert rounded.dtype == np.float32
        cosine = exact @ rounded / (np.linalg.norm(exact) * np.linalg.norm(rounded))
        assert cosine > 0.99, cosine
    with pytest.raises(ValueError, match="unknown --compute-dtype 'float16'"):
        small_config(compute_dtype="float16")
