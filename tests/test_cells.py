"""Tests for lstm_jax.cells: every cell against an independent float64 NumPy reference.

The references below are written from the papers' equations with explicit slicing,
and call nothing from lstm_jax. Parameters are random (every leaf, including
peephole weights and layer-norm scales and biases), so a swapped gate, a missing
bias or a peephole reading the wrong cell state shows up as a mismatch.
"""

import pydoc
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import sigmoid

import lstm_jax
from lstm_jax import CELLS, Carry, Cell, get_cell, output_size

E, H, B, T = 5, 6, 3, 6
P = H // 2  # LSTMP default projection size
LSTM_FAMILY = ("lstm", "peephole", "layer_norm", "lstmp")
WITH_CELL_STATE = ("lstm", "peephole", "cifg", "layer_norm", "lstmp")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """float32 matmuls everywhere (TF32 on a GPU would not meet the 1e-5 tolerance)."""
    with jax.default_matmul_precision("float32"):
        yield


# --------------------------------------------------------------------------- references


def chunks(v, n):
    """The ``n`` equal gate blocks along the last axis, by explicit slicing."""
    size = v.shape[-1] // n
    return [v[..., k * size : (k + 1) * size] for k in range(n)]


def layer_norm(v, scale, bias, groups, eps=1e-5):
    """Ba et al. 2016, per gate block as ``LAYER_NORM_LSTM`` documents (biased variance), then scale and shift."""
    out = []
    for block in chunks(v, groups):
        mu = block.mean(-1, keepdims=True)
        var = ((block - mu) ** 2).mean(-1, keepdims=True)
        out.append((block - mu) / np.sqrt(var + eps))
    return np.concatenate(out, -1) * scale + bias


