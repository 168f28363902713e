"""Tests for lstm_jax.recurrence: the scan driver against step-by-step references.

The reference for every check below is a plain Python loop that calls ``cell.step``
one time step at a time on each sequence's unpadded part (flipped for the reverse
direction). Parameters are randomly perturbed away from their init so that zero
peepholes, unit norm scales or zero biases cannot hide a mistake.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax
from lstm_jax import (
    CELLS,
    GRU,
    LAYER_NORM_LSTM,
    LSTM,
    PROJECTED_LSTM,
    Carry,
    init_rnn,
    output_size,
    rnn,
    scan_layer,
    valid_mask,
)
from lstm_jax.recurrence import is_bidirectional

E, H = 5, 6


# ------------------------------------------------------------------------- known bug


def _default_carry_broken() -> bool:
    """True while ``rnn`` fails on a unidirectional layer when ``initial_carries`` is None."""
    layers = init_rnn(jax.random.key(0), LSTM, 2, 3)
    try:
        rnn(LSTM, layers, jnp.zeros((1, 2, 2)))
    except AttributeError:
        return True
    return False


# recurrence.py, rnn(): with initial_carries=None a unidirectional layer gets
# starts = ((None,),), so scan_layer receives carry=(None,) and cell.recur fails with
# "AttributeError: 'tuple' object has no attribute 'h'". Tests that go through that
# path are expected to fail with exactly that error until it is fixed; any other
# failure still fails them. test_rnn_unidirectional_default_carry pins the bug itself.
DEFAULT_CARRY_BUG = _default_carry_broken()
needs_default_carry = pytest.mark.xfail(
    DEFAULT_CARRY_BUG,
    raises=AttributeError,
    strict=True,
    reason="rnn() passes carry=(None,) to scan_layer for unidirectional layers without initial_carries",
)


# --------------------------------------------------------------------------- helpers


def perturbed(tree, key, scale=0.3):
    """Every leaf plus Gaussian noise, so that no parameter sits at a neutral value."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    )


def make_layers(cell, seed=0, input_size=E, hidden_size=H, **options):
    k_init, k_noise = jax.random.split(jax.random.key(seed))
    return perturbed(init_rnn(k_init, cell, input_size, hidden_size, **options), k_noise)


