"""Tests for lstm_jax.regularisers, alone and through the ``rnn`` driver.

Through ``rnn`` the masks are not visible, so they are read back from gradients: a unit
of ``h`` dropped by recurrent dropout gives its row of ``w_h`` an exactly zero gradient,
an entry dropped by weight drop has a zero gradient, and so on. The recovered mask is
then checked against a step-by-step reference loop that uses it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import E, padded_batch, random_layers

from lstm_jax import LSTM, Carry, Cell, regularisers, rnn, scan_layer

_JIT_RECUR = jax.jit(LSTM.recur)
_JIT_PROJECT = jax.jit(LSTM.project)


def ref_lstm(params, x_BTE, lengths, *, reverse=False, h_mask_BH=None):
    """One LSTM direction, step by step over each unpadded sequence (recur with a fixed h_mask)."""
    batch, num_steps = x_BTE.shape[:2]
    y = np.zeros((batch, num_steps, params["w_h"].shape[0]), np.float32)
    finals = []
    for b in range(batch):
        n = int(lengths[b])
        carry = LSTM.init_carry(params)
        mask = None if h_mask_BH is None else h_mask_BH[b]
        for t in range(n - 1, -1, -1) if reverse else range(n):
            carry, y_t = _JIT_RECUR(params, carry, _JIT_PROJECT(params, x_BTE[b, t]), mask)
            y[b, t] = np.asarray(y_t)
        finals.append(carry)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *finals), y


def trees_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def within_sigmas(fraction, p, n, sigmas=5.0) -> bool:
    return abs(fraction - p) <= sigmas * np.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------ the functions alone

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.uniform(1.0, 2.0, (16, 12, 8)), jnp.float32)  # never zero
TABLE = jnp.asarray(_rng.uniform(1.0, 2.0, (50, 8)), jnp.float32)
_lengths = _rng.integers(5, 30, (20, 1))
TOKENS = jnp.asarray(np.where(np.arange(30) < _lengths, _rng.integers(2, 100, (20, 30)), 0), jnp.int32)
OLD = Carry(jnp.zeros((16, 8)), jnp.zeros((16, 8)))
NEW = Carry(jnp.ones((16, 8)), 2 * jnp.ones((16, 8)))
PARAMS = random_layers(LSTM)[0]

REGULARISERS = {
    "dropout": (lambda key, rate, train: regularisers.dropout(key, X, rate, train=train), X),
    "locked_dropout": (lambda key, rate, train: regularisers.locked_dropout(key, X, rate, train=train), X),
    "embedding_dropout": (
        lambda key, rate, train: regularisers.embedding_dropout(key, TABLE, rate, train=train),
        TABLE,
    ),
    "word_dropout": (
        lambda key, rate, train: regularisers.word_dropout(key, TOKENS, rate, unk_id=1, train=train),
        TOKENS,
    ),
    # Inactive, recurrent_mask returns None: "no mask" for the cells.
    "recurrent_mask": (lambda key, rate, train: regularisers.recurrent_mask(key, (16, 8), rate, train=train), None),
    "zoneout": (lambda key, rate, train: regularisers.zoneout(key, OLD, NEW, rate, train=train), NEW),
    "weight_drop": (lambda key, rate, train: regularisers.weight_drop(key, PARAMS, rate, train=train), PARAMS),
}
NAMES = list(REGULARISERS)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_key_and_different_for_another(name):
    apply, identity = REGULARISERS[name]
    first = apply(jax.random.key(0), 0.5, True)
    assert trees_equal(first, apply(jax.random.key(0), 0.5, True))
    assert not trees_equal(first, apply(jax.random.key(1), 0.5, True))
    assert not trees_equal(first, identity)  # it did something
    if identity is not None:
        assert jax.tree.structure(first) == jax.tree.structure(identity)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(identity)):
            assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("name", NAMES)
def test_identity_when_rate_is_zero(name):
    apply, identity = REGULARISERS[name]
    assert trees_equal(apply(jax.random.key(0), 0.0, True), identity)
    assert trees_equal(apply(None, 0.0, True), identity)  # and no key is needed


@pytest.mark.parametrize("name", [n for n in NAMES if n != "zoneout"])
def test_identity_in_evaluation(name):
    apply, identity = REGULARISERS[name]
    assert trees_equal(apply(jax.random.key(0), 0.5, False), identity)
    assert trees_equal(apply(None, 0.5, False), identity)


@pytest.mark.parametrize("key", [jax.random.key(0), None])
def test_zoneout_in_evaluation_is_its_expectation(key):
    rng = np.random.default_rng(3)
    old = Carry(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8)), jnp.float32))
    new = Carry(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8)), jnp.float32))
    out = regularisers.zoneout(key, old, new, 0.3, train=False)
    for o, n, z in zip(old, new, out):
        np.testing.assert_allclose(z, 0.3 * np.asarray(o) + 0.7 * np.asarray(n), rtol=1e-6, atol=1e-7)
    # A GRU carry (c=None) works too.
    out = regularisers.zoneout(key, Carry(old.h), Carry(new.h), 0.3, train=False)
    assert out.c is None
    np.testing.assert_allclose(out.h, 0.3 * np.asarray(old.h) + 0.7 * np.asarray(new.h), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("train", [True, False])
def test_rate_outside_unit_interval_raises(name, rate, train):
    apply, _ = REGULARISERS[name]
    with pytest.raises(ValueError, match="rate"):
        apply(jax.random.key(0), rate, train)


@pytest.mark.parametrize("name", NAMES)
def test_missing_key_in_training_raises(name):
    apply, _ = REGULARISERS[name]
    with pytest.raises(ValueError, match="key"):
        apply(None, 0.5, True)


# ------------------------------------------------------------------- statistics


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_keeps_one_minus_rate_and_rescales_survivors(rate):
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (1000, 1000)), jnp.float32)
    y = np.asarray(regularisers.dropout(jax.random.key(0), x, rate))
    kept = y != 0
    assert within_sigmas(kept.mean(), 1 - rate, kept.size)
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6, atol=0)
    # So the expectation is unchanged.
    assert abs(y.mean() - float(x.mean())) < 0.01


def test_dropout_shared_axes_share_the_mask():
    x = jnp.ones((40, 30, 20))
    y = np.asarray(regularisers.dropout(jax.random.key(0), x, 0.5, shared_axes=(0, -1)))
    kept = y != 0
    assert (kept == kept[:1, :, :1]).all()  # one decision per index of axis 1
    assert 0 < kept[0, :, 0].sum() < 30


@pytest.mark.parametrize("time_axis", [1, 0])
def test_locked_dropout_mask_is_identical_over_time(time_axis):
    rate = 0.3
    x_BTE = np.random.default_rng(0).uniform(1.0, 2.0, (200, 25, 100)).astype(np.float32)
    x = x_BTE if time_axis == 1 else x_BTE.transpose(1, 0, 2)
    y = np.asarray(regularisers.locked_dropout(jax.random.key(0), jnp.asarray(x), rate, time_axis=time_axis))
    y_BTE = y if time_axis == 1 else y.transpose(1, 0, 2)
    kept = y_BTE != 0
    assert (kept == kept[:, :1]).all(), "the mask must not change over time"
    assert within_sigmas(kept[:, 0].mean(), 1 - rate, kept[:, 0].size)
    np.testing.assert_allclose(y_BTE[kept], x_BTE[kept] / (1 - rate), rtol=1e-6)
    assert not (kept[:1] == kept).all(), "but it differs between sequences"


def test_embedding_dropout_drops_whole_rows():
    rate = 0.2
    table = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (20_000, 16)), jnp.float32)
    y = np.asarray(regularisers.embedding_dropout(jax.random.key(0), table, rate))
    dropped_rows = (y == 0).all(axis=1)
    assert ((y == 0).any(axis=1) == dropped_rows).all(), "a row is dropped whole or not at all"
    assert within_sigmas(dropped_rows.mean(), rate, len(dropped_rows))
    np.testing.assert_allclose(y[~dropped_rows], np.asarray(table)[~dropped_rows] / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("pad_id", [0, 7])
def test_word_dropout_replaces_with_unk_and_never_touches_padding(pad_id):
    rate, unk_id = 0.25, 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (400, 300)).astype(np.int32)
    tokens[tokens == unk_id] = unk_id + 1  # so that a changed token is visible
    tokens[np.arange(300) >= rng.integers(1, 300, (400, 1))] = pad_id
    out = regularisers.word_dropout(jax.random.key(0), jnp.asarray(tokens), rate, unk_id=unk_id, pad_id=pad_id)
    out = np.asarray(out)
    assert out.dtype == tokens.dtype
    pad = tokens == pad_id
    assert (out[pad] == pad_id).all()
    changed = out != tokens
    assert (out[changed] == unk_id).all()
    assert within_sigmas(changed[~pad].mean(), rate, (~pad).sum())
    assert not changed[pad].any()


def test_recurrent_mask_values_and_rate():
    rate = 0.4
    mask = np.asarray(regularisers.recurrent_mask(jax.random.key(0), (500, 400), rate))
    assert mask.shape == (500, 400) and mask.dtype == np.float32
    values = np.unique(mask)
    np.testing.assert_allclose(values, [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert within_sigmas((mask != 0).mean(), 1 - rate, mask.size)
    assert regularisers.recurrent_mask(jax.random.key(0), (3,), rate, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_zoneout_in_training_keeps_each_unit_with_probability_rate():
    rate = 0.3
    old = Carry(jnp.zeros((400, 300)), jnp.zeros((400, 300)))
    new = Carry(jnp.ones((400, 300)), jnp.ones((400, 300)))
    out = regularisers.zoneout(jax.random.key(0), old, new, rate)
    kept_old = []
    for leaf in out:
        leaf = np.asarray(leaf)
        assert np.isin(leaf, [0.0, 1.0]).all(), "each unit is the old or the new value, never a mix"
        assert within_sigmas((leaf == 0).mean(), rate, leaf.size)
        kept_old.append(leaf == 0)
    assert not (kept_old[0] == kept_old[1]).all(), "h and c get their own masks"


def test_weight_drop_only_changes_the_recurrent_kernel():
    rate = 0.3
    params = random_layers(LSTM, 0, 64, 128)[0]
    out = regularisers.weight_drop(jax.random.key(0), params, rate)
    assert set(out) == set(params)
    for name in params:
        if name != "w_h":
            assert out[name] is params[name] or np.array_equal(out[name], params[name])
    w, dropped = np.asarray(params["w_h"]), np.asarray(out["w_h"]) == 0
    assert within_sigmas(dropped.mean(), rate, dropped.size)
    np.testing.assert_allclose(np.asarray(out["w_h"])[~dropped], w[~dropped] / (1 - rate), rtol=1e-6)
    # The kernel to drop is a parameter.
    out = regularisers.weight_drop(jax.random.key(0), params, rate, name="w_x")
    assert np.array_equal(out["w_h"], params["w_h"]) and not np.array_equal(out["w_x"], params["w_x"])



def test_weight_drop_on_params_without_the_kernel_names_the_fix():
    """A bidirectional layer has no w_h of its own: a one-line error, not a KeyError. (In eval mode, or at rate 0,
    nothing is dropped and the params come back as they are, so a custom cell without a w_h runs under rnn.)"""
    layer = random_layers(LSTM, 0, 8, 16, bidirectional=True)[0]
    with pytest.raises(ValueError, match=r"one cell's params with 'w_h'; got (fwd, bwd|bwd, fwd) .*layer\['fwd'\]"):
        regularisers.weight_drop(jax.random.key(0), layer, 0.3)
    assert regularisers.weight_drop(jax.random.key(0), layer, 0.3, train=False) is layer
    assert regularisers.weight_drop(jax.random.key(0), layer, 0.0) is layer

# ------------------------------------------------------------------ through rnn

LENGTHS = [8, 5, 3]
RATES = {  # name: (rates, number of layers: dropout acts between layers)
    "dropout": ({"dropout": 0.3}, 2),
    "recurrent_dropout": ({"recurrent_dropout": 0.3}, 1),
    "zoneout": ({"zoneout": 0.3}, 1),
    "weight_drop": ({"weight_drop": 0.3}, 1),
    "all": ({"dropout": 0.2, "recurrent_dropout": 0.2, "zoneout": 0.1, "weight_drop": 0.2}, 2),
}


@pytest.fixture(scope="module")
def stack():
    layers = random_layers(LSTM, num_layers=2)
    x = jnp.asarray(padded_batch(LENGTHS, 8))
    plain = rnn(LSTM, layers, x, jnp.array(LENGTHS))
    return layers, x, plain


@pytest.mark.parametrize("config", list(RATES))
def test_rnn_training_is_random_but_deterministic_for_a_key(stack, config):
    rates, num_layers = RATES[config]
    layers, x, _ = stack
    run = jax.jit(lambda key: rnn(LSTM, layers[:num_layers], x, jnp.array(LENGTHS), key=key, train=True, **rates))
    y0, c0 = run(jax.random.key(0))
    y0_again, c0_again = run(jax.random.key(0))
    y1, _ = run(jax.random.key(1))
    assert trees_equal((y0, c0), (y0_again, c0_again))
    assert np.abs(np.asarray(y0) - np.asarray(y1)).max() > 1e-3
    assert np.isfinite(np.asarray(y0)).all()
    for b, n in enumerate(LENGTHS):
        assert (np.asarray(y0)[b, n:] == 0).all()
    if config == "all":  # a legacy uint32 key works too
        y_legacy, _ = run(jax.random.PRNGKey(0))
        assert trees_equal(y_legacy, run(jax.random.PRNGKey(0))[0])
        assert np.abs(np.asarray(y_legacy) - np.asarray(run(jax.random.PRNGKey(1))[0])).max() > 1e-3


def test_rnn_evaluation_ignores_dropout_rates(stack):
    layers, x, plain = stack
    rates = {"dropout": 0.5, "recurrent_dropout": 0.5, "weight_drop": 0.5}
    for key in (jax.random.key(0), None):
        out = rnn(LSTM, layers, x, jnp.array(LENGTHS), key=key, train=False, **rates)
        assert trees_equal(out, plain)


def test_rnn_zoneout_in_evaluation_mixes_carries_by_their_expectation():
    rate = 0.3
    (params,) = layers = random_layers(LSTM)
    x = padded_batch(LENGTHS, 8)
    y, (final,) = rnn(LSTM, layers, jnp.asarray(x), jnp.array(LENGTHS), zoneout=rate)
    step = jax.jit(LSTM.step)
    for b, n in enumerate(LENGTHS):
        carry = LSTM.init_carry(params)
        for t in range(n):
            new, _ = step(params, carry, x[b, t])
            carry = jax.tree.map(lambda o, c: rate * o + (1 - rate) * c, carry, new)
        np.testing.assert_allclose(final.h[b], carry.h, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(final.c[b], carry.c, rtol=2e-5, atol=2e-5)
        assert (np.asarray(y)[b, n:] == 0).all()
    _, (plain,) = rnn(LSTM, layers, jnp.asarray(x), jnp.array(LENGTHS))
    assert np.abs(np.asarray(plain.c) - np.asarray(final.c)).max() > 1e-3


def test_zoneout_draws_a_new_mask_at_every_step():
    """A cell whose update is always 1, from a zero carry: step 1 emits 1 - m1 and step 2 emits 1 - m1 * m2 for the
    masks m (1: keep the old value). One mask reused at every step would make them equal; fresh masks keep a unit at
    0 for both steps with probability rate**2."""
    rate, batch, hidden = 0.3, 512, 64
    ones = lambda params, carry, xp, h_mask=None: (Carry(jnp.ones_like(carry.h), jnp.ones_like(carry.c)), jnp.ones_like(carry.h))
    always_one = Cell(lambda *a, **k: {}, lambda params, x: x, ones, lambda params, batch_shape=(): Carry(
        jnp.zeros((*batch_shape, hidden)), jnp.zeros((*batch_shape, hidden))))  # fmt: skip
    x_TE = jnp.zeros((2, batch, hidden))
    _, y_TH = scan_layer(always_one, {}, x_TE, zoneout=rate, key=jax.random.key(1), train=True)
    zero_1, zero_2 = np.asarray(y_TH[0]) == 0, np.asarray(y_TH[1]) == 0
    assert within_sigmas(zero_1.mean(), rate, zero_1.size)
    assert (zero_2 <= zero_1).all() and within_sigmas(zero_2.mean(), rate**2, zero_2.size)


def test_rnn_zoneout_in_training_keeps_or_updates_each_unit():
    rate, batch, hidden = 0.3, 256, 32
    layers = random_layers(LSTM, 0, E, hidden)
    rng = np.random.default_rng(0)
    start = Carry(*(jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32) for _ in range(2)))
    x = jnp.asarray(rng.normal(size=(batch, 1, E)), jnp.float32)  # one step: the result is start or new
    _, (new,) = rnn(LSTM, layers, x, initial_carries=[start])
    _, (out,) = rnn(LSTM, layers, x, key=jax.random.key(0), train=True, zoneout=rate, initial_carries=[start])
    kept = []
    for o, s, n in zip(out, start, new):
        o, s, n = np.asarray(o), np.asarray(s), np.asarray(n)
        is_old, is_new = o == s, np.isclose(o, n, rtol=1e-5, atol=1e-6)  # fused and scanned LSTM sum in different orders
        assert (is_old | is_new).all()
        assert within_sigmas(is_old.mean(), rate, is_old.size)
        kept.append(is_old)
    assert not (kept[0] == kept[1]).all()


def _zero_rows(jacobian_BRG):
    """Per example, which rows (units) of a kernel have an exactly zero gradient."""
    return (np.asarray(jacobian_BRG) == 0).all(axis=-1)


def test_rnn_recurrent_dropout_uses_one_mask_for_all_steps():
    rate = 0.5
    layers = random_layers(LSTM, bidirectional=True)
    x = padded_batch(LENGTHS, 8)  # every length >= 2, so every h reaches w_h

    def per_example_loss(layers):
        y, finals = rnn(LSTM, layers, jnp.asarray(x), jnp.array(LENGTHS), key=jax.random.key(0), train=True,
                        recurrent_dropout=rate)  # fmt: skip
        return jnp.sum(y**2, axis=(1, 2)) + sum(jnp.sum(c**2, axis=-1) for c in jax.tree.leaves(finals)), y

    jac, y = jax.jacrev(per_example_loss, has_aux=True)(layers)
    jac = jac[0]
    masks = {d: np.where(_zero_rows(jac[d]["w_h"]), 0.0, 1 / (1 - rate)).astype(np.float32) for d in ("fwd", "bwd")}
    for mask in masks.values():
        assert 0 < (mask == 0).sum() < mask.size
    assert not np.array_equal(masks["fwd"], masks["bwd"])

    # The output is exactly that of a loop that applies those fixed masks at every step.
    _, y_fwd = ref_lstm(layers[0]["fwd"], x, LENGTHS, h_mask_BH=masks["fwd"])
    _, y_bwd = ref_lstm(layers[0]["bwd"], x, LENGTHS, reverse=True, h_mask_BH=masks["bwd"])
    np.testing.assert_allclose(y, np.concatenate([y_fwd, y_bwd], -1), rtol=2e-5, atol=2e-5)


def test_rnn_weight_drop_drops_recurrent_weights_for_the_whole_sequence():
    rate = 0.5
    layers = random_layers(LSTM)

    x = padded_batch(LENGTHS, 8)

    def loss(layers):
        y, _ = rnn(LSTM, layers, jnp.asarray(x), jnp.array(LENGTHS), key=jax.random.key(0), train=True,
                   weight_drop=rate)  # fmt: skip
        return jnp.sum(y**2), y

    grads, y = jax.grad(loss, has_aux=True)(layers)
    grads = grads[0]
    dropped = np.asarray(grads["w_h"]) == 0
    assert abs(dropped.mean() - rate) < 0.2
    assert (np.asarray(grads["w_x"]) != 0).all() and (np.asarray(grads["b"]) != 0).all()

    params = layers[0]
    dropped_params = {**params, "w_h": jnp.where(dropped, 0.0, params["w_h"] / (1 - rate))}
    _, ref_y = ref_lstm(dropped_params, x, LENGTHS)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variational", [True, False])
def test_rnn_dropout_between_layers(variational):
    rate = 0.5 if variational else 0.3
    lengths = [12, 10, 9]
    layers = random_layers(LSTM, num_layers=2)
    x = padded_batch(lengths, 12)

    def run(layers):
        return rnn(LSTM, layers, jnp.asarray(x), jnp.array(lengths), key=jax.random.key(0), train=True,
                   dropout=rate, variational=variational)  # fmt: skip

    def per_example_loss(layers):
        y, _ = run(layers)
        return jnp.sum(y**2, axis=(1, 2)), y

    jac, y = jax.jacrev(per_example_loss, has_aux=True)(layers)
    assert not _zero_rows(jac[0]["w_x"]).any(), "the first layer's input is not dropped"
    zero = _zero_rows(jac[1]["w_x"])  # (B, H): inputs of layer 2 that never reach it
    if not variational:
        # A fresh mask at every step: no unit is dropped at all of its 9+ steps (p = 0.3**9 each).
        assert not zero.any()
        return
    assert 0 < zero.sum() < zero.size
    # Variational: the same units of y1 are dropped at every step of a sequence.
    _, y1 = ref_lstm(layers[0], x, lengths)
    inputs = y1 * np.where(zero, 0.0, 1 / (1 - rate))[:, None, :].astype(np.float32)
    _, y2 = ref_lstm(layers[1], inputs, lengths)
    np.testing.assert_allclose(y, y2, rtol=2e-5, atol=2e-5)


MISSING_KEY = ["dropout", "recurrent_dropout", "weight_drop", "zoneout"]


@pytest.mark.parametrize("rate_name", MISSING_KEY)
def test_rnn_training_without_key_raises(rate_name):
    layers = random_layers(LSTM, num_layers=2)
    with pytest.raises(ValueError, match="key"):
        jax.eval_shape(lambda: rnn(LSTM, layers, jnp.ones((2, 4, E)), train=True, **{rate_name: 0.3}))


@pytest.mark.parametrize("rate_name", ["dropout", "recurrent_dropout", "weight_drop", "zoneout"])
@pytest.mark.parametrize("train", [True, False])
def test_rnn_rate_of_one_raises(rate_name, train):
    layers = random_layers(LSTM, num_layers=2)
    with pytest.raises(ValueError, match="rate"):
        jax.eval_shape(
            lambda: rnn(LSTM, layers, jnp.ones((2, 4, E)), key=jax.random.key(0), train=train, **{rate_name: 1.0})
        )


@pytest.mark.parametrize("train", [True, False])
def test_zoneout_output_is_the_zoned_h(train):
    """Krueger et al. 2017: the layer emits the zoned h, so the last valid output equals the final carry's h."""
    layers = random_layers(LSTM, num_layers=1)
    x = jax.random.normal(jax.random.key(3), (3, 6, E))
    lengths = jnp.array([6, 4, 1])
    y, carries = rnn(LSTM, layers, x, lengths, key=jax.random.key(4), train=train, zoneout=0.4)
    last = y[jnp.arange(3), lengths - 1]
    np.testing.assert_array_equal(last, carries[0].h)


