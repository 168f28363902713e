"""The CPU kernel of ``lstm_jax.native`` against the ``lax.scan`` loops of ``lstm_jax.fused``.

``test_fused.py`` checks the same kernel (it is what ``fused`` runs on CPU for float32)
against autodiff of the plain scan over ``LSTM.recur`` at small sizes. These tests use
sizes that exercise every partial tile of the kernel (hidden units that are not a
multiple of a vector or a panel, rows that are not a multiple of a register tile, a
depth longer than one depth block) and check what only the kernel has: its
dispatch, its threads and its fallback.
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rnn_fixtures import sigmoid

from lstm_jax import native
from lstm_jax.cells import Carry
from lstm_jax.data import Batch
from lstm_jax.fused import lstm_sequence
from lstm_jax.model import ModelConfig, init_classifier
from lstm_jax.parallel import usable_cores
from lstm_jax.train import classifier_loss

T, N, E, H = 9, 13, 37, 70  # 13 rows: 6 + 6 + 1 or 8 + 5 in register tiles; 4H = 280 columns: 17.5 or 8.75 panels
LENGTHS = (9, 1, 4, 0, 9, 2, 7, 9, 3, 5, 8, 6, 9)

pytestmark = pytest.mark.skipif(not native.load(), reason="the CPU kernel could not be built here")


def problem(seed=0, input_size=E, hidden_size=H):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
    params = dict(
        w_x=normal(input_size, 4 * hidden_size), w_h=normal(hidden_size, 4 * hidden_size), b=normal(4 * hidden_size)
    )
    x = normal(T, N, input_size)
    carry = Carry(normal(N, hidden_size), normal(N, hidden_size))
    valid = jnp.arange(T)[:, None] < jnp.array(LENGTHS)[None, :]
    mask = jnp.asarray(rng.random((N, hidden_size)) < 0.7, jnp.float32) / 0.7
    return params, x, carry, valid, mask


def value_and_grads(options, mode, monkeypatch, threads=None):
    """Value and gradient of a loss over every output and the final carry, with the kernel on ("1") or off ("0")."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", mode)
    if threads is not None:
        monkeypatch.setenv("LSTM_JAX_NUM_THREADS", str(threads))
    params, x, carry, valid, mask = problem()

    def loss(params, x, carry):
        final, y = lstm_sequence(
            params,
            x,
            carry=carry,
            valid_T=valid if options["lengths"] else None,
            h_mask=mask if options["mask"] else None,
            reverse=options["reverse"],
        )
        weights = jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(final.h)) + jnp.sum(final.c**2)

    # a new function object per call, so that jit traces again under the environment just set; done before the
    # caller changes the environment again, which the kernel reads (getenv) while it runs
    return jax.block_until_ready(jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1, 2)))(params, x, carry))


OPTIONS = [
    dict(lengths=False, mask=False, reverse=False),
    dict(lengths=True, mask=False, reverse=False),
    dict(lengths=True, mask=True, reverse=True),
    dict(lengths=False, mask=True, reverse=False),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
def test_kernel_matches_the_scan_loops(options, monkeypatch):
    kernel = value_and_grads(options, "1", monkeypatch)
    scan = value_and_grads(options, "0", monkeypatch)
    for a, e in zip(jax.tree.leaves(kernel), jax.tree.leaves(scan), strict=True):
        # float32 sums over 117 rows in two orders: both sit about 3e-5 from a float64 run, far below any bug
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))