def ref_lstm(p, h, c, x, m):
    i, f, g, o = chunks(x @ p["w_x"] + (h * m) @ p["w_h"] + p["b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    return h, c, h


def ref_peephole(p, h, c_prev, x, m):
    i, f, g, o = chunks(x @ p["w_x"] + (h * m) @ p["w_h"] + p["b"], 4)
    p_i, p_f, p_o = p["w_peep"][0], p["w_peep"][1], p["w_peep"][2]
    i = sigmoid(i + p_i * c_prev)
    f = sigmoid(f + p_f * c_prev)
    c = f * c_prev + i * np.tanh(g)
    o = sigmoid(o + p_o * c)  # the output gate peeks at the new cell state
    h = o * np.tanh(c)
    return h, c, h


def ref_cifg(p, h, c, x, m):
    f, g, o = chunks(x @ p["w_x"] + (h * m) @ p["w_h"] + p["b"], 3)
    f = sigmoid(f)
    c = f * c + (1.0 - f) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    return h, c, h


def ref_layer_norm(p, h, c, x, m):
    gx = layer_norm(x @ p["w_x"], p["ln_x_scale"], p["ln_x_bias"], 4)
    gh = layer_norm((h * m) @ p["w_h"], p["ln_h_scale"], p["ln_h_bias"], 4)
    i, f, g, o = chunks(gx + gh + p["b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(layer_norm(c, p["ln_c_scale"], p["ln_c_bias"], 1))
    return h, c, h


def ref_lstmp(p, r, c, x, m):
    i, f, g, o = chunks(x @ p["w_x"] + (r * m) @ p["w_h"] + p["b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    r = (sigmoid(o) * np.tanh(c)) @ p["w_proj"]
    return r, c, r


def ref_gru(p, h, _, x, m):
    wx_r, wx_z, wx_n = chunks(p["w_x"], 3)
    wh_r, wh_z, wh_n = chunks(p["w_h"], 3)
    b_r, b_z, b_n = chunks(p["b"], 3)
    hm = h * m
    r = sigmoid(x @ wx_r + b_r + hm @ wh_r)
    z = sigmoid(x @ wx_z + b_z + hm @ wh_z)
    n = np.tanh(x @ wx_n + b_n + r * (hm @ wh_n + p["b_hn"]))
    h = (1.0 - z) * n + z * h  # the interpolation uses the unmasked h
    return h, None, h


def ref_rnn(p, h, _, x, m):
    h = np.tanh(x @ p["w_x"] + (h * m) @ p["w_h"] + p["b"])
    return h, None, h


REFERENCES = {
    "lstm": ref_lstm,
    "peephole": ref_peephole,
    "cifg": ref_cifg,
    "layer_norm": ref_layer_norm,
    "lstmp": ref_lstmp,
    "gru": ref_gru,
    "rnn": ref_rnn,
}


# ----------------------------------------------------------------------------- helpers


def random_params(name, seed=0, scale=0.5, **options):
    """The cell's init, with every leaf replaced by ``scale * N(0, 1)`` (float32)."""
    params = get_cell(name).init(jax.random.key(seed), E, H, **options)
    rng = np.random.default_rng(seed + 100)
    return jax.tree.map(lambda w: jnp.asarray(scale * rng.standard_normal(w.shape), jnp.float32), params)


def as64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_carry(name, params, batch_shape, seed=1):
    """A random non-zero carry of the right shapes (c is None for GRU / RNN)."""
    rng = np.random.default_rng(seed)
    zeros = get_cell(name).init_carry(params, batch_shape)
    return jax.tree.map(lambda z: jnp.asarray(0.8 * rng.standard_normal(z.shape), jnp.float32), zeros)


def test_every_cell_has_a_reference():
    assert set(CELLS) == set(REFERENCES)


# ----------------------------------------------------------------- the equations themselves


@pytest.mark.parametrize("name", list(CELLS))
def test_step_matches_float64_reference_over_several_steps(name):
    cell = get_cell(name)
    params = random_params(name)
    carry = random_carry(name, params, (B,))
    xs = np.random.default_rng(2).standard_normal((T, B, E)).astype(np.float32)

    p64 = as64(params)
    h_ref = np.asarray(carry.h, np.float64)
    c_ref = None if carry.c is None else np.asarray(carry.c, np.float64)
    assert np.abs(h_ref).min() > 0  # a non-zero start exercises the recurrent weights at step 0

    step = jax.jit(cell.step)
    for t in range(T):
        carry, y = step(params, carry, jnp.asarray(xs[t]))
        h_ref, c_ref, y_ref = REFERENCES[name](p64, h_ref, c_ref, xs[t].astype(np.float64), 1.0)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} y, step {t}")
        np.testing.assert_allclose(carry.h, h_ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} h, step {t}")
        if name in WITH_CELL_STATE:
            np.testing.assert_allclose(carry.c, c_ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} c, step {t}")
        else:
            assert carry.c is None


@pytest.mark.parametrize("name", list(CELLS))
def test_recur_h_mask_masks_only_the_recurrent_matmul(name):
    """``h_mask`` multiplies h where it enters ``w_h`` (GRU: not in its ``z * h`` interpolation)."""
    cell = get_cell(name)
    params = random_params(name, seed=3)
    carry = random_carry(name, params, (B,), seed=4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, E)).astype(np.float32)
    mask = ((rng.random(carry.h.shape) < 0.6) / 0.6).astype(np.float32)
    assert 0 < (mask == 0).sum() < mask.size

    new_carry, y = cell.recur(params, carry, cell.project(params, jnp.asarray(x)), h_mask=jnp.asarray(mask))
    c64 = None if carry.c is None else np.asarray(carry.c, np.float64)
    h_ref, c_ref, y_ref = REFERENCES[name](as64(params), np.asarray(carry.h, np.float64), c64, x.astype(np.float64), mask)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(new_carry.h, h_ref, rtol=RTOL, atol=ATOL)
    if c_ref is not None:
        np.testing.assert_allclose(new_carry.c, c_ref, rtol=RTOL, atol=ATOL)
    # and the mask really changes something
    _, y_unmasked = cell.step(params, carry, jnp.asarray(x))
    assert np.abs(np.asarray(y_unmasked) - np.asarray(y)).max() > 1e-3


@pytest.mark.parametrize("name", list(CELLS))
def test_every_parameter_reaches_the_output(name):
    """Each leaf of the params dict has a non-zero gradient (none is silently unused)."""
    cell = get_cell(name)
    params = random_params(name, seed=6)
    carry = random_carry(name, params, (B,), seed=7)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((B, E)), jnp.float32)

    def loss(p):
        c1, y1 = cell.step(p, carry, x)
        _, y2 = cell.step(p, c1, x)
        return jnp.sum(y2 * jnp.arange(1, y2.shape[-1] + 1))

    grads = jax.jit(jax.grad(loss))(params)
    for key, g in grads.items():
        assert np.all(np.isfinite(g)), key
        assert np.abs(np.asarray(g)).max() > 0, f"{name}: {key} has zero gradient"


# ------------------------------------------------------------------------------ init


@pytest.mark.parametrize("name", LSTM_FAMILY + ("cifg",))
def test_forget_gate_bias_is_one_and_other_biases_zero(name):
    params = get_cell(name).init(jax.random.key(0), E, H)
    num_gates = 3 if name == "cifg" else 4
    forget = 0 if name == "cifg" else 1  # the CIFG's gates are f, g, o
    b = np.asarray(params["b"])
    assert b.shape == (num_gates * H,)
    for k, block in enumerate(chunks(b, num_gates)):
        np.testing.assert_array_equal(block, 1.0 if k == forget else 0.0)


@pytest.mark.parametrize("name", LSTM_FAMILY + ("cifg",))
def test_forget_bias_option(name):
    params = get_cell(name).init(jax.random.key(0), E, H, forget_bias=2.5)
    num_gates = 3 if name == "cifg" else 4
    forget = 0 if name == "cifg" else 1
    np.testing.assert_array_equal(chunks(np.asarray(params["b"]), num_gates)[forget], 2.5)
    assert np.asarray(params["b"]).sum() == 2.5 * H


@pytest.mark.parametrize("name", ["gru", "rnn"])
def test_baseline_biases_start_at_zero(name):
    params = get_cell(name).init(jax.random.key(0), E, H)
    np.testing.assert_array_equal(params["b"], 0.0)
    if name == "gru":
        np.testing.assert_array_equal(params["b_hn"], 0.0)


NUM_GATES = {"lstm": 4, "peephole": 4, "cifg": 3, "layer_norm": 4, "lstmp": 4, "gru": 3, "rnn": 1}


@pytest.mark.parametrize("name", list(CELLS))
def test_recurrent_kernel_is_orthogonal_per_gate(name):
    hidden = H
    params = get_cell(name).init(jax.random.key(1), E, hidden)
    w_h = np.asarray(params["w_h"], np.float64)
    n = NUM_GATES[name]
    rows = hidden // 2 if name == "lstmp" else hidden
    assert w_h.shape == (rows, n * hidden)
    blocks = chunks(w_h, n)
    for block in blocks:
        # square: W^T W = I; LSTMP's (P x H) block with P < H has orthonormal rows: W W^T = I
        gram = block @ block.T if name == "lstmp" else block.T @ block
        np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-5)
    for a in range(n):  # each gate gets its own matrix
        for b in range(a + 1, n):
            assert not np.allclose(blocks[a], blocks[b])


@pytest.mark.parametrize("name", list(CELLS))
def test_input_kernel_is_lecun_normal(name):
    fan_in, hidden = 400, H
    w_x = np.asarray(get_cell(name).init(jax.random.key(2), fan_in, hidden)["w_x"])
    assert w_x.shape == (fan_in, NUM_GATES[name] * hidden)
    assert abs(w_x.mean()) < 0.01
    assert w_x.std() == pytest.approx(1.0 / np.sqrt(fan_in), rel=0.1)


def test_variant_specific_init():
    peep = get_cell("peephole").init(jax.random.key(0), E, H)
    np.testing.assert_array_equal(peep["w_peep"], np.zeros((3, H)))
    ln = get_cell("layer_norm").init(jax.random.key(0), E, H)
    for part, size in (("x", 4 * H), ("h", 4 * H), ("c", H)):
        np.testing.assert_array_equal(ln[f"ln_{part}_scale"], np.ones(size))
        np.testing.assert_array_equal(ln[f"ln_{part}_bias"], np.zeros(size))


def test_init_is_deterministic_in_the_key():
    for name, cell in CELLS.items():
        a, b, c = (cell.init(jax.random.key(k), E, H) for k in (0, 0, 1))
        jax.tree.map(np.testing.assert_array_equal, a, b)
        assert not np.array_equal(a["w_h"], c["w_h"]), name


def test_init_low_precision_dtype_option():
    for name, cell in CELLS.items():
        params = cell.init(jax.random.key(0), E, H, dtype=jnp.bfloat16)
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params)), name
        assert cell.init_carry(params, (2,)).h.dtype == jnp.bfloat16, name


