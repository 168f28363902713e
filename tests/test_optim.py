"""Tests for lstm_jax.optim: schedules in closed form, the decay mask, and AdamW in NumPy.

The reference optimiser below is the textbook algorithm (Kingma & Ba 2015 with the
decoupled decay of Loshchilov & Hutter 2019, after global-norm clipping), written
in float64 NumPy from the papers rather than from Optax.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lstm_jax.model import ModelConfig, init_classifier
from lstm_jax.optim import SCHEDULES, OptimConfig, decay_mask, make_optimizer, make_schedule, run_notes
from lstm_jax.train import ema_update

PEAK, FACTOR, WARMUP, TOTAL = 0.01, 0.1, 10, 110


def closed_form(schedule, step, *, peak=PEAK, factor=FACTOR, warmup=WARMUP, total=TOTAL):
    """Linear warm-up from 0 over ``warmup`` steps, then the decay over the remaining steps (held at its end)."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return {
        "cosine": peak * (factor + (1 - factor) * 0.5 * (1 + math.cos(math.pi * progress))),
        "linear": peak * (1 - (1 - factor) * progress),
        "exponential": peak * factor**progress,
        "constant": peak,
    }[schedule]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_closed_form(schedule):
    config = OptimConfig(learning_rate=PEAK, schedule=schedule, warmup_steps=WARMUP, final_lr_factor=FACTOR)
    lr = make_schedule(config, TOTAL)
    steps = [0, 1, 5, 9, 10, 11, 37, 60, 100, 109, 110, 200]
    actual = [float(lr(step)) for step in steps]
    expected = [closed_form(schedule, step) for step in steps]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-9)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(WARMUP)), PEAK, rtol=1e-6)
    end = PEAK if schedule == "constant" else FACTOR * PEAK
    np.testing.assert_allclose(float(lr(TOTAL)), end, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential"])
def test_decay_is_monotone_after_warmup(schedule):
    lr = make_schedule(
        OptimConfig(learning_rate=PEAK, schedule=schedule, warmup_steps=WARMUP, final_lr_factor=FACTOR), TOTAL
    )
    values = np.array([float(lr(step)) for step in range(TOTAL + 1)])
    assert np.all(np.diff(values[: WARMUP + 1]) > 0)
    assert np.all(np.diff(values[WARMUP:]) < 0)


def test_warmup_longer_than_the_run_is_cut_to_fit():
    lr = make_schedule(OptimConfig(learning_rate=PEAK, schedule="cosine", warmup_steps=200, final_lr_factor=FACTOR), 5)
    np.testing.assert_allclose(
        [float(lr(s)) for s in range(6)], [0, PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK, FACTOR * PEAK], rtol=1e-5
    )


def test_warmup_note_only_when_no_update_gets_a_decayed_rate():
    config = OptimConfig(warmup_steps=200, ema_decay=0.0)
    assert run_notes(config, 202) == []  # update 201, the last, takes a decayed rate
    [ends_last] = run_notes(config, 201)  # update 200, the last, takes the peak
    assert "201 steps" in ends_last and "ends at the last update" in ends_last and "never decays" in ends_last
    [note] = run_notes(config, 5)
    assert "--warmup-steps 200" in note and "5 steps" in note and "cut to 4" in note and "never decays" in note
    [constant] = run_notes(dataclasses.replace(config, schedule="constant"), 5)  # the whole run is warm-up
    assert "cut to 4" in constant and "reaches its peak only at the last update" in constant
    lr = make_schedule(dataclasses.replace(config, schedule="constant"), 5)
    assert float(lr(3)) < config.learning_rate <= float(lr(4))  # what the note says


def test_ema_note_when_the_average_warm_up_caps_the_decay_for_the_whole_run():
    """The cap at the last update, (1 + T) / (10 + T), is the largest rate the average ever takes: a decay above it
    gives the same weights as any other above it, which the note says (an SST-2 run has 2,112 updates)."""
    [note] = run_notes(OptimConfig(warmup_steps=0, ema_decay=0.999), 2112)
    assert "stays below --ema-decay 0.999 for all 2112 steps" in note and f"(it ends at {2113 / 2122:.5f})" in note
    assert run_notes(OptimConfig(warmup_steps=0, ema_decay=0.99), 2112) == []
    assert run_notes(OptimConfig(warmup_steps=0, ema_decay=0.999), 8991) == []  # (1 + 8991) / (10 + 8991) > 0.999
    assert run_notes(OptimConfig(warmup_steps=0, ema_decay=0.0), 10) == []
    params = {"w": jnp.ones(3)}
    averages = []
    for decay in (0.999, 0.9999):  # both above the cap: the same bits
        ema = params
        for t in range(1, 2113):
            ema = ema_update(ema, {"w": jnp.full(3, float(t))}, decay, t)
        averages.append(np.asarray(ema["w"]))
    np.testing.assert_array_equal(*averages)


def test_an_exponential_decay_to_zero_is_refused_not_held_constant():
    with pytest.raises(ValueError, match="exponential decay never reaches 0.*--final-lr-factor > 0"):
        OptimConfig(schedule="exponential", final_lr_factor=0.0)
    lr = make_schedule(OptimConfig(learning_rate=PEAK, schedule="linear", warmup_steps=0, final_lr_factor=0.0), 10)
    assert float(lr(10)) == 0.0  # linear and cosine do reach 0


def test_no_warmup_starts_at_the_peak():
    lr = make_schedule(OptimConfig(learning_rate=PEAK, schedule="linear", warmup_steps=0, final_lr_factor=FACTOR), 10)
    np.testing.assert_allclose(
        [float(lr(0)), float(lr(5)), float(lr(10))], [PEAK, PEAK * (1 + FACTOR) / 2, PEAK * FACTOR], rtol=1e-5
    )


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine, linear, exponential, constant"):
        OptimConfig(schedule="cosin")


# --------------------------------------------------------------------------- decay mask

DECAYED_NAMES = {"w_x", "w_h", "w_proj", "w"}  # kernels: recurrent, input, projection, dense and attention


def model_shapes(cell):
    config = ModelConfig(cell=cell, embed_dim=4, hidden_size=6, num_layers=2, pooling="attention", head_hidden=5)
    return jax.eval_shape(lambda k: init_classifier(k, config, 11, 3), jax.random.key(0))


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_marks_exactly_the_kernels(decay_embeddings):
    seen = set()
    for cell in ("lstm", "peephole", "layer_norm", "lstmp", "gru"):
        shapes = model_shapes(cell)
        mask = decay_mask(shapes, decay_embeddings=decay_embeddings)
        assert jax.tree.structure(mask) == jax.tree.structure(shapes)
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
            name = path[-1].key
            seen.add(name)
            expected = decay_embeddings if name == "embed" else name in DECAYED_NAMES
            assert decayed is expected, f"{cell}: {jax.tree_util.keystr(path)}"
    # the parameter names the rule must get right are all present in the models above
    assert {
        "embed",
        "w_x",
        "w_h",
        "b",
        "w_peep",
        "w_proj",
        "b_hn",
        "w",
        "v",
        "ln_x_scale",
        "ln_h_bias",
        "ln_c_scale",
    } <= seen


def test_decay_mask_paths_for_the_head_and_attention():
    mask = decay_mask(model_shapes("lstm"))
    assert mask["head"] == {"hidden": {"w": True, "b": False}, "out": {"w": True, "b": False}}
    assert mask["attention"] == {"w": True, "b": False, "v": False}
    assert mask["embed"] is False
    assert all(layer["fwd"]["w_h"] and layer["bwd"]["w_x"] and not layer["bwd"]["b"] for layer in mask["rnn"])


# --------------------------------------------------------------------------- the chain against NumPy


def small_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "embed": (5, 3),
        "rnn": [{"w_x": (3, 8), "w_h": (2, 8), "b": (8,), "w_peep": (3, 2), "ln_x_scale": (8,)}],
        "attention": {"w": (2, 2), "b": (2,), "v": (2,)},
        "head": {"out": {"w": (2, 3), "b": (3,)}},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def expected_mask(params, decay_embeddings):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay_embeddings if path[0].key == "embed" else path[-1].key in DECAYED_NAMES, params
    )


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_zero_gradient_step_applies_only_masked_weight_decay(decay_embeddings):
    lr, wd = 0.1, 0.01
    config = OptimConfig(
        learning_rate=lr, warmup_steps=0, weight_decay=wd, decay_embeddings=decay_embeddings, schedule="constant"
    )
    params = small_params()
    optimizer = make_optimizer(config, total_steps=10)
    updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)
    paths, olds = zip(*jax.tree_util.tree_leaves_with_path(params))
    masks = jax.tree.leaves(expected_mask(params, decay_embeddings))
    for path, old, new, decayed in zip(paths, olds, jax.tree.leaves(new_params), masks):
        if decayed:
            np.testing.assert_allclose(
                new, np.asarray(old) * (1 - lr * wd), rtol=1e-6, err_msg=jax.tree_util.keystr(path)
            )
            assert not np.array_equal(new, old)
        else:
            np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))