def test_gradients_of_gradients_match_the_scan_loops(monkeypatch):
    """A gradient of a gradient (here of the input gradient's norm): the kernel's calls carry derivatives of their own."""
    params, x, carry, valid, mask = problem(seed=2)

    def input_gradient_norm(params, x):
        loss = lambda x: jnp.sum(jnp.tanh(lstm_sequence(params, x, carry=carry, valid_T=valid, h_mask=mask)[1]))
        return jnp.sum(jax.grad(loss)(x) ** 2)

    results = {}
    for mode in "10":
        monkeypatch.setenv("LSTM_JAX_NATIVE", mode)
        second_order = jax.jit(jax.value_and_grad(lambda *a: input_gradient_norm(*a), argnums=(0, 1)))
        results[mode] = jax.block_until_ready(second_order(params, x))  # before the next setenv
        if mode == "1":
            assert native.TARGETS["backward"] in second_order.lower(params, x).as_text()
    for a, e in zip(jax.tree.leaves(results["1"]), jax.tree.leaves(results["0"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))


def test_an_input_gradient_with_the_weights_held_constant_skips_the_weight_gradients(monkeypatch):
    """Adversarial training's direction: the gradient with respect to the inputs only. Its backward call is told
    that no weight gradient is wanted, and its input gradient has the same bits as the full backward pass's."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    params, x, carry, valid, mask = problem(seed=3)
    loss = lambda p, x: jnp.sum(jnp.tanh(lstm_sequence(p, x, carry=carry, valid_T=valid, h_mask=mask)[1]))
    input_only = jax.jit(jax.grad(lambda x: loss(params, x)))
    both = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "weights = 0" in input_only.lower(x).as_text() and "weights = 1" in both.lower(params, x).as_text()
    dparams, dx = both(params, x)
    np.testing.assert_array_equal(np.asarray(input_only(x)), np.asarray(dx))
    assert all(float(jnp.abs(d).max()) > 0 for d in jax.tree.leaves(dparams))


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    options = dict(lengths=True, mask=True, reverse=False)
    runs = [value_and_grads(options, "1", monkeypatch, threads) for threads in (1, 2, 3)]
    for other in runs[1:]:
        for a, e in zip(jax.tree.leaves(other), jax.tree.leaves(runs[0]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("where", ["bias", "input"])
def test_a_nan_comes_out_where_the_scan_loops_put_it(where, monkeypatch):
    """A NaN in a gate's pre-activation must reach the loss and the gradients, which the train step checks for
    finiteness: the kernel's exp once clamped NaN to 88, so its sigmoid and tanh returned finite numbers."""
    params, x, carry, valid, mask = problem(seed=3)
    if where == "bias":
        params = {**params, "b": params["b"].at[5].set(jnp.nan)}
    else:
        x = x.at[2, 4, 7].set(jnp.nan)

    def loss(params, x):
        final, y = lstm_sequence(params, x, carry=carry, valid_T=valid, h_mask=mask)
        return jnp.sum(y**2) + jnp.sum(final.c), y

    results = {}
    for mode in "10":
        monkeypatch.setenv("LSTM_JAX_NATIVE", mode)
        # done before the next setenv: the kernel reads the environment (getenv) while it runs
        results[mode] = jax.block_until_ready(
            jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1), has_aux=True))(params, x))
    (kernel_loss, kernel_y), _ = results["1"]
    assert np.isnan(kernel_loss) and np.isnan(results["0"][0][0])
    assert 0 < np.isnan(kernel_y).sum() < kernel_y.size  # padded steps emit 0, as in the scan loops
    for a, e in zip(jax.tree.leaves(results["1"]), jax.tree.leaves(results["0"]), strict=True):
        np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(e)))