# ---------------------------------------------------------------------- carry and shapes


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 4)])
def test_init_carry_shapes_and_dtypes(name, batch_shape):
    cell = get_cell(name)
    params = cell.init(jax.random.key(0), E, H)
    carry = cell.init_carry(params, batch_shape)
    assert isinstance(carry, Carry)
    r = P if name == "lstmp" else H
    assert carry.h.shape == (*batch_shape, r) and carry.h.dtype == jnp.float32
    np.testing.assert_array_equal(carry.h, 0.0)
    if name in WITH_CELL_STATE:
        assert carry.c.shape == (*batch_shape, H) and carry.c.dtype == jnp.float32
        np.testing.assert_array_equal(carry.c, 0.0)
    else:
        assert carry.c is None
    assert output_size(params) == r
    # the default batch shape is ()
    assert cell.init_carry(params).h.shape == (r,)


@pytest.mark.parametrize("name", list(CELLS))
def test_step_on_unbatched_batched_and_two_batch_dims(name):
    cell = get_cell(name)
    params = random_params(name, seed=9)
    b1, b2 = 2, 3
    carry = random_carry(name, params, (b1, b2), seed=10)
    x = jnp.asarray(np.random.default_rng(11).standard_normal((b1, b2, E)), jnp.float32)
    r = output_size(params)

    carry2, y2 = cell.step(params, carry, x)  # (B1, B2, E)
    assert y2.shape == (b1, b2, r)

    flat_carry = jax.tree.map(lambda a: a.reshape(b1 * b2, -1), carry)
    carry1, y1 = cell.step(params, flat_carry, x.reshape(b1 * b2, E))  # (B, E)
    assert y1.shape == (b1 * b2, r)
    np.testing.assert_allclose(y2.reshape(b1 * b2, r), y1, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-6, atol=1e-7), carry2, carry1)

    for k in range(b1 * b2):  # x_E, one example at a time
        one_carry = jax.tree.map(lambda a: a[k], flat_carry)
        c0, y0 = cell.step(params, one_carry, x.reshape(b1 * b2, E)[k])
        assert y0.shape == (r,)
        np.testing.assert_allclose(y0, y1[k], rtol=1e-6, atol=1e-7)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[k], rtol=1e-6, atol=1e-7), c0, carry1)