def numpy_adamw(params, grads_per_step, config: OptimConfig, total_steps, decay_embeddings=False):
    """Clip by global norm, Adam moments with bias correction, decoupled masked decay, scheduled step size."""
    names = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    mask = jax.tree.leaves(expected_mask(params, decay_embeddings))
    p = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(params)]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    b1, b2, eps = config.b1, config.b2, 1e-8
    warmup = min(config.warmup_steps, total_steps - 1)
    for t, grads in enumerate(grads_per_step, start=1):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in g))
        if config.clip_norm > 0 and norm > config.clip_norm:
            g = [x * config.clip_norm / norm for x in g]
        lr = closed_form(
            config.schedule,
            t - 1,
            peak=config.learning_rate,
            factor=config.final_lr_factor,
            warmup=warmup,
            total=total_steps,
        )
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p[i] = p[i] - lr * (m_hat / (np.sqrt(v_hat) + eps) + (config.weight_decay * p[i] if mask[i] else 0.0))
    assert len(names) == len(p)
    return p


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_several_steps_match_numpy_adamw_with_schedule_clipping_and_mask(clip_norm):
    config = OptimConfig(learning_rate=0.05, schedule="cosine", warmup_steps=2, final_lr_factor=0.2, weight_decay=0.1,
                         clip_norm=clip_norm, b1=0.8, b2=0.95)  # fmt: skip
    total = 6
    params = small_params()
    rng = np.random.default_rng(1)
    scales = [0.1, 1e4, 0.1, 0.2, 0.1, 0.1]  # step 2 has a huge gradient: clipped when clip_norm > 0
    grads_per_step = [
        jax.tree.map(lambda x, s=s: jnp.asarray(s * rng.standard_normal(x.shape), jnp.float32), params) for s in scales
    ]
    optimizer = make_optimizer(config, total)
    update = jax.jit(optimizer.update)
    state, current = optimizer.init(params), params
    for grads in grads_per_step:
        updates, state = update(grads, state, current)
        current = optax.apply_updates(current, updates)
    expected = numpy_adamw(params, grads_per_step, config, total)
    for path_leaf, actual, want in zip(
        jax.tree_util.tree_leaves_with_path(current), jax.tree.leaves(current), expected
    ):
        np.testing.assert_allclose(actual, want, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path_leaf[0]))