def test_inference_outputs_equal_the_training_forward(monkeypatch):
    """The forward pass without saved activations (no gradient taken) gives the same bits as the one that saves them."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    params, x, carry, valid, _ = problem(seed=1)
    run = lambda p: lstm_sequence(p, x, carry=carry, valid_T=valid)
    inference = jax.jit(run)(params)
    training = jax.jit(lambda p: jax.vjp(run, p)[0])(params)  # the forward pass that saves the gate activations
    for a, e in zip(jax.tree.leaves(training), jax.tree.leaves(inference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_the_backward_call_leaves_activations_that_are_read_again_intact():
    """The backward call writes dz over the gate activations; where the program reads them again, XLA must copy."""
    params, x, carry, valid, mask = problem(seed=2)
    forward = lambda: native.forward(False, True, params["w_x"], params["w_h"], params["b"], x, *carry, valid, mask)
    _, _, acts_expected, _, _ = jax.jit(forward)()

    @jax.jit
    def backward_then_reuse():
        h_last, c_last, acts, h_all, c_all = forward()
        dz = native.backward(False, params["w_x"], params["w_h"], x, *carry, acts, h_all, c_all, h_all,
                             jnp.ones_like(h_last), jnp.ones_like(c_last), valid, mask)[0]  # fmt: skip
        return dz, acts * 1.0  # read after the call that aliases them

    dz, acts_after = backward_then_reuse()
    np.testing.assert_array_equal(np.asarray(acts_after), np.asarray(acts_expected))
    assert not np.array_equal(np.asarray(dz), np.asarray(acts_expected))  # the call did write its own result


def test_adversarial_training_runs_every_lstm_pass_in_the_kernel(monkeypatch):
    """Both perturbations' directions are taken with the parameters held constant, so the classifier's
    gradient needs no second derivatives: no lax.scan is traced. (That the gradient is the same as with
    the directions differentiated through is checked in test_train.py.)"""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    config = ModelConfig(embed_dim=8, hidden_size=12, bidirectional=True, adversarial_epsilon=0.3, vat_epsilon=0.3)
    params = init_classifier(jax.random.key(0), config, 30, 3)
    batch = Batch(jnp.ones((4, 5), jnp.int32), jnp.array([5, 3, 1, 4]), jnp.array([0, 2, 1, 1]), jnp.ones(4))
    gradient = jax.grad(lambda p: classifier_loss(p, config, batch, jax.random.key(1))[0])
    jaxpr = str(jax.make_jaxpr(gradient)(params))
    assert " scan[" not in jaxpr
    # per direction: the clean loss, its input gradient, the adversarial loss, the power iteration, the VAT loss
    assert jaxpr.count(native.TARGETS["backward"]) == 2 * 5
    # the input gradient and the power iteration hold the parameters constant: no weight gradients
    assert jaxpr.count("'weights', 0") == 2 * 2 and jaxpr.count("'weights', 1") == 2 * 3


def lowered_text(dtype, monkeypatch, mode="1"):
    monkeypatch.setenv("LSTM_JAX_NATIVE", mode)
    params, x, carry, _, _ = problem()
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    loss = lambda p, x: jnp.sum(lstm_sequence(p, x, carry=cast(carry))[1])
    return jax.jit(jax.grad(lambda *a: loss(*a))).lower(cast(params), cast(x)).as_text()


def test_kernel_runs_for_float32_on_cpu_and_for_bfloat16_only_where_it_has_amx(monkeypatch):
    text = lowered_text(jnp.float32, monkeypatch)
    assert native.TARGETS["forward"] in text and native.TARGETS["backward"] in text and "bf16 = 0" in text
    bf16_text = lowered_text(jnp.bfloat16, monkeypatch)
    assert (native.TARGETS["forward"] in bf16_text) == native.bf16_supported()
    assert native.TARGETS["forward"] not in lowered_text(jnp.float16, monkeypatch)
    assert native.TARGETS["forward"] not in lowered_text(jnp.float32, monkeypatch, mode="0")


def test_disabled_traces_with_the_scan_loops_inside_the_block_only(monkeypatch):
    with native.disabled():
        assert native.TARGETS["forward"] not in lowered_text(jnp.float32, monkeypatch)
    assert native.TARGETS["forward"] in lowered_text(jnp.float32, monkeypatch)


def test_a_pullback_runs_where_its_forward_pass_ran(monkeypatch):
    """The backward rule follows the forward rule's choice, whatever holds when the pullback is traced."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    params, x, carry, valid, _ = problem()
    loss = lambda p: jnp.sum(lstm_sequence(p, x, carry=carry, valid_T=valid)[1] ** 2)
    with native.disabled():
        _, scan_pullback = jax.vjp(loss, params)
    assert native.TARGETS["backward"] not in str(jax.make_jaxpr(scan_pullback)(1.0))
    _, kernel_pullback = jax.vjp(loss, params)
    with native.disabled():
        assert native.TARGETS["backward"] in str(jax.make_jaxpr(kernel_pullback)(1.0))
    for a, e in zip(jax.tree.leaves(kernel_pullback(1.0)), jax.tree.leaves(scan_pullback(1.0)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))


