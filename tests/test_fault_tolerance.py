"""A killed run resumes to the same bits: ``python -m experiments.sentiment`` under SIGKILL.

Each run is a real subprocess on a slice of SST-2 with a tiny model. The kills are
deterministic: ``LSTM_JAX_KILL_AT="<point>:<step>"`` (see :mod:`lstm_jax.faults`)
makes the process SIGKILL itself at that exact point. One workdir goes through
every kill point in turn, then a damaged newest checkpoint, then runs to the end;
its ``params_sha256`` and metrics must equal those of a run never killed. The
numerical-fault test runs in this process, with a loss that is NaN on every
batch holding a marker word, and so do the tests of the loop's own bookkeeping
(a crash between log lines, a rerun of a finished run, a cut-short metrics line),
on a least-squares toy that compiles in a moment.

The subprocesses share a JAX persistent compilation cache (a temporary folder), so
only the first one compiles; a cached executable is the same program, bit for bit.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments import sentiment
from experiments.allocator import OPT_OUT, untuned_environment
from lstm_jax import data
from lstm_jax.checkpoint import CheckpointError, RunCheckpoints
from lstm_jax.faults import KILL_AT_ENV
from lstm_jax.loop import LoopConfig, MetricsLog, StopSignal, save_curves, train_loop
from lstm_jax.optim import OptimConfig, make_optimizer
from lstm_jax.train import init_train_state, make_train_step, params_sha256

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
# 640 train rows / 32 = 20 steps per epoch, 40 in all; saves at 10, 20, 30, 40; evaluations at 15, 20, 30, 40
TINY_RUN = ["--embed-dim", "16", "--hidden-size", "16", "--head-hidden", "0", "--no-bidirectional", "--vocab-size", "2000",
            "--max-len", "48", "--num-buckets", "1", "--batch-size", "32", "--warmup-steps", "5", "--epochs", "2",
            "--log-every", "5", "--eval-every", "15", "--save-every", "10", "--no-progress"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sst2_640")
    pq.write_table(pq.read_table(SST2 / "train.parquet").slice(0, 640), folder / "train.parquet")
    pq.write_table(pq.read_table(SST2 / "validation.parquet").slice(0, 200), folder / "validation.parquet")
    return folder


@pytest.fixture(scope="module")
def train_process(sst2_slice, tmp_path_factory):
    """``(workdir, kill_at=None, *flags) -> CompletedProcess`` of one training run."""
    env = {k: v for k, v in untuned_environment(os.environ).items() if k != KILL_AT_ENV}  # runs restart
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # fmt: skip

    def run(workdir: Path, kill_at: str | None = None, *flags, extra_env=None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "experiments.sentiment", "--dataset", str(sst2_slice), "--workdir", str(workdir),
                   *TINY_RUN, *flags]  # fmt: skip
        run_env = {**env, **({KILL_AT_ENV: kill_at} if kill_at else {}), **(extra_env or {})}
        return subprocess.run(command, check=False, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)

    return run


def results_of(process: subprocess.CompletedProcess, workdir: Path) -> dict:
    assert process.returncode == 0, process.stdout + process.stderr
    return json.loads((workdir / "results.json").read_text())


def metrics_without_timing(workdir: Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_second"} for record in records]


def finished_steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(train_process, tmp_path_factory) -> tuple[Path, dict]:
    """A run that is never killed."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, results_of(train_process(workdir), workdir)