@pytest.mark.parametrize("name", list(CELLS))
def test_vmap_over_unbatched_step_equals_batched_step(name):
    cell = get_cell(name)
    params = random_params(name, seed=12)
    carry = random_carry(name, params, (B,), seed=13)
    x = jnp.asarray(np.random.default_rng(14).standard_normal((B, E)), jnp.float32)
    carry_v, y_v = jax.vmap(cell.step, in_axes=(None, 0, 0))(params, carry, x)
    carry_b, y_b = cell.step(params, carry, x)
    np.testing.assert_allclose(y_v, y_b, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), carry_v, carry_b)


@pytest.mark.parametrize("name", list(CELLS))
def test_jit_equals_no_jit(name):
    cell = get_cell(name)
    params = random_params(name, seed=15)
    carry = random_carry(name, params, (B,), seed=16)
    x = jnp.asarray(np.random.default_rng(17).standard_normal((B, E)), jnp.float32)
    carry_j, y_j = jax.jit(cell.step)(params, carry, x)
    carry_e, y_e = cell.step(params, carry, x)
    np.testing.assert_allclose(y_j, y_e, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), carry_j, carry_e)


@pytest.mark.parametrize("name", list(CELLS))
def test_project_over_sequence_equals_per_step_projection(name):
    cell = get_cell(name)
    params = random_params(name, seed=18)
    x_TBE = jnp.asarray(np.random.default_rng(19).standard_normal((T, B, E)), jnp.float32)
    xp_TBG = cell.project(params, x_TBE)
    assert xp_TBG.shape == (T, B, params["w_x"].shape[1])
    for t in range(T):
        np.testing.assert_allclose(xp_TBG[t], cell.project(params, x_TBE[t]), rtol=1e-6, atol=1e-6)
    # step is recur after project
    carry = random_carry(name, params, (B,), seed=20)
    ya = cell.step(params, carry, x_TBE[0])[1]
    yb = cell.recur(params, carry, xp_TBG[0])[1]
    np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ lookup, LSTMP