def test_lengths_mask_of_integers_runs_in_the_kernel_as_booleans(monkeypatch):
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    params, x, carry, valid, _ = problem()
    run = lambda valid: jax.jit(lambda p: lstm_sequence(p, x, carry=carry, valid_T=valid))(params)
    for a, e in zip(jax.tree.leaves(run(valid.astype(jnp.int32))), jax.tree.leaves(run(valid)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_kernel_under_vmap_matches_a_loop(monkeypatch):
    """``vmap`` (the ensemble's) runs the kernel once per member."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    members = [problem(seed) for seed in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[(p, x, c) for p, x, c, _, _ in members])
    run = lambda p, x, c: jax.grad(lambda p: jnp.sum(lstm_sequence(p, x, carry=c)[1] ** 2))(p)
    batched = jax.jit(jax.vmap(run))(*stacked)
    for k, (p, x, c, _, _) in enumerate(members):
        for a, e in zip(jax.tree.leaves(batched), jax.tree.leaves(jax.jit(run)(p, x, c)), strict=True):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_without_a_compiler_the_scan_loops_run_after_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*LSTM_JAX_NATIVE=0"):
            assert not native.enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is given once, not on every trace
            assert not native.enabled()
            assert native.TARGETS["forward"] not in lowered_text(jnp.float32, monkeypatch)
    finally:
        native.load.cache_clear()


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU LSTM kernel could not be built"):
            assert not native.load()
        assert not list(tmp_path.glob("*.so"))
    finally:
        native.load.cache_clear()


def test_a_compiler_command_with_arguments_builds(monkeypatch, tmp_path):
    """``CXX="ccache g++"``: the command is split, not run as one program name."""
    monkeypatch.setenv("LSTM_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", f"env LSTM_JAX_UNUSED=1 {native._compiler_on_path()}")
    native.load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load()
        assert len(list(tmp_path.glob("lstm_cpu-*.so"))) == 1
    finally:
        native.load.cache_clear()


def test_a_failed_build_names_the_first_error_line_not_the_caret():
    error = subprocess.CalledProcessError(1, ["c++"], stderr="lstm_cpu.cc: In function 'f':\nlstm_cpu.cc:3:5: error: "
                                          "'lanes' was not declared\n    3 |   lanes\n      |   ^\n")
    assert native._first_error(error) == "lstm_cpu.cc:3:5: error: 'lanes' was not declared"
    assert native._first_error(FileNotFoundError("no C++ compiler found (set CXX)")) == "no C++ compiler found (set CXX)"


def test_the_build_cache_key_holds_the_cpu_the_compiler_targets(monkeypatch):
    """Two CPUs with other ISA extensions get other builds, on x86 and Arm alike: the key holds the macros that
    -march=native predefines (such as __AVX2__ or __ARM_FEATURE_SVE), beyond those of the compiler's default target."""
    monkeypatch.delenv("CXX", raising=False)
    compiler = native._compiler()
    baseline = subprocess.run([*compiler, "-E", "-dM", "-x", "c++", os.devnull], capture_output=True, text=True).stdout
    native_only = set(native._cpu_signature(compiler).splitlines()) - set(baseline.splitlines())
    assert any(line.startswith("#define __") for line in native_only), "no macro of -march=native in the key"
    monkeypatch.setattr(native, "_cpu_signature", lambda compiler: "#define __AVX512F__ 1\n")
    other_cpu = native.library_path(compiler)
    monkeypatch.setattr(native, "_cpu_signature", lambda compiler: "#define __AVX2__ 1\n")
    assert native.library_path(compiler) != other_cpu


def test_an_unreadable_cxx_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", 'g++ "')  # shlex cannot split it
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built or loaded.*No closing quotation"):
            assert not native.load()
    finally:
        native.load.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("LSTM_JAX_CXXFLAGS")), reason="already the build under test")
@pytest.mark.parametrize("lanes", [8, 16])
def test_both_vector_layouts_pass_these_tests_too(lanes, tmp_path):
    """The kernel takes 16-float vectors, 32-column panels and 8-row tiles where the CPU has AVX-512, and 8-float
    vectors, 16-column panels and 6-row tiles elsewhere. Each layout is built here from generic vectors, whatever
    this CPU has, and this file's comparisons run against it."""
    env = {**os.environ, "LSTM_JAX_CXXFLAGS": f"-DLSTM_JAX_LANES={lanes}", "LSTM_JAX_CACHE": str(tmp_path)}
    tests = "matches_the_scan_loops or thread_count or inference or gradients_of_gradients or bf16"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{7 + 4 * native.bf16_supported()} passed" in run.stdout, run.stdout[-1000:]
    assert len(list(tmp_path.glob("lstm_cpu-*.so"))) == 1  # the layout's own build, not one from the shared cache