@pytest.mark.parametrize("clip_norm", [2.0, 0.0])
def test_clipping_bounds_the_gradient_that_reaches_adam(clip_norm):
    """The first moment after one step is (1 - b1) * the clipped gradient: norm = clip_norm, direction kept."""
    config = OptimConfig(clip_norm=clip_norm, warmup_steps=0)
    params = small_params()
    huge = jax.tree.map(lambda x: 1e6 * x, small_params(seed=3))
    small = jax.tree.map(lambda x: 1e-3 * x, small_params(seed=3))
    optimizer = make_optimizer(config, total_steps=10)
    norm = float(optax.tree.norm(huge))
    update = jax.jit(optimizer.update)
    for grads, grad_norm in ((huge, norm), (small, norm * 1e-9)):
        _, state = update(grads, optimizer.init(params), params)
        mu = optax.tree_utils.tree_get(state, "mu")
        clipped_norm = min(grad_norm, clip_norm) if clip_norm > 0 else grad_norm
        np.testing.assert_allclose(float(optax.tree.norm(mu)), (1 - config.b1) * clipped_norm, rtol=1e-5)
        for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)):  # same direction
            np.testing.assert_allclose(
                np.asarray(m) * grad_norm / clipped_norm,
                (1 - config.b1) * np.asarray(g),
                rtol=1e-4,
                atol=1e-6 * grad_norm,
            )


def test_ensemble_members_are_clipped_and_stepped_each_on_its_own():
    """Two members through ``make_optimizer(ensemble=2)`` against NumPy AdamW run on each member alone.

    Member 1's gradient is 1e4 times member 0's on step 1 and equal on step 2, so a global norm taken over
    both members would clip member 0 by a different factor on each step and change its second update.
    """
    config = OptimConfig(learning_rate=0.05, schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=1.0)
    members = [small_params(seed=0), small_params(seed=1)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    rng = np.random.default_rng(2)
    member_grads = [[jax.tree.map(lambda x, s=s: jnp.asarray(s * rng.standard_normal(x.shape), jnp.float32), members[0])
                     for s in scales] for scales in ((3.0, 3.0), (3e4, 3.0))]  # fmt: skip
    optimizer = make_optimizer(config, total_steps=10, ensemble=2)
    state, current = optimizer.init(stacked), stacked
    for step in range(2):
        grads = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(member_grads[i][step] for i in range(2)))
        updates, state = jax.jit(optimizer.update)(grads, state, current)
        current = optax.apply_updates(current, updates)
    for i in range(2):
        expected = numpy_adamw(members[i], member_grads[i], config, total_steps=10)
        for actual, want in zip(jax.tree.leaves(current), expected):
            np.testing.assert_allclose(np.asarray(actual)[i], want, rtol=2e-4, atol=1e-6)