def test_get_cell_returns_registered_cells():
    for name, cell in CELLS.items():
        assert get_cell(name) is cell
    assert lstm_jax.LSTM is CELLS["lstm"] and lstm_jax.GRU is CELLS["gru"]
    assert lstm_jax.PROJECTED_LSTM is CELLS["lstmp"] and lstm_jax.VANILLA_RNN is CELLS["rnn"]


def test_get_cell_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown cell 'lsmt'") as info:
        get_cell("lsmt")
    for name in CELLS:
        assert name in str(info.value)


@pytest.mark.parametrize("proj_size", [None, 4])
def test_lstmp_proj_size(proj_size):
    cell = get_cell("lstmp")
    p = proj_size or H // 2
    params = cell.init(jax.random.key(0), E, H, **({} if proj_size is None else {"proj_size": proj_size}))
    assert params["w_x"].shape == (E, 4 * H)
    assert params["w_h"].shape == (p, 4 * H)
    assert params["w_proj"].shape == (H, p)
    assert output_size(params) == p
    carry = cell.init_carry(params, (B,))
    assert carry.h.shape == (B, p) and carry.c.shape == (B, H)
    carry, y = cell.step(params, carry, jnp.ones((B, E)))
    assert y.shape == (B, p) and carry.h.shape == (B, p) and carry.c.shape == (B, H)
    np.testing.assert_array_equal(y, carry.h)


def test_lstmp_without_room_for_a_projection_is_refused_not_resized():
    """proj_size 0 was silently replaced by hidden_size // 2, and hidden_size 1 crashed inside the initialiser."""
    cell = get_cell("lstmp")
    with pytest.raises(ValueError, match="proj_size >= 1, got 0$"):
        cell.init(jax.random.key(0), E, H, proj_size=0)
    with pytest.raises(ValueError, match=r"got 0 \(hidden_size 1 // 2\); pass proj_size, or hidden_size >= 2"):
        cell.init(jax.random.key(0), E, 1)
    assert cell.init(jax.random.key(0), E, 1, proj_size=1)["w_proj"].shape == (1, 1)


def test_lstmp_with_custom_proj_size_matches_reference():
    name = "lstmp"
    params = random_params(name, seed=21, proj_size=4)
    carry = random_carry(name, params, (B,), seed=22)
    x = np.random.default_rng(23).standard_normal((B, E)).astype(np.float32)
    new, y = get_cell(name).step(params, carry, jnp.asarray(x))
    h_ref, c_ref, _ = ref_lstmp(as64(params), np.asarray(carry.h, np.float64), np.asarray(carry.c, np.float64), x, 1.0)
    assert y.shape == (B, 4)
    np.testing.assert_allclose(new.h, h_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(new.c, c_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(CELLS))
def test_each_cell_shows_its_own_docstring_in_help(name):
    """``help(lj.LSTM)`` and ``lj.LSTM?`` read the instance's docstring: each cell's cites its paper, not Cell's
    generic text, and keeps it through ``_replace``."""
    cell = CELLS[name]
    assert isinstance(cell, Cell) and cell.__doc__ != Cell.__doc__
    assert re.search(r"(19|20)\d\d", cell.__doc__)
    assert cell._replace(sequence=None).__doc__ == cell.__doc__
    assert cell.__doc__.splitlines()[0] in pydoc.render_doc(cell, renderer=pydoc.plaintext)