def truncate_array_files(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_sigkill_at_every_point_then_damage_resumes_to_the_same_bits(train_process, reference, tmp_path):
    ref_dir, ref = reference
    assert ref["steps"] == 40 and ref["skipped_checkpoints"] == []
    workdir = tmp_path / "killed"

    def killed_at(point: str, step: int) -> None:
        process = train_process(workdir, f"{point}:{step}")
        assert process.returncode == -signal.SIGKILL, f"not killed at {point}:{step}\n{process.stdout}{process.stderr}"
        assert not (workdir / "results.json").exists()

    # Saves are asynchronous, so a kill may also catch an earlier save still being written: the checks
    # below hold either way. Orbax waits for the previous save before it starts the next one.
    killed_at("step", 7)  # mid-step, before the first checkpoint: nothing on disk to resume from
    assert finished_steps(workdir / "checkpoints") == []
    killed_at("save", 10)  # inside the asynchronous save of step 10
    assert finished_steps(workdir / "checkpoints") == []
    killed_at("eval", 15)  # after the validation line was logged, before the best checkpoint
    assert set(finished_steps(workdir / "checkpoints")) <= {10} and finished_steps(workdir / "best") == []
    assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 15
    killed_at("best", 15)  # inside the asynchronous save of the best checkpoint
    assert finished_steps(workdir / "best") == []
    killed_at("save", 40)  # inside the save of the final checkpoint
    finished = finished_steps(workdir / "checkpoints")
    assert 40 not in finished and finished[-2:] == [20, 30], finished
    truncate_array_files(workdir / "checkpoints" / "30")  # and the newest finished checkpoint is damaged

    process = train_process(workdir)
    results = results_of(process, workdir)
    assert "warning: skipped damaged checkpoint step 30: " in process.stdout
    assert "resumed from step 20" in process.stdout
    assert results["resumed_from_step"] == 20 and results["skipped_checkpoints"][0].startswith("step 30: ")
    assert results["params_sha256"] == ref["params_sha256"]
    for key in ("steps", "best_step", "val_accuracy", "final_val_accuracy", "nonfinite_steps"):
        assert results[key] == ref[key], key
    assert metrics_without_timing(workdir) == metrics_without_timing(ref_dir)
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp"))  # leftovers were cleaned up
    assert (workdir / "checkpoints" / "30.damaged-1").is_dir()  # moved aside, so step 30 was saved again
    assert 30 in finished_steps(workdir / "checkpoints")


def test_sigterm_and_ctrl_c_stop_after_saving_that_step_and_resume_to_the_same_bits(train_process, reference, tmp_path):
    """A scheduler's SIGTERM (here inside the best checkpoint's save) and a Ctrl-C (mid-step) each let the step finish,
    save it (steps 15 and 23 are not scheduled saves), and exit with the shell's 128 + signal and one note; the rerun
    resumes there, to the bits of the run never stopped. Before, SIGTERM left the saves in flight half-written."""
    ref_dir, ref = reference
    workdir = tmp_path / "signalled"
    for at, status, step in (("best:15:TERM", 143, 15), ("step:23:INT", 130, 23)):
        process = train_process(workdir, at, *(["--restart"] if step == 15 else []))  # a fresh workdir: nothing moved
        assert process.returncode == status, process.stdout + process.stderr
        assert max(finished_steps(workdir / "checkpoints")) == step
        assert f"resume from the checkpoint of step {step}" in process.stderr
        assert ("without --restart" in process.stderr) == (step == 15) and "Traceback" not in process.stderr
        assert not list(workdir.rglob("*.orbax-checkpoint-tmp"))
    assert finished_steps(workdir / "best") == [15]
    process = train_process(workdir, None)
    results = results_of(process, workdir)
    assert "resumed from step 23" in process.stdout
    assert results["params_sha256"] == ref["params_sha256"] and results["best_step"] == ref["best_step"]
    assert metrics_without_timing(workdir) == metrics_without_timing(ref_dir)


def test_language_model_pretraining_killed_then_the_classifier_killed_resumes_to_the_same_bits(train_process, reference, tmp_path):
    _, plain = reference
    flags = ("--lm-pretrain-epochs", "1", "--lm-words", "100")
    whole = tmp_path / "whole"
    expected = results_of(train_process(whole, None, *flags), whole)
    pretraining = expected["lm_pretraining"]
    assert pretraining["steps"] == 20 and pretraining["best_step"] == 20 and pretraining["taken"] == ["embed", "rnn"]
    assert expected["steps"] == plain["steps"] and expected["params_sha256"] != plain["params_sha256"]
    assert 0.0 < pretraining["val_word_accuracy"] < 1.0
    logged = [json.loads(line) for line in (whole / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "validation"] == [15, 20]

    workdir = tmp_path / "killed"
    killed = train_process(workdir, "step:13", *flags)  # in pre-training, after its step-10 checkpoint
    assert killed.returncode == -signal.SIGKILL and finished_steps(workdir / "checkpoints") == []
    assert set(finished_steps(workdir / "pretrain" / "checkpoints")) <= {10}
    stopped = train_process(workdir, None, *flags, "--max-steps", "17")  # counts pre-training's steps: stops in it
    assert stopped.returncode == 0 and "--max-steps 17 ends the run in language-model pre-training" in stopped.stdout
    assert finished_steps(workdir / "checkpoints") == [] and not (workdir / "results.json").exists()
    assert json.loads((workdir / "pretrain" / "results.json").read_text())["steps"] == 17
    results = results_of(train_process(workdir, None, *flags, "--max-steps", "25"), workdir)  # 20 + 5 of the classifier
    assert results["steps"] == 5 and results["lm_pretraining"]["steps"] == 20
    process = train_process(workdir, None, *flags)
    results = results_of(process, workdir)
    assert "language-model pre-training" not in process.stdout  # the classifier's checkpoint holds its weights
    assert results["params_sha256"] == expected["params_sha256"] and results["resumed_from_step"] == 5
    untimed = lambda figures: {k: v for k, v in figures.items() if k != "train_seconds"}
    assert untimed(results["lm_pretraining"]) == untimed(pretraining)

    # Killed after the classifier's first best checkpoint but before its first latest one: the rerun starts the
    # classifier again from the pre-trained weights (not from the random ones, as if they were in a checkpoint).
    only_best = tmp_path / "only_best"
    shutil.copytree(whole, only_best)
    shutil.rmtree(only_best / "checkpoints")
    (only_best / "results.json").unlink()
    results = results_of(train_process(only_best, None, *flags), only_best)
    assert results["params_sha256"] == expected["params_sha256"] and results["resumed_from_step"] == 0


def test_rerunning_a_finished_run_reports_what_it_did(train_process, reference, tmp_path):
    """Also what a run killed after its last checkpoint but before ``results.json`` does."""
    ref_dir, ref = reference
    workdir = tmp_path / "finished"
    shutil.copytree(ref_dir, workdir)
    (workdir / "results.json").unlink()
    process = train_process(workdir)
    assert "resumed from step 40" in process.stdout
    results = results_of(process, workdir)
    assert results["resumed_from_step"] == 40 and ref["resumed_from_step"] == 0
    assert results["train_seconds"] > 0 and results["final_val_accuracy"] is not None
    ignored = {"resumed_from_step", "config"}  # config holds the --workdir
    assert {k: v for k, v in results.items() if k not in ignored} == {k: v for k, v in ref.items() if k not in ignored}
    assert (workdir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()


def test_same_seed_gives_the_same_bits_and_another_seed_does_not(train_process, reference, tmp_path):
    """Also without the restart that keeps freed memory (``experiments.allocator``): the allocator changes no value."""
    _, ref = reference
    again = results_of(train_process(tmp_path / "again", extra_env={OPT_OUT: "0"}), tmp_path / "again")
    assert again["params_sha256"] == ref["params_sha256"] and again["resumed_from_step"] == 0
    other = results_of(train_process(tmp_path / "seed1", None, "--seed", "1"), tmp_path / "seed1")
    assert other["params_sha256"] != ref["params_sha256"]


# --------------------------------------------------------------------------- numerical faults

POISON = "zzpoison"  # a word whose batches get a NaN loss


@pytest.fixture
def poisoned_slice(sst2_slice, tmp_path) -> Path:
    """The slice with POISON appended to three training sentences."""
    table = pq.read_table(sst2_slice / "train.parquet")
    sentences = table.column("sentence").to_pylist()
    for row in (2, 54, 3):  # in batches 12, 13 and 16 of epoch 0 with seed 0: after the save at step 10
        sentences[row] += f" {POISON}"
    folder = tmp_path / "poisoned"
    folder.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("sentence"), "sentence", pa.array(sentences)),
                   folder / "train.parquet")  # fmt: skip
    (folder / "validation.parquet").symlink_to(sst2_slice / "validation.parquet")
    return folder


def poison_loss(monkeypatch, workdir: Path) -> None:
    """Make the experiment's loss NaN on every batch that holds the POISON word."""
    real_loss = sentiment.classifier_loss

    def loss(params, config, batch, key):
        poison_id = data.load_tokenizer(workdir / "tokenizer.json").token_to_id(POISON)  # read once, at trace time
        value, correct = real_loss(params, config, batch, key)
        return jnp.where(jnp.any(batch.tokens_BT == poison_id), jnp.nan, value), correct

    monkeypatch.setattr(sentiment, "classifier_loss", loss)


def poisoned_steps(folder: Path, workdir: Path) -> list[int]:
    """The 1-based steps whose batch holds POISON, from the data pipeline alone."""
    tokenizer = data.load_tokenizer(workdir / "tokenizer.json")
    poison_id = tokenizer.token_to_id(POISON)
    assert poison_id not in (None, data.UNK_ID)
    splits = data.load_text_splits(str(folder))
    encoded = data.encode(tokenizer, data.texts_of(splits.train), max_len=48)
    buckets = json.loads((workdir / "run.json").read_text())["buckets"]["train"]
    steps, step = [], 0
    for epoch in (0, 1):
        for batch in data.epoch_batches(
            encoded, data.labels_of(splits.train), batch_size=32, buckets=buckets, seed=0, epoch=epoch
        ):
            step += 1
            if np.any(batch.tokens_BT[batch.weights_B > 0] == poison_id):
                steps.append(step)
    return steps


def test_nan_loss_stops_at_its_step_keeps_the_last_good_checkpoint_and_skip_nonfinite_counts(
    poisoned_slice, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "nan"
    poison_loss(monkeypatch, workdir)
    argv = ["--dataset", str(poisoned_slice), "--workdir", str(workdir), *TINY_RUN]
    with pytest.raises(SystemExit) as stopped:
        sentiment.main(argv)
    bad_steps = poisoned_steps(poisoned_slice, workdir)
    first_bad, last_good = bad_steps[0], (bad_steps[0] - 1) // 10 * 10  # saves fall on multiples of 10
    assert len(bad_steps) >= 3 and last_good >= 10, bad_steps  # the data is fixed: a checkpoint precedes the NaN
    message = str(stopped.value.code)
    assert message.startswith(f"error: non-finite loss or gradient at step {first_bad} (1 so far, --skip-nonfinite 0)")
    assert f"the last good checkpoint (step {last_good}) is kept" in message and "\n" not in message
    assert not (workdir / "results.json").exists()
    assert finished_steps(workdir / "checkpoints")[-1] == last_good

    results = sentiment.train([*argv, "--skip-nonfinite", str(len(bad_steps))])  # a resumable flag: same run, resumed
    assert f"resumed from step {last_good}" in capsys.readouterr().out
    assert results["steps"] == 40 and results["nonfinite_steps"] == len(bad_steps)
    assert json.loads((workdir / "results.json").read_text())["nonfinite_steps"] == len(bad_steps)


# --------------------------------------------------------------------------- the loop's bookkeeping, in process


class ToyBatch(NamedTuple):
    x_BD: np.ndarray
    y_B: np.ndarray
    weights_B: np.ndarray


def toy_loss(params, batch, key):
    """Weighted least squares with a dropout-like draw from the step's key; aux: rows predicted within 0.5."""
    noise_B = 0.1 * jax.random.normal(key, batch.y_B.shape)
    error_B = batch.x_BD @ params["w"] + params["b"] + noise_B - batch.y_B
    loss = jnp.sum(batch.weights_B * error_B**2) / jnp.sum(batch.weights_B)
    return loss, jnp.sum(batch.weights_B * (jnp.abs(error_B) < 0.5))


def toy_epoch(epoch: int) -> list[ToyBatch]:
    """6 batches, with padding rows of weight 0 so the metrics window is a weighted mean."""
    rng = np.random.default_rng(epoch)
    return [ToyBatch(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32),
                     (rng.random(8) < 0.7).astype(np.float32)) for _ in range(6)]  # fmt: skip


TOY_VALIDATION = toy_epoch(99)[0]
TOY_OPTIMIZER = make_optimizer(OptimConfig(learning_rate=0.05, warmup_steps=2), total_steps=12)
# 12 steps; lines at 4, 8, 12, evaluations at 5, 6, 10, 12, saves at 3, 6, 9, 12
TOY_LOOP = LoopConfig(epochs=2, log_every=4, eval_every=5, save_every=3, keep=10, progress=False)


def toy_state():
    params = {"w": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return init_train_state(params, TOY_OPTIMIZER, seed=3, ema=True)


def toy_evaluate(params) -> dict:
    loss, correct = toy_loss(params, TOY_VALIDATION, jax.random.key(0))
    return {"loss": float(loss), "accuracy": float(correct) / float(TOY_VALIDATION.weights_B.sum())}


class Crash(Exception):
    pass


def toy_run(workdir: Path, crash_before_step: int | None = None, evaluate=toy_evaluate, loop: LoopConfig = TOY_LOOP,
            taken: list | None = None):
    """Train to the end, resuming whatever ``workdir`` holds, or raise Crash instead of taking ``crash_before_step``;
    each step's ``(batch, metrics)`` goes to ``taken`` if given."""
    step = make_train_step(toy_loss, TOY_OPTIMIZER, ema_decay=0.9)

    def train_step(state, batch):
        if int(state.step) + 1 == crash_before_step:
            raise Crash
        state, metrics = step(state, batch)
        if taken is not None:
            taken.append((batch, metrics))
        return state, metrics

    checkpoints = RunCheckpoints(workdir, keep=TOY_LOOP.keep)
    try:
        restored = checkpoints.restore(toy_state())
        state = restored.state if restored else toy_state()
        log = MetricsLog(workdir / "metrics.jsonl", int(state.step))
        state, summary = train_loop(state, train_step, toy_epoch, evaluate, checkpoints, log, loop, meta={},
                                    tokens_in=lambda batch: int(batch.weights_B.sum()))  # fmt: skip
    finally:
        checkpoints.close()
    return state, summary


@pytest.mark.parametrize("crash_before_step", [8, 11])  # resumes from step 6 (lines at 4, 8) and 9 (lines at 8, 12)
def test_a_crash_between_log_lines_resumes_to_the_same_metrics_lines(crash_before_step, tmp_path):
    reference_state, reference = toy_run(tmp_path / "reference")
    with pytest.raises(Crash):
        toy_run(tmp_path / "crashed", crash_before_step)
    state, summary = toy_run(tmp_path / "crashed")
    assert params_sha256(state) == params_sha256(reference_state)
    assert summary["last_val"] == reference["last_val"] and summary["steps"] == 12
    assert metrics_without_timing(tmp_path / "crashed") == metrics_without_timing(tmp_path / "reference")
    train_lines = [r for r in metrics_without_timing(tmp_path / "crashed") if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == [4, 8, 12]


def test_with_every_latest_checkpoint_damaged_the_run_resumes_from_the_best_one(tmp_path, capsys):
    """The best checkpoint is a whole train state: when no latest one reads (the template does read the best, so they
    are damaged, not mismatched), they are moved aside and the run resumes from the best, to the same bits."""
    reference_state, _ = toy_run(tmp_path / "reference")
    with pytest.raises(Crash):
        toy_run(tmp_path / "damaged", crash_before_step=12)  # latest at 3, 6, 9; best at an evaluation (5, 6 or 10)
    saved, best_before = finished_steps(tmp_path / "damaged" / "checkpoints"), best_step(tmp_path / "damaged")
    assert saved == [3, 6, 9] and best_before in (5, 6, 10)
    for step in saved:
        shutil.rmtree(tmp_path / "damaged" / "checkpoints" / str(step) / "state")  # lost in a crash, say
    capsys.readouterr()
    state, summary = toy_run(tmp_path / "damaged")
    assert f"resuming from the best one, step {best_before}" in capsys.readouterr().out
    assert summary["steps"] == 12 and params_sha256(state) == params_sha256(reference_state)
    # the best checkpoint carries the loop's figures too: the same lines, and the training time is still known
    assert metrics_without_timing(tmp_path / "damaged") == metrics_without_timing(tmp_path / "reference")
    assert summary["train_seconds"] is not None and summary["tokens_per_second"] is not None
    assert sorted(p.name for p in (tmp_path / "damaged" / "checkpoints").glob("*.damaged-1")) == ["3.damaged-1", "6.damaged-1",
                                                                                                  "9.damaged-1"]


def best_step(workdir: Path) -> int:
    checkpoints = RunCheckpoints(workdir)
    try:
        return checkpoints.best_meta()["step"]
    finally:
        checkpoints.close()


def test_a_max_steps_stop_is_evaluated_but_never_kept_as_the_best(tmp_path):
    """Stopped at step 7 by --max-steps, between the evaluations at 6 and 10, under a metric that rises at every
    evaluation: the stop is evaluated and logged, but the best stays step 6's, and the rerun ends as one run never
    stopped, with the same best step and bits."""
    def rising(params):
        calls.append(params)
        return {**toy_evaluate(params), "accuracy": float(len(calls))}

    calls = []
    reference_state, _ = toy_run(tmp_path / "reference", evaluate=rising)
    calls = []
    _, stopped = toy_run(tmp_path / "stopped", evaluate=rising, loop=dataclasses.replace(TOY_LOOP, max_steps=7))
    assert stopped["steps"] == 7 and stopped["last_val"]["accuracy"] == 3.0  # evaluated at 5, 6 (epoch end), 7
    assert best_step(tmp_path / "stopped") == 6
    state, summary = toy_run(tmp_path / "stopped", evaluate=rising)
    assert summary["steps"] == 12 and params_sha256(state) == params_sha256(reference_state)
    assert best_step(tmp_path / "stopped") == best_step(tmp_path / "reference") == 12


def test_a_max_steps_stop_marks_its_own_lines_and_the_rerun_logs_as_a_run_never_stopped(tmp_path):
    """Stopped at step 7, between the train lines at 4 and 8: the stop's train and validation lines say "stop", and
    the step-8 line of the rerun still averages steps 5 to 8, as in the run never stopped."""
    toy_run(tmp_path / "reference")
    toy_run(tmp_path / "stopped", loop=dataclasses.replace(TOY_LOOP, max_steps=7))
    toy_run(tmp_path / "stopped")
    logged = metrics_without_timing(tmp_path / "stopped")
    assert [(r["step"], r["split"]) for r in logged if r.get("stop")] == [(7, "train"), (7, "validation")]
    assert [r for r in logged if not r.get("stop")] == metrics_without_timing(tmp_path / "reference")


def test_the_best_checkpoint_is_the_first_highest_evaluation_and_holds_that_steps_state(tmp_path):
    scores = iter([1.0, 3.0, 3.0, 0.0])  # at steps 5, 6, 10, 12: step 10 only ties step 6, and step 12 falls

    def scored(params):
        return {**toy_evaluate(params), "accuracy": next(scores)}

    toy_run(tmp_path / "run", evaluate=scored)
    checkpoints = RunCheckpoints(tmp_path / "run")
    try:
        best = checkpoints.restore(toy_state(), which="best")
    finally:
        checkpoints.close()
    at_step_6, _ = toy_run(tmp_path / "six", loop=dataclasses.replace(TOY_LOOP, max_steps=6))
    assert best.step == 6 and best.meta["val"]["accuracy"] == 3.0
    assert params_sha256(best.state) == params_sha256(at_step_6)


def test_a_failed_save_while_stopping_on_an_error_does_not_hide_that_error(tmp_path, monkeypatch, capsys):
    def full_disk(self):
        raise CheckpointError("could not write a checkpoint (disk full)")

    monkeypatch.setattr(RunCheckpoints, "wait", full_disk)
    with pytest.raises(Crash):
        toy_run(tmp_path, crash_before_step=4)
    assert "note: while stopping, could not write a checkpoint (disk full)" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="disk full"):  # and without another error, it is the error
        toy_run(tmp_path / "whole")


def test_train_lines_are_the_row_weighted_means_of_their_steps(tmp_path):
    taken = []
    toy_run(tmp_path, taken=taken)
    lines = [r for r in metrics_without_timing(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in lines] == [4, 8, 12] and len(taken) == 12
    for line, window in zip(lines, (taken[0:4], taken[4:8], taken[8:12]), strict=True):
        rows = sum(float(batch.weights_B.sum()) for batch, _ in window)
        loss = sum(float(metrics["loss"]) * float(batch.weights_B.sum()) for batch, metrics in window) / rows
        correct = sum(float(metrics["aux"]) for _, metrics in window) / rows
        assert line["loss"] == pytest.approx(loss, rel=1e-6) and line["accuracy"] == pytest.approx(correct, rel=1e-6)


def test_rerunning_a_finished_loop_returns_the_first_runs_figures(tmp_path):
    state, first = toy_run(tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert first["train_seconds"] > 0 and first["tokens_per_second"] > 0
    assert first["last_val"] == toy_evaluate(state.eval_params)
    again_state, again = toy_run(tmp_path)
    assert again == first
    assert params_sha256(again_state) == params_sha256(state)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_cut_short_last_metrics_line_is_dropped_with_a_note_and_a_damaged_earlier_one_stops(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "split": "train", "loss": 1.0 / step}) for step in (4, 8, 12)]
    path.write_text("\n".join(lines) + "\n" + lines[2][:17])  # a write of a fourth line, cut short
    log = MetricsLog(path, resume_step=8)
    assert [r["step"] for r in log.read()] == [4, 8]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"note: dropped the last line of {path}: it was cut short (")
    path.write_text("\n".join([lines[0], lines[1][:17], lines[2]]) + "\n")
    expected = rf"^error: line 2 of {re.escape(str(path))} is damaged \(.*\); delete that line, or pass --restart"
    with pytest.raises(SystemExit, match=expected) as error:
        MetricsLog(path, resume_step=12)
    assert "\n" not in str(error.value.code)


def test_a_window_of_skipped_steps_only_logs_no_loss_and_an_untimed_line_no_rate(tmp_path):
    """Step 4's batch is NaN and skipped: its own line (log_every 1) has no loss or accuracy, not a perfect 0.0; the
    first line, after the compiling step alone, has no tokens/s, not 0; the curves leave both out."""
    step = make_train_step(toy_loss, TOY_OPTIMIZER, ema_decay=0.9)

    def epoch_with_a_nan(epoch):
        batches = toy_epoch(epoch)
        if epoch == 0:
            batches[3] = batches[3]._replace(x_BD=np.full_like(batches[3].x_BD, np.nan))
        return batches

    checkpoints = RunCheckpoints(tmp_path, keep=10)
    try:
        log = MetricsLog(tmp_path / "metrics.jsonl", 0)
        state, _ = train_loop(toy_state(), step, epoch_with_a_nan, toy_evaluate, checkpoints, log,
                              dataclasses.replace(TOY_LOOP, log_every=1, skip_nonfinite=1), meta={},
                              tokens_in=lambda batch: int(batch.weights_B.sum()))  # fmt: skip
    finally:
        checkpoints.close()
    lines = {r["step"]: r for r in log.read() if r["split"] == "train"}
    assert int(state.nonfinite_steps) == 1 and lines[4]["loss"] is None and lines[4]["accuracy"] is None
    assert all(lines[s]["loss"] > 0 for s in (3, 5)) 
    assert lines[1]["tokens_per_second"] is None and lines[2]["tokens_per_second"] > 0
    save_curves(log.read(), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_signal_while_the_last_saves_are_awaited_stops_after_them(tmp_path, monkeypatch):
    """SIGTERM during the final wait (the loop is done, its saves are in flight) used to be acknowledged and dropped:
    language-model pre-training would go on into the classifier. It stops the process once the saves are done."""
    real_wait, sent = RunCheckpoints.wait, []

    def wait_signalled_once(self):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        real_wait(self)

    monkeypatch.setattr(RunCheckpoints, "wait", wait_signalled_once)
    with pytest.raises(StopSignal) as stop:
        toy_run(tmp_path)
    assert stop.value.signum == signal.SIGTERM and stop.value.step == 12
    assert finished_steps(tmp_path / "checkpoints")[-1] == 12


def test_a_rerun_with_max_steps_below_the_runs_step_says_there_is_nothing_to_train(tmp_path, capsys):
    toy_run(tmp_path, loop=dataclasses.replace(TOY_LOOP, max_steps=7))
    capsys.readouterr()
    _, summary = toy_run(tmp_path, loop=dataclasses.replace(TOY_LOOP, max_steps=5))
    assert summary["steps"] == 7
    assert ("note: the run is already at step 7, past --max-steps 5: nothing to train (drop --max-steps, or raise it "
            "above 7, to go on)") in capsys.readouterr().out