def test_adversarial_perturbation_has_norm_epsilon_along_the_gradient_and_spares_zero_rows():
    rng = np.random.default_rng(5)
    grad = rng.normal(size=(3, 4, 5)).astype(np.float32)
    grad[1] = 0.0  # a padding row
    grad[2, 2:] = 0.0  # padded steps
    r = np.asarray(regularisers.adversarial_perturbation(jnp.asarray(grad), 0.7), np.float64)
    norms = np.sqrt((r**2).sum((1, 2)))
    np.testing.assert_allclose(norms[[0, 2]], 0.7, rtol=1e-6)
    assert np.all(r[1] == 0.0) and np.all(r[2, 2:] == 0.0)
    expected = 0.7 * grad[0] / np.sqrt((grad[0].astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(r[0], expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(jax.grad(lambda g: regularisers.adversarial_perturbation(g, 0.7).sum())(jnp.asarray(grad))) == 0)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_partners_permute_the_rows_and_keep_the_larger_beta_share(alpha):
    partner, share = regularisers.mixup_partners(jax.random.key(0), 4000, alpha)
    partner, share = np.asarray(partner), np.asarray(share, np.float64)
    np.testing.assert_array_equal(np.sort(partner), np.arange(4000))
    assert np.mean(partner == np.arange(4000)) < 0.01  # a permutation, not the identity
    assert share.min() >= 0.5 and share.max() <= 1.0
    draws = np.random.default_rng(0).beta(alpha, alpha, 1_000_000)
    expected = np.maximum(draws, 1 - draws)  # max(l, 1 - l), l ~ Beta(alpha, alpha)
    assert abs(share.mean() - expected.mean()) < 4 * expected.std() / np.sqrt(4000)
    assert abs(np.median(share) - np.median(expected)) < 0.02


def test_mixup_partners_of_real_rows_are_real_and_uniform_among_them():
    """A batch padded with rows of weight 0: each real row's partner is drawn uniformly from the real rows (itself
    included, as in a plain permutation), so mixup loses no real row to padding."""
    real = np.array([True, True, False, True, True, True, False, False])
    draws = 6000
    partner_of = lambda key: regularisers.mixup_partners(key, real.size, 1.0, real_B=jnp.asarray(real))[0]
    partners = np.asarray(jax.vmap(partner_of)(jax.random.split(jax.random.key(0), draws)))
    for partner in partners[:50]:
        np.testing.assert_array_equal(np.sort(partner), np.arange(real.size))  # a permutation of all rows
    assert real[partners[:, real]].all() and not real[partners[:, ~real]].any()
    counts = np.stack([np.bincount(partners[:, row], minlength=real.size)[real] for row in np.flatnonzero(real)])
    expected = draws / real.sum()
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_mixup_partners_refuses_real_rows_of_another_shape():
    """Rows beyond ``real_B`` silently took row 0 as their partner."""
    for shape, shown in (((3,), r"\(3,\)"), ((4, 1), r"\(4, 1\)")):
        with pytest.raises(ValueError, match=r"real_B must have shape \(4,\), one flag per row: pass one for each of the "
                                             rf"4 rows; got {shown}$"):
            regularisers.mixup_partners(jax.random.key(0), 4, 1.0, real_B=jnp.ones(shape, bool))


def test_mixup_alpha_must_be_positive():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        regularisers.mixup_partners(jax.random.key(0), 4, 0.0)


def test_mix_rows_matches_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 3, 2)).astype(np.float32)
    partner, share = np.array([2, 0, 3, 1]), np.array([0.5, 0.9, 1.0, 0.7], np.float32)
    expected = share[:, None, None] * x + (1 - share[:, None, None]) * x[partner]
    np.testing.assert_allclose(np.asarray(regularisers.mix_rows(jnp.asarray(x), jnp.asarray(partner), jnp.asarray(share))), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, scale",
    [(jnp.float32, 1.0), (jnp.float32, 1e-20), (jnp.float32, 1e-25), (jnp.float16, 1e-4), (jnp.float16, 300.0),
     (jnp.bfloat16, 1e-30)],
)  # fmt: skip
def test_adversarial_perturbation_has_norm_epsilon_for_tiny_huge_and_low_precision_gradients(dtype, scale):
    """Miyato et al.'s code divides by the largest |g| before squaring, so the direction survives where the squares
    of g underflow (a confident prediction's gradient) or overflow (float16)."""
    rng = np.random.default_rng(7)
    grad = rng.normal(size=(3, 6, 5)) * scale
    grad[1] = 0.0
    grad_low = jnp.asarray(grad, dtype)
    g = np.asarray(grad_low, np.float64)  # the values the function sees
    r = np.asarray(regularisers.adversarial_perturbation(grad_low, 0.5), np.float64)
    assert regularisers.adversarial_perturbation(grad_low, 0.5).dtype == dtype
    norms = np.sqrt((g**2).sum((1, 2), keepdims=True))
    expected = 0.5 * np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)
    tolerance = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(r, expected, rtol=tolerance, atol=tolerance * 0.5 / np.sqrt(30))
    np.testing.assert_allclose(np.sqrt((r**2).sum((1, 2)))[[0, 2]], 0.5, rtol=tolerance)
    assert np.all(r[1] == 0.0)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_mixup_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        regularisers.mixup_partners(jax.random.key(0), 4, alpha)