# bfloat16 products (AMX). The references below are float64 NumPy, with each matmul operand rounded to bfloat16 by
# ml_dtypes (not by the kernel's own rounding), fed the kernel's previous state at each step: the rounding of a
# state that straddles two bfloat16 numbers then cannot tell a float64 run from a float32 one. Every result agrees
# to float32 precision (about 1e-6); the float32 kernel, whose products are not rounded, misses by 1e-2.
needs_bf16 = pytest.mark.skipif(not native.bf16_supported(), reason="the kernel has no bfloat16 products here (AMX)")


def rounded(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)


def as64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def bf16_problem(seed):
    params, x, carry, _, mask = problem(seed)
    forward = native.forward(False, True, params["w_x"], params["w_h"], params["b"], x, *carry, None, mask, bf16=True)
    return params, x, carry, mask, forward


def forward_errors(params, x, carry, mask, forward):
    """The largest differences of every step's h, c and gates from a float64 step with rounded operands."""
    _, _, acts, h_seq, c_seq = as64(*forward)
    w_x, w_h, b, x, h0, c0, mask = as64(params["w_x"], params["w_h"], params["b"], x, *carry, mask)
    errors = np.zeros(3)
    for t in range(T):
        h_prev, c_prev = (h0, c0) if t == 0 else (h_seq[t - 1], c_seq[t - 1])
        i, f, g, o = np.split(rounded(x[t]) @ rounded(w_x) + rounded(h_prev * mask) @ rounded(w_h) + b, 4, axis=-1)
        c = sigmoid(f) * c_prev + sigmoid(i) * np.tanh(g)
        gates = np.concatenate([sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)], axis=-1)
        step = [sigmoid(o) * np.tanh(c) - h_seq[t], c - c_seq[t], gates - acts[t]]
        errors = np.maximum(errors, [np.abs(e).max() for e in step])
    return errors


@needs_bf16
def test_bf16_forward_rounds_every_matmul_operand_and_nothing_else():
    params, x, carry, mask, forward = bf16_problem(seed=4)
    assert forward_errors(params, x, carry, mask, forward).max() < 5e-6
    float32 = native.forward(False, True, params["w_x"], params["w_h"], params["b"], x, *carry, None, mask)
    assert forward_errors(params, x, carry, mask, float32).max() > 1e-3  # the reference does tell the two apart


@needs_bf16
def test_bf16_backward_rounds_every_matmul_operand_and_nothing_else():
    params, x, carry, mask, (_, _, acts, h_seq, c_seq) = bf16_problem(seed=5)
    rng = np.random.default_rng(6)
    dy, dh, dc = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((T, N, H), (N, H), (N, H)))
    grads = native.backward(False, params["w_x"], params["w_h"], x, *carry, acts, h_seq, c_seq, dy, dh, dc, None,
                            mask, bf16=True)  # fmt: skip
    dz, dx, dw_x, dw_h, dh0, dc0 = as64(*grads)
    acts, h_seq, c_seq, w_x, w_h, x, h0, c0, mask, dy = as64(acts, h_seq, c_seq, params["w_x"], params["w_h"], x,
                                                              *carry, mask, dy)  # fmt: skip
    dh_carry, dc_carry = as64(dh, dc)
    for t in reversed(range(T)):  # dz from the float64 recursion, fed the kernel's dz of the step after
        i, f, g, o = np.split(acts[t], 4, axis=-1)
        tanh_c, c_prev = np.tanh(c_seq[t]), c0 if t == 0 else c_seq[t - 1]
        dh_new = dh_carry + dy[t]
        dc_new = dc_carry + dh_new * o * (1 - tanh_c**2)
        dz_t = [dc_new * g * i * (1 - i), dc_new * c_prev * f * (1 - f), dc_new * i * (1 - g**2),
                dh_new * tanh_c * o * (1 - o)]  # fmt: skip
        np.testing.assert_allclose(dz[t], np.concatenate(dz_t, axis=-1), rtol=1e-5, atol=1e-6)
        dh_carry, dc_carry = (rounded(dz[t]) @ rounded(w_h).T) * mask, dc_new * f
    h_in = np.concatenate([h0[None], h_seq[:-1]]) * mask
    expected = {
        "dx": (dx, rounded(dz) @ rounded(w_x).T),
        "dw_x": (dw_x, np.einsum("tne,tng->eg", rounded(x), rounded(dz))),
        "dw_h": (dw_h, np.einsum("tnh,tng->hg", rounded(h_in), rounded(dz))),
        "dh0": (dh0, dh_carry),
        "dc0": (dc0, dc_carry),
    }
    for name, (actual, reference) in expected.items():
        np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max(), err_msg=name)


