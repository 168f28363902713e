"""The benchmark scripts still run (tiny shapes; speed itself is never asserted in tests)."""

import json
from pathlib import Path

import jax
import pytest

import lstm_jax as lj
from benchmarks import train_step


def test_shape_parsing_and_flops():
    shape = train_step.Shape.parse("64,128,128,256")
    assert (shape.batch, shape.steps, shape.embed, shape.hidden) == (64, 128, 128, 256)
    assert shape.forward_flops() == 2 * 64 * (128 * (128 + 256) * 1024 + 256 * 2)
    with pytest.raises(SystemExit, match="B,T,E,H"):
        train_step.Shape.parse("64,128")


def test_load_warning_names_the_load_only_when_the_cores_were_busy():
    assert train_step.load_warning([0.0, 2.3], cores=2) is None  # the benchmark's own two threads
    assert train_step.load_warning([3.0, 2.0], cores=2) is None
    warning = train_step.load_warning([0.5, 6.2], cores=2)
    assert "6.2 on 2 cores" in warning and "idle" in warning


@pytest.mark.slow
def test_train_step_benchmark_writes_a_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--shape", "4,6,8,8", "--steps", "2", "--rounds", "1", "--warmup", "1", "--no-bf16", "--json", str(out)]
    train_step.main(args)
    report = json.loads(out.read_text())
    (result,) = report["results"]
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
def test_bf16_row_is_timed_beside_ours_and_never_counts_as_a_peer(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--shape", "4,6,8,8", "--steps", "2", "--rounds", "1", "--warmup", "1", "--bf16", "--no-scan-loops"]
    train_step.main([*args, "--json", str(out)])
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


@pytest.mark.slow
def test_sst2_epoch_times_the_kernel_and_the_scan_loops_over_the_same_batches(tmp_path):
    import pyarrow.parquet as pq

    sst2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
    pq.write_table(pq.read_table(sst2 / "train.parquet").slice(0, 300), tmp_path / "train.parquet")
    pq.write_table(pq.read_table(sst2 / "validation.parquet").slice(0, 50), tmp_path / "validation.parquet")
    small = ("--num-buckets", "1", "--embed-dim", "16", "--hidden-size", "16")  # one program to compile per system
    epoch = train_step.sst2_epoch(str(tmp_path), scan_loops=lj.native.enabled(), flags=small)
    assert epoch["steps"] == 5  # 300 rows in batches of 64
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