def test_zoneout_decides_each_unit_of_each_row_when_the_old_carry_broadcasts():
    """One ``(H,)`` starting state for the whole batch: each row's units still keep it or not on their own draws."""
    rate, batch, hidden = 0.5, 64, 32
    out = np.asarray(regularisers.zoneout(jax.random.key(0), jnp.zeros((hidden,)), jnp.ones((batch, hidden)), rate))
    assert out.shape == (batch, hidden)
    kept_old = out == 0
    assert within_sigmas(kept_old.mean(), rate, kept_old.size)
    assert not (kept_old == kept_old[:1]).all(), "rows must not share one mask"


@pytest.mark.parametrize("shared_axes", [(3,), (-4,)])
def test_dropout_shared_axes_outside_the_array_raise(shared_axes):
    with pytest.raises(ValueError, match="axis"):
        regularisers.dropout(jax.random.key(0), X, 0.5, shared_axes=shared_axes)
    with pytest.raises(ValueError, match="axis"):
        regularisers.locked_dropout(jax.random.key(0), X, 0.5, time_axis=shared_axes[0])


@pytest.mark.parametrize("epsilon", [1.0, 5.0, 100.0])
def test_adversarial_perturbation_under_jit_spares_zero_rows_at_any_epsilon(epsilon):
    """Miyato et al. take epsilon = 5 on IMDB; a batch-padding row must get no perturbation there too, not NaN."""
    grad = np.random.default_rng(8).normal(size=(2, 4, 3)).astype(np.float32)
    grad[1] = 0.0
    perturb = jax.jit(regularisers.adversarial_perturbation, static_argnums=1)
    r = np.asarray(perturb(jnp.asarray(grad), epsilon), np.float64)
    g = grad.astype(np.float64)
    np.testing.assert_allclose(r[0], epsilon * g[0] / np.sqrt((g[0] ** 2).sum()), rtol=1e-5)
    assert np.all(r[1] == 0.0)
