"""The benchmark scripts still run (tiny shapes; speed itself is never asserted in tests)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lstm_jax as lj
from benchmarks import train_step


def test_shape_parsing_and_flops():
    shape = train_step.Shape.parse("64,128,128,256")
    assert (shape.batch, shape.steps, shape.embed, shape.hidden) == (64, 128, 128, 256)
    assert shape.forward_flops() == 2 * 64 * (128 * (128 + 256) * 1024 + 256 * 2)
    for bad in ("64,128", "0,16,16,32", "4,16,16,0", "4,16,0,32", "-4,16,16,32", "4,16,16,x", "4,16,16,32,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="four integers > 0"):
            train_step.Shape.parse(bad)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "0,16,16,32"], "four integers > 0"),
        (["--shape", "4,16,16,0"], "four integers > 0"),
        (["--shape", "4,16,0,32"], "four integers > 0"),
        (["--shape=-4,16,16,32"], "four integers > 0"),
        (["--json", "{tmp}/missing/x.json"], "not a writable folder"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_timing(args, message, capsys, monkeypatch, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    monkeypatch.setattr(train_step, "matmul_ceiling", lambda on_gpu: pytest.fail("timed despite a bad argument"))
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_json_folder_is_checked_at_start_up(tmp_path):
    assert train_step.writable_json_path(str(tmp_path / "out.json")) == tmp_path / "out.json"
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        train_step.writable_json_path(str(tmp_path))


def test_too_few_timed_steps_are_warned_about():
    assert train_step.too_few_steps_warning(10, 2) is None
    assert "4 timed steps per system" in train_step.too_few_steps_warning(2, 2)


def test_pytorch_gets_fused_adam_with_optax_maths_on_copied_weights():
    """The PyTorch peer's Adam is the fused kernel, and a few steps of it move the same weights as lstm_jax's step
    with ``optax.adam``: the systems are timed on the same maths. PyTorch's LSTM has two gate biases where lstm_jax
    has one; the second stays at zero so that Adam sees the same parameters."""
    torch = pytest.importorskip("torch")
    shape = train_step.Shape(4, 6, 8, 8)
    model = train_step.torch_classifier(shape)
    model.lstm.bias_hh_l0.data.zero_()
    model.lstm.bias_hh_l0.requires_grad_(False)
    optimizer, adam = train_step.torch_adam([p for p in model.parameters() if p.requires_grad], "cpu")
    assert adam == "torch.optim.Adam(fused=True)" and optimizer.defaults["fused"]

    def as_jax(tensor):
        return jnp.asarray(tensor.detach().numpy())

    torch_weights = lambda: {
        "embed": model.embed.weight,
        "rnn": [{"w_x": model.lstm.weight_ih_l0.T, "w_h": model.lstm.weight_hh_l0.T, "b": model.lstm.bias_ih_l0}],
        "out": model.out.weight.T,
        "out_bias": model.out.bias,
    }
    params = jax.tree.map(as_jax, torch_weights())
    assert jax.tree.structure(params) == jax.tree.structure(train_step.lstm_jax_params(shape))
    tokens, labels = train_step.random_batch(shape)
    logits = train_step.lstm_jax_logits()
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, tokens), labels).mean()
    adam_jax, grad = optax.adam(1e-3), jax.jit(jax.grad(loss))
    state = adam_jax.init(params)
    tokens_t, labels_t = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    start = jax.tree.map(np.asarray, params)
    for _ in range(5):
        updates, state = adam_jax.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(tokens_t), labels_t).backward()
        optimizer.step()
    for ours, theirs, before in zip(jax.tree.leaves(params), jax.tree.leaves(torch_weights()), jax.tree.leaves(start)):
        theirs = theirs.detach().numpy()
        assert np.abs(theirs - before).max() > 1e-4  # the weights moved (by about 5 steps of lr 1e-3)
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=2e-6)


def test_pytorch_falls_back_to_foreach_adam_with_a_note_where_fused_is_missing(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    adam = torch.optim.Adam

    def without_fused(params, fused=None, **options):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return adam(params, **options)

    monkeypatch.setattr(torch.optim, "Adam", without_fused)
    optimizer, name = train_step.torch_adam([torch.nn.Parameter(torch.zeros(3))], "cpu")
    assert name == "torch.optim.Adam(foreach=True)" and optimizer.defaults["foreach"]
    assert "no fused Adam on cpu" in capsys.readouterr().out


def test_busy_time_is_read_from_proc_stat_for_this_process_cores_only():
    stat = "\n".join([
        "cpu  999 0 999 999 0 0 0 0 0 0",
        "cpu0 100 5 20 1000 40 1 2 3 0 0",
        "cpu1 200 0 30 1000 0 0 0 7 0 0",
        "cpu2 900 0 900 0 0 0 0 0 0 0",
        "intr 12345 0 0",
        "",
    ])  # fmt: skip
    assert train_step.busy_cpu_seconds(stat, {0, 1}, 100) == pytest.approx((131 + 237) / 100)  # idle, iowait left out
    assert train_step.busy_cpu_seconds(stat, {1}, 100) == pytest.approx(2.37)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux only: reads /proc/stat")
def test_a_busy_process_beside_the_benchmark_counts_as_interference_and_its_own_work_does_not():
    """While another process spins, some process keeps at least one of these cores busy: a whole core of others."""
    spin = "import time\nstart = time.perf_counter()\nwhile time.perf_counter() - start < 1: pass"
    before = train_step.cpu_sample()
    subprocess.run([sys.executable, "-c", spin], check=True)
    after = train_step.cpu_sample()
    assert train_step.others_seconds(before, after) / (after.wall - before.wall) > 0.5
    assert after.own - before.own < 0.2  # the child's time is not this process's


def _rows(**train_ms_by_system):
    return [{"system": name, "train_ms": ms, "infer_ms": ms, "train_round_medians_ms": [ms, 2 * ms],
             "infer_round_medians_ms": [ms, ms], "precision": "bfloat16" if "bf16" in name else "float32"}
            for name, ms in train_ms_by_system.items()]  # fmt: skip


def test_ratios_stay_within_a_precision_or_say_which_precision_they_compare_with():
    systems = [train_step.System(name, None, None, peer=peer, precision=precision) for name, peer, precision in [
        ("ours", False, "float32"), ("ours_bf16", False, "bfloat16"), ("flax", True, "float32"),
        ("torch", True, "float32")]]  # fmt: skip
    rows = _rows(ours=10.0, ours_bf16=5.0, flax=20.0, torch=15.0)
    train_step._compare_with_best_peers(rows, systems)
    ours, ours_bf16, flax, _ = rows
    assert ours["best_peer"] == "torch" and ours["train_vs_best_peer"] == 1.5
    assert ours["train_vs_best_peer_round_range"] == [1.5, 1.5] and flax["train_vs_best_peer_round_range"] == [0.75, 0.75]
    assert ours_bf16["best_peer_precision"] == "float32"  # no bfloat16 peer ran
    assert train_step.ratio_text(ours_bf16, "train") == "3.00x vs float32"
    assert train_step.ratio_text(ours, "train", with_rounds=True) == "1.50x (1.50-1.50)"

    systems.append(train_step.System("torch_bf16", None, None, precision="bfloat16"))
    rows = _rows(ours=10.0, ours_bf16=5.0, flax=20.0, torch=15.0, torch_bf16=4.0)
    train_step._compare_with_best_peers(rows, systems)
    assert rows[1]["best_peer"] == "torch_bf16" and rows[1]["train_vs_best_peer"] == 0.8
    assert train_step.ratio_text(rows[1], "train") == "0.80x"


def test_load_warning_names_the_load_only_when_the_cores_were_busy():
    assert train_step.load_warning([0.0, 2.3], cores=2) is None  # the benchmark's own two threads
    assert train_step.load_warning([3.0, 2.0], cores=2) is None
    warning = train_step.load_warning([0.5, 6.2], cores=2)
    assert "6.2 on 2 cores" in warning and "idle" in warning


@pytest.mark.slow
def test_train_step_benchmark_writes_a_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--shape", "4,6,8,8", "--steps", "3", "--rounds", "2", "--warmup", "1", "--no-bf16", "--json", str(out)]
    train_step.main(args)
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["settings"] == {**report["settings"], "steps": 3, "rounds": 2, "warmup": 1, "timed_steps_per_system": 6}
    assert "6 timed steps per system" in report["warnings"][0]
    assert report["versions"]["jax"] == jax.__version__ and report["versions"]["optax"] == optax.__version__
    assert report["git_dirty"] in (True, False) and report["threads"]["usable_cores"] >= 1
    assert report["matmul_ceiling"]["size"] == 2048 and len(result["ceiling_round_gflops"]) == 2
    for row in result["rows"]:
        assert len(row["train_times_ms"]) == len(row["infer_times_ms"]) == 6
        assert len(row["train_round_medians_ms"]) == 2 and row["train_spread_ms"] >= 0
        low, high = row["train_vs_best_peer_round_range"]
        assert low <= high
        assert row["optimizer"] == ("torch.optim.Adam(fused=True)" if "torch" in row["system"] else train_step.JAX_ADAM)
    if result["interference"]["measured"]:  # Linux
        assert set(result["interference"]["per_system_cores"]) == {row["system"] for row in result["rows"]}
        assert result["interference"]["exceeded"] == (result["interference"]["max_cores"] > 0.1)
    systems = [row["system"] for row in result["rows"]]
    scan_row = ["lstm_jax (lax.scan loops)"] if lj.native.enabled() else []  # on CPU, where the kernel builds
    assert systems[: 2 + len(scan_row)] == ["lstm_jax", *scan_row, "flax OptimizedLSTMCell"]
    assert all(row["train_ms"] > 0 and row["infer_ms"] > 0 for row in result["rows"])
    flax_row = result["rows"][1 + len(scan_row)]
    peers = [row for row in result["rows"] if row["system"] in systems[1 + len(scan_row) :]]
    fastest = min(peers, key=lambda row: row["train_ms"])
    assert result["best_train_peer"] == fastest["system"]  # the ratios are against the fastest peer of the run
    assert flax_row["train_vs_best_peer"] == pytest.approx(fastest["train_ms"] / flax_row["train_ms"])
    assert result["best_train_peer"] in systems[1 + len(scan_row) :]  # neither of lstm_jax's rows is a peer
    assert "| 4,6,8,8 | lstm_jax |" in capsys.readouterr().out


@pytest.mark.slow
def test_bf16_row_is_timed_beside_ours_and_never_counts_as_a_peer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--shape", "4,6,8,8", "--steps", "2", "--rounds", "1", "--warmup", "1", "--bf16", "--no-scan-loops"]
    train_step.main([*args, "--json", str(out)])
    printed = capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    systems = [row["system"] for row in result["rows"]]
    assert systems[:3] == ["lstm_jax", "lstm_jax bfloat16", "flax OptimizedLSTMCell"]
    assert not result["best_train_peer"].startswith("lstm_jax")
    assert all(row["train_ms"] > 0 and row["infer_ms"] > 0 for row in result["rows"])
    by_name = {row["system"]: row for row in result["rows"]}
    bf16_peers = [name for name in systems if "bfloat16 autocast" in name]  # PyTorch's, where torch is installed
    assert by_name["lstm_jax bfloat16"]["precision"] == "bfloat16" and by_name["lstm_jax"]["precision"] == "float32"
    # each precision against its own peers: float32 never against an autocast row; bfloat16 against one if any
    assert by_name["lstm_jax"]["best_peer"] not in bf16_peers
    assert (by_name["lstm_jax bfloat16"]["best_peer"] in bf16_peers) == bool(bf16_peers)
    assert by_name["lstm_jax bfloat16"]["best_peer_precision"] == ("bfloat16" if bf16_peers else "float32")
    assert ("| lstm_jax bfloat16 |" in printed and "vs float32 |" in printed) == (not bf16_peers)


@pytest.mark.slow
def test_sst2_epoch_times_the_kernel_and_the_scan_loops_over_the_same_batches(tmp_path):
    import pyarrow.parquet as pq

    sst2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
    pq.write_table(pq.read_table(sst2 / "train.parquet").slice(0, 300), tmp_path / "train.parquet")
    pq.write_table(pq.read_table(sst2 / "validation.parquet").slice(0, 50), tmp_path / "validation.parquet")
    small = ("--num-buckets", "1", "--embed-dim", "16", "--hidden-size", "16")  # one program to compile per system
    epoch = train_step.sst2_epoch(str(tmp_path), scan_loops=lj.native.enabled(), flags=small)
    assert epoch["steps"] == 5  # 300 rows in batches of 64
    assert (epoch["embed_dim"], epoch["hidden_size"]) == (16, 16)  # read from the config, not assumed
    text = train_step.sst2_text(epoch)
    assert text.startswith("SST-2 epoch, train steps over real batches (tokenisation and bucketing excluded)")
    assert "E=16, H=16" in text
    assert epoch["seconds"] > 0 and 0 < epoch["padding_fraction"] < 1
    if lj.native.enabled():
        assert epoch["scan_loops_seconds"] > 0 and epoch["scan_loops_compile_seconds"] > 0


def test_the_benchmark_and_the_model_import_without_the_data_pipeline():
    """GPU images ship jax, flax, optax and torch but not always ``datasets``: the step benchmark must still run there."""
    import subprocess
    import sys

    code = "import sys, benchmarks.train_step, lstm_jax.model, lstm_jax.train; print(sorted(set(sys.modules) & {'datasets', 'tokenizers'}))"
    printed = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert printed.strip() == "[]"


@pytest.mark.slow
def test_keep_freed_memory_restarts_the_benchmark_and_says_so_in_the_report(tmp_path):
    import os
    import subprocess
    import sys

    from experiments.allocator import OPT_OUT, TUNABLES, untuned_environment, uses_glibc

    with pytest.raises(SystemExit):  # in-process: nothing to restart
        train_step.main(["--keep-freed-memory", "--shape", "4,6,8,8"])
    out = tmp_path / "bench.json"
    env = untuned_environment(os.environ)
    command = [sys.executable, "-m", "benchmarks.train_step", "--keep-freed-memory", "--shape", "4,6,8,8", "--steps",
               "1", "--rounds", "1", "--warmup", "1", "--no-scan-loops", "--json", str(out)]  # fmt: skip
    run = lambda **extra: subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env={**env, **extra},
                                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    printed = run()
    expected = ":".join(TUNABLES) if uses_glibc() else ""
    assert json.loads(out.read_text())["glibc_tunables"] == expected
    assert (f"Every system ran with `GLIBC_TUNABLES={expected}`." in printed) == bool(expected)
    opted_out = run(**{OPT_OUT: "0"})
    assert "note: --keep-freed-memory needs glibc" in opted_out
    assert json.loads(out.read_text())["glibc_tunables"] == ""


@pytest.mark.slow
def test_the_prepared_gpu_run_leaves_the_card_the_benchmark_and_the_tests_in_out(tmp_path):
    """``benchmarks/gpu_check.sh`` is what a session with a lent GPU runs once; here on the CPU with a tiny shape."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SHAPES": "4,6,8,8",
           "TESTS": "tests/test_benchmarks.py -k shape_parsing", "COMMIT": "abc1234"}  # fmt: skip
    printed = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=Path(__file__).resolve().parents[1], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    card = (tmp_path / "card.txt").read_text()
    assert f"jax {jax.__version__}" in card and "devices" in card
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [result["shape"] for result in report["results"]] == ["4,6,8,8"]
    assert "jax_default_matmul_precision" in report["matmul_precision"]
    assert "benchmark exit status 0" in printed and "tests exit status 0" in printed
    assert "1 passed" in (tmp_path / "tests.log").read_text()