def padded_batch(lengths, num_steps, seed=1, input_size=E):
    """Random inputs with large garbage on padded steps, which must not leak anywhere."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), num_steps, input_size)).astype(np.float32)
    for b, n in enumerate(lengths):
        x[b, n:] = 1e3 * rng.normal(size=x[b, n:].shape)
    return x


def repad(x_BTE, lengths, num_steps, seed=2):
    """The same valid steps, padded (with fresh garbage) to ``num_steps``."""
    out = padded_batch(lengths, num_steps, seed=seed, input_size=x_BTE.shape[-1])
    for b, n in enumerate(lengths):
        out[b, :n] = x_BTE[b, :n]
    return out


def stack_trees(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def ref_direction(cell, params, x_BTE, lengths, *, reverse=False, carry=None):
    """Loop over each unpadded sequence with ``cell.step``; reverse = flip the valid part."""
    x_BTE = np.asarray(x_BTE)
    batch, num_steps = x_BTE.shape[:2]
    y = np.zeros((batch, num_steps, output_size(params)), np.float32)
    finals = []
    for b in range(batch):
        n = int(lengths[b])
        state = cell.init_carry(params) if carry is None else jax.tree.map(lambda a: a[b], carry)
        steps = range(n - 1, -1, -1) if reverse else range(n)
        for t in steps:
            state, y_t = cell.step(params, state, x_BTE[b, t])
            y[b, t] = np.asarray(y_t)
        finals.append(state)
    return stack_trees(finals), y


def ref_stack(cell, layers, x_BTE, lengths, *, reverse=False, residual=False, initial_carries=None):
    """The whole stack, layer by layer, from ``ref_direction``."""
    x = np.asarray(x_BTE)
    finals = []
    for index, layer in enumerate(layers):
        start = None if initial_carries is None else initial_carries[index]
        if is_bidirectional(layer):
            fwd_start, bwd_start = (None, None) if start is None else start
            c_f, y_f = ref_direction(cell, layer["fwd"], x, lengths, carry=fwd_start)
            c_b, y_b = ref_direction(cell, layer["bwd"], x, lengths, reverse=True, carry=bwd_start)
            y, carry = np.concatenate([y_f, y_b], -1), (c_f, c_b)
        else:
            carry, y = ref_direction(cell, layer, x, lengths, reverse=reverse, carry=start)
        if residual and index > 0:
            y = y + x
        finals.append(carry)
        x = y
    return x, finals


def assert_trees_close(actual, expected, atol=2e-5, rtol=2e-5):
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"structure {a_def} != {e_def}"
    for a, e in zip(a_leaves, e_leaves):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def random_carry(cell, params, batch, key):
    return perturbed(cell.init_carry(params, (batch,)), key, scale=0.5)


# ----------------------------------------------------------------- padding semantics


def test_valid_mask():
    mask = valid_mask(jnp.array([0, 2, 3]), 3)
    assert mask.shape == (3, 3)
    np.testing.assert_array_equal(mask[:, 0], [False, False, False])
    np.testing.assert_array_equal(mask[:, 1], [True, True, False])
    np.testing.assert_array_equal(mask[:, 2], [True, True, True])


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_layer_matches_step_by_step_reference(cell_name, reverse):
    cell = CELLS[cell_name]
    (params,) = make_layers(cell)
    lengths = [9, 5, 1, 0]
    x = padded_batch(lengths, 9)
    carry, y_TH = scan_layer(cell, params, jnp.swapaxes(x, 0, 1), lengths=jnp.array(lengths), reverse=reverse)
    ref_carry, ref_y = ref_direction(cell, params, x, lengths, reverse=reverse)
    y = np.asarray(jnp.swapaxes(y_TH, 0, 1))
    assert_trees_close(carry, ref_carry)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    for b, n in enumerate(lengths):
        assert (y[b, n:] == 0).all(), "padded outputs must be exactly zero"
    # An empty sequence keeps its initial (zero) carry.
    assert all((np.asarray(leaf)[3] == 0).all() for leaf in jax.tree.leaves(carry))


@needs_default_carry
@pytest.mark.parametrize("cell_name", ["lstm", "gru", "peephole", "lstmp"])
def test_rnn_matches_step_by_step_reference(cell_name):
    cell = CELLS[cell_name]
    layers = make_layers(cell, num_layers=2)
    lengths = [7, 3, 1]
    x = padded_batch(lengths, 7)
    y, finals = rnn(cell, layers, jnp.asarray(x), jnp.array(lengths))
    ref_y, ref_finals = ref_stack(cell, layers, x, lengths)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    for b, n in enumerate(lengths):
        assert (np.asarray(y)[b, n:] == 0).all()


@pytest.mark.xfail(DEFAULT_CARRY_BUG, strict=True, raises=AttributeError, reason="see DEFAULT_CARRY_BUG")
def test_rnn_unidirectional_default_carry():
    """initial_carries=None must mean zero carries, as documented."""
    layers = make_layers(LSTM, num_layers=2)
    x = jnp.asarray(padded_batch([4, 2], 4))
    y, finals = rnn(LSTM, layers, x, jnp.array([4, 2]))
    zeros = [LSTM.init_carry(layer, (2,)) for layer in layers]
    y_ref, finals_ref = rnn(LSTM, layers, x, jnp.array([4, 2]), initial_carries=zeros)
    assert_trees_close((y, finals), (y_ref, finals_ref), atol=0, rtol=0)


MODES = [
    pytest.param("forward", marks=needs_default_carry),
    pytest.param("reverse", marks=needs_default_carry),
    "bidirectional",
]


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "layer_norm"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_invariance(cell_name, mode):
    cell = CELLS[cell_name]
    layers = make_layers(cell, num_layers=2, bidirectional=mode == "bidirectional")
    lengths = [10, 6, 1]
    x10 = padded_batch(lengths, 10)
    x50 = repad(x10, lengths, 50)
    y10, c10 = rnn(cell, layers, jnp.asarray(x10), jnp.array(lengths), reverse=mode == "reverse")
    y50, c50 = rnn(cell, layers, jnp.asarray(x50), jnp.array(lengths), reverse=mode == "reverse")
    np.testing.assert_allclose(y50[:, :10], y10, rtol=1e-6, atol=1e-6)
    assert (np.asarray(y50)[:, 10:] == 0).all()
    assert_trees_close(c50, c10, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "layer_norm", "cifg"])
def test_bidirectional_is_concat_of_forward_and_flipped_reverse(cell_name):
    cell = CELLS[cell_name]
    layers = make_layers(cell, num_layers=2, bidirectional=True)
    lengths = [8, 4, 2, 1]
    x = padded_batch(lengths, 8)
    y, finals = rnn(cell, layers, jnp.asarray(x), jnp.array(lengths))
    assert y.shape == (4, 8, 2 * H)
    ref_y, ref_finals = ref_stack(cell, layers, x, lengths)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in finals)
    assert_trees_close(finals, ref_finals)


@needs_default_carry
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_rnn_reverse_matches_flipped_reference(cell_name):
    cell = CELLS[cell_name]
    layers = make_layers(cell, num_layers=2)
    lengths = [6, 4, 1]
    x = padded_batch(lengths, 6)
    y, finals = rnn(cell, layers, jnp.asarray(x), jnp.array(lengths), reverse=True)
    ref_y, ref_finals = ref_stack(cell, layers, x, lengths, reverse=True)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    # Not the same as the forward direction (the test can tell them apart).
    fwd_y, _ = ref_stack(cell, layers, x, lengths)
    assert np.abs(fwd_y - ref_y).max() > 1e-2


# ------------------------------------------------------------------ initial carries


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "lstmp"])
def test_initial_carries_are_honoured(cell_name):
    cell = CELLS[cell_name]
    lengths = [5, 2, 0]
    x = padded_batch(lengths, 5)
    keys = jax.random.split(jax.random.key(7), 8)

    uni = make_layers(cell, num_layers=2)
    starts = [random_carry(cell, layer, 3, k) for layer, k in zip(uni, keys)]
    y, finals = rnn(cell, uni, jnp.asarray(x), jnp.array(lengths), initial_carries=starts)
    ref_y, ref_finals = ref_stack(cell, uni, x, lengths, initial_carries=starts)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
    # The empty sequence (length 0) ends with exactly the carry it started with.
    for final, start in zip(finals, starts):
        for a, s in zip(jax.tree.leaves(final), jax.tree.leaves(start)):
            np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(s)[2])
    # And the starts matter: zero carries give a different output.
    y0, _ = rnn(cell, uni, jnp.asarray(x), jnp.array(lengths), initial_carries=[None, None])
    assert np.abs(np.asarray(y0) - np.asarray(y)).max() > 1e-3

    bi = make_layers(cell, num_layers=1, bidirectional=True)
    pair = (random_carry(cell, bi[0]["fwd"], 3, keys[4]), random_carry(cell, bi[0]["bwd"], 3, keys[5]))
    y, finals = rnn(cell, bi, jnp.asarray(x), jnp.array(lengths), initial_carries=[pair])
    ref_y, ref_finals = ref_stack(cell, bi, x, lengths, initial_carries=[pair])
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)


# ---------------------------------------------------------------------- gradients

GRAD_SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from lstm_jax import get_cell, init_rnn, rnn

    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    CONFIGS = json.loads(sys.argv[2])
    B, T, E, H = 3, 6, 3, 4
    LENGTHS = jnp.array([6, 4, 1])

    def perturbed(tree, key, scale):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])

    out = {}
    for seed, (name, (cell_name, bidirectional, with_carries)) in enumerate(CONFIGS.items()):
        cell = get_cell(cell_name)
        k_init, k_noise, k_x, k_carry = jax.random.split(jax.random.key(seed), 4)
        layers = init_rnn(k_init, cell, E, H, num_layers=2, bidirectional=bidirectional, dtype=jnp.float64)
        layers = perturbed(layers, k_noise, 0.3)
        x = jax.random.normal(k_x, (B, T, E), jnp.float64)
        carries = None
        if with_carries:
            carries = [perturbed(cell.init_carry(layer, (B,)), k, 0.5) for layer, k in zip(layers, jax.random.split(k_carry, 2))]

        def loss(tree):
            y, finals = rnn(cell, tree[0], x, LENGTHS, initial_carries=tree[1])
            assert y.dtype == jnp.float64
            return sum(jnp.sum(v ** 2) for v in jax.tree.leaves((y, finals)))

        tree = (layers, carries)
        leaves, treedef = jax.tree.flatten(tree)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        flat_loss = jax.jit(lambda leaves: loss(jax.tree.unflatten(treedef, leaves)))
        grads = jax.tree.leaves(jax.jit(jax.grad(loss))(tree))
        rng = np.random.default_rng(seed)
        base = [np.asarray(l) for l in leaves]
        checks = []
        h = 1e-4
        for i, (path, leaf, grad) in enumerate(zip(paths, base, grads)):
            for flat in rng.choice(leaf.size, size=min(3, leaf.size), replace=False):
                idx = np.unravel_index(flat, leaf.shape)
                def f(delta):
                    moved = list(base)
                    moved[i] = leaf.copy()
                    moved[i][idx] += delta
                    return float(flat_loss(moved))
                # Fourth-order central difference: error O(h^4), rounding O(eps / h).
                fd = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
                checks.append([path, float(np.asarray(grad)[idx]), fd])
        out[name] = checks
    print("RESULT" + json.dumps(out))
    '''
)

GRAD_CONFIGS = {
    # name: (cell, bidirectional, random initial carries (also differentiated))
    "lstm": ("lstm", False, True),
    "lstm_bidirectional": ("lstm", True, False),
    "layer_norm": ("layer_norm", False, True),
    "peephole_bidirectional": ("peephole", True, False),
    "gru": ("gru", False, True),
}


@pytest.fixture(scope="module")
def float64_gradient_checks():
    package_root = str(Path(lstm_jax.__file__).resolve().parents[1])
    env = {**os.environ, "JAX_ENABLE_X64": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", GRAD_SCRIPT, package_root, json.dumps(GRAD_CONFIGS)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradients_match_finite_differences_float64(float64_gradient_checks, name):
    checks = float64_gradient_checks[name]
    paths = {path for path, _, _ in checks}
    # Every parameter of both layers (and both directions) was probed ...
    for layer in (0, 1):
        for leaf in ("w_x", "w_h", "b"):
            assert any(p.startswith(f"[0][{layer}]") and p.endswith(f"['{leaf}']") for p in paths), (layer, leaf)
    variant_leaf = {"layer_norm": "ln_h_scale", "peephole_bidirectional": "w_peep", "gru": "b_hn"}.get(name)
    if variant_leaf:
        assert any(p.endswith(f"['{variant_leaf}']") for p in paths)
    if GRAD_CONFIGS[name][2]:  # ... and the initial carries too.
        assert any(p.startswith("[1][1]") for p in paths)
    errors = [(abs(ad - fd) / max(abs(ad), abs(fd), 1e-3), path, ad, fd) for path, ad, fd in checks]
    worst = max(errors)
    assert worst[0] < 1e-6, f"worst relative error {worst}"
    assert max(abs(ad) for _, ad, _ in checks) > 1e-2  # the loss is not trivially flat


# ---------------------------------------------------------- transforms and layouts


BIDIRECTIONALITY = [pytest.param(False, marks=needs_default_carry), True]


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_jit_matches_eager(bidirectional):
    layers = make_layers(LSTM, num_layers=2, bidirectional=bidirectional)
    lengths = jnp.array([7, 3])
    x = jnp.asarray(padded_batch([7, 3], 7))
    eager = rnn(LSTM, layers, x, lengths)
    jitted = jax.jit(lambda layers, x, lengths: rnn(LSTM, layers, x, lengths))(layers, x, lengths)
    assert_trees_close(jitted, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_vmap_over_unbatched_sequences_matches_batched(bidirectional):
    layers = make_layers(GRU, num_layers=2, bidirectional=bidirectional)
    lengths = jnp.array([7, 3, 5])
    x = jnp.asarray(padded_batch([7, 3, 5], 7))
    batched = rnn(GRU, layers, x, lengths)
    mapped = jax.vmap(lambda x_TE, length: rnn(GRU, layers, x_TE, length))(x, lengths)
    assert_trees_close(mapped, batched, atol=1e-6, rtol=1e-6)
    # One unbatched sequence (T, E) with a scalar length also runs on its own.
    y_TH, _ = rnn(GRU, layers, x[1], lengths[1])
    np.testing.assert_allclose(y_TH, batched[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_time_major_matches_batch_major(bidirectional):
    layers = make_layers(LSTM, num_layers=2, bidirectional=bidirectional)
    lengths = jnp.array([6, 2])
    x_BTE = jnp.asarray(padded_batch([6, 2], 6))
    y_BTH, finals = rnn(LSTM, layers, x_BTE, lengths)
    y_TBH, finals_tm = rnn(LSTM, layers, jnp.swapaxes(x_BTE, 0, 1), lengths, time_major=True)
    np.testing.assert_allclose(jnp.swapaxes(y_TBH, 0, 1), y_BTH, rtol=1e-6, atol=1e-6)
    assert_trees_close(finals_tm, finals, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_multiple_batch_dimensions(bidirectional):
    layers = make_layers(LSTM, num_layers=2, bidirectional=bidirectional)
    lengths = np.array([[5, 1, 3], [2, 5, 4]])
    x = padded_batch(lengths.reshape(-1), 5).reshape(2, 3, 5, E)
    y, finals = rnn(LSTM, layers, jnp.asarray(x), jnp.asarray(lengths))
    width = 2 * H if bidirectional else H
    assert y.shape == (2, 3, 5, width)
    flat_y, flat_finals = rnn(LSTM, layers, jnp.asarray(x.reshape(6, 5, E)), jnp.asarray(lengths.reshape(6)))
    np.testing.assert_allclose(np.asarray(y).reshape(6, 5, width), flat_y, rtol=1e-6, atol=1e-6)
    assert_trees_close(jax.tree.map(lambda a: a.reshape(6, *a.shape[2:]), finals), flat_finals, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- stacks


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_three_layer_shapes(bidirectional):
    layers = init_rnn(jax.random.key(0), LSTM, E, H, num_layers=3, bidirectional=bidirectional)
    assert len(layers) == 3
    width = 2 * H if bidirectional else H
    first = layers[1]["fwd"] if bidirectional else layers[1]
    assert first["w_x"].shape == (width, 4 * H)
    y, finals = rnn(LSTM, layers, jnp.ones((4, 9, E)), jnp.array([9, 8, 1, 4]))
    assert y.shape == (4, 9, width)
    assert len(finals) == 3
    for final in finals:
        for carry in final if bidirectional else (final,):
            assert isinstance(carry, Carry)
            assert carry.h.shape == carry.c.shape == (4, H)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONALITY)
def test_residual_adds_layer_input_from_second_layer(bidirectional):
    layers = make_layers(LSTM, num_layers=3, bidirectional=bidirectional)
    lengths = [6, 3]
    x = padded_batch(lengths, 6)
    y, finals = rnn(LSTM, layers, jnp.asarray(x), jnp.array(lengths), residual=True)

    # By hand with scan_layer (time-major), adding each layer's input from layer 1 on.
    h_TE = jnp.swapaxes(jnp.asarray(x), 0, 1)
    manual_finals = []
    for index, layer in enumerate(layers):
        directions = [(layer["fwd"], False), (layer["bwd"], True)] if bidirectional else [(layer, False)]
        outs, carries = [], []
        for params, backwards in directions:
            carry, out = scan_layer(LSTM, params, h_TE, lengths=jnp.array(lengths), reverse=backwards)
            outs.append(out)
            carries.append(carry)
        out = jnp.concatenate(outs, -1)
        h_TE = out + h_TE if index > 0 else out
        manual_finals.append(tuple(carries) if bidirectional else carries[0])
    np.testing.assert_allclose(y, jnp.swapaxes(h_TE, 0, 1), rtol=1e-6, atol=1e-6)
    assert_trees_close(finals, manual_finals, atol=1e-6, rtol=1e-6)

    # The step-by-step reference agrees, and the residual actually changed something.
    ref_y, _ = ref_stack(LSTM, layers, x, lengths, residual=True)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    plain, _ = rnn(LSTM, layers, jnp.asarray(x), jnp.array(lengths))
    assert np.abs(np.asarray(plain) - np.asarray(y)).max() > 1e-2
    assert (np.asarray(y)[1, 3:] == 0).all()


def test_residual_width_mismatch_raises():
    k1, k2 = jax.random.split(jax.random.key(0))
    layers = init_rnn(k1, LSTM, E, H, bidirectional=True) + init_rnn(k2, LSTM, 2 * H, H + 1, bidirectional=True)
    x = jnp.ones((2, 4, E))
    rnn(LSTM, layers, x)  # fine without residual
    with pytest.raises(ValueError, match="residual"):
        rnn(LSTM, layers, x, residual=True)


def test_reverse_with_bidirectional_layer_raises():
    layers = init_rnn(jax.random.key(0), LSTM, E, H, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        rnn(LSTM, layers, jnp.ones((2, 4, E)), reverse=True)


@pytest.mark.parametrize("mode", MODES)
def test_unroll_does_not_change_the_result(mode):
    layers = make_layers(LSTM, num_layers=2, bidirectional=mode == "bidirectional")
    lengths = jnp.array([10, 7, 1])
    x = jnp.asarray(padded_batch([10, 7, 1], 10))
    results = [rnn(LSTM, layers, x, lengths, reverse=mode == "reverse", unroll=u) for u in (1, 2, 8)]
    for other in results[1:]:
        assert_trees_close(other, results[0], atol=1e-6, rtol=1e-6)


@needs_default_carry
@pytest.mark.parametrize("cell", [LSTM, GRU, LAYER_NORM_LSTM], ids=["lstm", "gru", "layer_norm"])
def test_five_thousand_steps_stay_finite(cell):
    layers = init_rnn(jax.random.key(0), cell, 16, 32)
    x = jax.random.normal(jax.random.key(1), (8, 5000, 16))
    y, (final,) = jax.jit(lambda layers, x: rnn(cell, layers, x))(layers, x)
    y = np.asarray(y)
    assert y.shape == (8, 5000, 32)
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= 1.0  # every one of these outputs is bounded by construction
    assert np.abs(y[:, -1]).max() > 1e-3  # and still alive at the end
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(final))
    np.testing.assert_array_equal(final.h, y[:, -1])


def test_projected_lstm_bidirectional_stack():
    proj = 3
    layers = make_layers(PROJECTED_LSTM, num_layers=2, bidirectional=True, proj_size=proj)
    assert layers[1]["fwd"]["w_x"].shape == (2 * proj, 4 * H)
    lengths = [5, 2]
    x = padded_batch(lengths, 5)
    y, finals = rnn(PROJECTED_LSTM, layers, jnp.asarray(x), jnp.array(lengths))
    assert y.shape == (2, 5, 2 * proj)
    for fwd, bwd in finals:
        for carry in (fwd, bwd):
            assert carry.h.shape == (2, proj) and carry.c.shape == (2, H)
    ref_y, ref_finals = ref_stack(PROJECTED_LSTM, layers, x, lengths)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert_trees_close(finals, ref_finals)