@needs_bf16
def test_bf16_through_lstm_sequence_tracks_float32_in_bfloat16_dtypes(monkeypatch):
    """The plumbing of lstm_jax.fused: bfloat16 operands run in the kernel, with lengths, a mask and reverse, and
    return bfloat16 values and gradients within bfloat16's rounding of the float32 ones."""
    monkeypatch.setenv("LSTM_JAX_NATIVE", "1")
    params, x, carry, valid, mask = problem(seed=7)
    to_bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)

    def loss(params, x, carry):
        final, y = lstm_sequence(params, x, carry=carry, valid_T=valid, h_mask=mask.astype(x.dtype), reverse=True)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final.c.astype(jnp.float32))

    gradient = lambda *a: jax.value_and_grad(loss, argnums=(0, 1, 2))(*a)
    low_args = to_bf16((params, x, carry))
    assert native.TARGETS["backward"] in jax.jit(gradient).lower(*low_args).as_text()
    low, high = jax.jit(gradient)(*low_args), jax.jit(gradient)(params, x, carry)
    for a, e in zip(jax.tree.leaves(low), jax.tree.leaves(high), strict=True):
        assert a.dtype == (jnp.float32 if a.ndim == 0 else jnp.bfloat16)
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.linalg.norm(a - e) < 0.05 * np.linalg.norm(e)  # 2-3.5 % here; the bfloat16 scan loops: 2.5-4 %


@needs_bf16
def test_bf16_results_do_not_depend_on_the_thread_count(monkeypatch):
    params, x, carry, _, mask = problem(seed=8)
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setenv("LSTM_JAX_NUM_THREADS", str(threads))
        forward = native.forward(False, True, params["w_x"], params["w_h"], params["b"], x, *carry, None, mask,
                                 bf16=True)  # fmt: skip
        _, _, acts, h_seq, c_seq = forward
        ones = jnp.ones_like(h_seq)
        runs.append(jax.block_until_ready(forward + native.backward(
            False, params["w_x"], params["w_h"], x, *carry, acts, h_seq, c_seq, ones, ones[0], ones[0], None, mask,
            bf16=True)))  # fmt: skip  (done before the next setenv: the kernel reads it while it runs)
    for other in runs[1:]:
        for a, e in zip(other, runs[0], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("setting, expected", [("1", 1), ("2", 2), ("abc", None), ("0", None), ("-3", None),
                                               (" 2", None), ("", None), ("99999999999", None)])  # fmt: skip
def test_lstm_jax_num_threads_takes_only_a_whole_number_of_one_or_more(setting, expected, monkeypatch):
    """Anything else means every usable core, the documented default (``atol`` read "abc", "0" and "-3" as one
    thread, about half the speed on 2 cores)."""
    if not native.load():
        pytest.skip("no C++ compiler here: the kernel is not built")
    monkeypatch.setenv("LSTM_JAX_NUM_THREADS", setting)
    assert native.thread_count(4096) == (expected or usable_cores())  # 4096 units: vectors for 256 threads or more


def test_a_num_threads_setting_that_is_not_a_whole_number_is_warned_of_once():
    code = "import lstm_jax.native as n; n.load(); n.load()"
    env = {**os.environ, "LSTM_JAX_NUM_THREADS": "two"}
    stderr = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert stderr.count("LSTM_JAX_NUM_THREADS='two' is not a whole number >= 1") == 1

