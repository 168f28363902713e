"""End-to-end tests of ``python -m experiments.memory``: learning, outputs, bit-exact resume, the sweep page."""

import json

import pytest

from experiments import memory
from lstm_jax.loop import MetricsLog

SMALL = ["--task", "adding", "--cell", "lstm", "--T", "20", "--hidden-size", "32", "--test-size", "500",
         "--steps", "200", "--eval-every", "40", "--log-every", "20", "--warmup-steps", "20", "--learning-rate", "5e-3",
         "--no-progress"]  # fmt: skip


def run(workdir, *extra) -> dict:
    memory.main([*SMALL, "--workdir", str(workdir), *map(str, extra)])
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adding")
    return workdir, run(workdir)


@pytest.mark.slow
def test_short_adding_run_beats_half_the_baseline_and_writes_its_outputs(uninterrupted):
    workdir, results = uninterrupted
    for name in ("config.json", "metrics.jsonl", "curves.png", "results.json"):
        assert (workdir / name).is_file(), name
    assert any((workdir / "checkpoints").iterdir())
    assert results["steps"] == 200 and results["baseline_loss"] == pytest.approx(1 / 6)
    assert results["test_loss"] < results["baseline_loss"] / 2
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in tests] == [40, 80, 120, 160, 200]
    assert results["best_test_loss"] == min(r["loss"] for r in tests)
    solved = next((r for r in tests if r["loss"] < 0.01), None)
    assert results["steps_to_solve"] == (solved["step"] if solved else None)
    assert 0 < results["wall_seconds"] and results["test_loss"] == pytest.approx(tests[-1]["loss"])


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_bits(uninterrupted, tmp_path, capsys):
    _, expected = uninterrupted
    first = run(tmp_path, "--max-steps", 60)  # stops mid-interval, after the save at step 60
    assert first["steps"] == 60
    assert "note: accuracy here is the fraction of answers within 0.04" in capsys.readouterr().out
    resumed = run(tmp_path, "--save-every", 1000)  # a save setting may change on resume
    assert resumed["resumed_from_step"] == 60 and resumed["steps"] == 200
    assert resumed["params_sha256"] == expected["params_sha256"]
    # The stop evaluated at step 60 too, which the uninterrupted run never did: the figures leave it out.
    workdir, _ = uninterrupted
    evaluations = [memory.scheduled_evaluations(MetricsLog(folder / "metrics.jsonl", 200).read(), 40, 200)
                   for folder in (workdir, tmp_path)]  # fmt: skip
    steps_and_losses = [[(r["step"], r["loss"]) for r in records] for records in evaluations]
    assert steps_and_losses[0] == steps_and_losses[1] and [s for s, _ in steps_and_losses[0]] == [40, 80, 120, 160, 200]
    assert 60 in [r["step"] for r in MetricsLog(tmp_path / "metrics.jsonl", 200).read() if r["split"] == "validation"]
    for key in ("best_test_loss", "steps_to_solve"):
        assert resumed[key] == expected[key], key
    # --save-every 1000 makes the loop's one "epoch" longer than the run: its end is still the run's end, not a stop
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 200 and last["split"] == "validation" and "stop" not in last
    capsys.readouterr()
    assert run(tmp_path, "--save-every", 1000)["params_sha256"] == expected["params_sha256"]
    assert "note: the run already finished its 200 steps: nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another config.*hidden_size: 32 -> 16"):
        run(tmp_path, "--hidden-size", 16)


@pytest.mark.slow
def test_a_run_stopped_before_its_first_scheduled_evaluation_reports_no_best_loss(tmp_path):
    results = run(tmp_path, "--max-steps", 30)  # evaluations every 40: only the stop's own, not on the schedule
    assert results["steps"] == 30 and results["best_test_loss"] is None and results["steps_to_solve"] is None
    assert results["test_loss"] > 0  # the final weights are still evaluated


@pytest.mark.slow
def test_a_short_copy_run_recalls_symbols_above_chance_and_beats_the_baseline(tmp_path):
    """The copy task end to end (its model, loss and scoring), as the adding task is above: 300 steps at T = 5
    (measured on the AVX2 machine: 0.30 of the symbols recalled, test loss 0.72 against the baseline's 0.83)."""
    memory.main(["--task", "copy", "--cell", "lstm", "--T", "5", "--hidden-size", "64", "--test-size", "200",
                 "--steps", "300", "--eval-every", "100", "--log-every", "100", "--warmup-steps", "20",
                 "--learning-rate", "1e-2", "--no-progress", "--workdir", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy_counts"] == "symbols recalled" and results["test_accuracy"] > 0.2  # 8 symbols: chance 1/8
    assert results["test_loss"] < 0.95 * results["baseline_loss"]


def test_unknown_names_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        memory.main(["--cell", "lstn"])
    assert "unknown cell 'lstn'; choose one of lstm," in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown cell 'lst' in --sweep-cells"):
        memory.main(["--sweep", "--sweep-cells", "lstm,lst"])


@pytest.mark.parametrize("flag", ["--decay-embeddings", "--shard-embedding"])
def test_embedding_flags_are_refused_as_the_model_has_no_embedding(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        memory.main(["--workdir", str(tmp_path / "run"), flag])
    assert f"the memory tasks' model has no embedding table: drop {flag}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_settings_out_of_range_are_refused_together_before_the_workdir_exists(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        memory.main(["--workdir", str(tmp_path / "run"), "--T", "0", "--learning-rate", "0", "--ema-decay", "1"])
    assert info.value.code == 2
    assert ("error: --T must be >= 1, got 0; --learning-rate must be > 0, got 0.0; --ema-decay must be in [0, 1), got 1.0"
            in capsys.readouterr().err)  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sweep_writes_a_table_and_a_figure_and_reads_finished_runs_back(tmp_path):
    argv = ["--sweep", "--sweep-cells", "rnn", "--sweep-lengths", "8,4", "--hidden-size", "8", "--steps", "10",
            "--eval-every", "5", "--test-size", "64", "--no-progress", "--workdir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results")]  # fmt: skip
    memory.main(argv)
    page = (tmp_path / "results" / "memory.md").read_text()
    assert "python -m experiments.memory --sweep --sweep-cells rnn --sweep-lengths 8,4" in page
    assert "![adding](memory_adding.png)" in page and (tmp_path / "results" / "memory_adding.png").is_file()
    rows = [line.split("|")[1:3] for line in page.splitlines() if line.startswith("| ") and "rnn" in line]
    assert [(T.strip(), cell.strip()) for T, cell in rows] == [("8", "rnn"), ("4", "rnn")]
    first = (tmp_path / "runs" / "adding-T8-rnn" / "results.json").read_text()
    memory.main(argv)  # finished runs are read back, not trained again
    assert (tmp_path / "runs" / "adding-T8-rnn" / "results.json").read_text() == first
    with pytest.raises(SystemExit, match="learning_rate: 0.003 -> 0.01"):  # not read back as if trained at 0.01
        memory.main([*argv, "--learning-rate", "0.01"])
    assert (tmp_path / "runs" / "adding-T8-rnn" / "results.json").read_text() == first


@pytest.mark.parametrize("argv, message", [
    (["--T", "1"], "--T must be >= 2 for --task adding, got 1"),
    (["--sweep", "--sweep-lengths", "4,abc"], "--sweep-lengths 4,abc: invalid literal"),
    (["--sweep", "--sweep-lengths", "4,0"], "--sweep-lengths 4,0: --T must be >= 1, got 0"),
    (["--sweep", "--sweep-lengths", "4,1"], "--sweep-lengths 4,1: --T must be >= 2 for --task adding, got 1"),
])  # fmt: skip
def test_lengths_a_task_cannot_take_are_refused_in_one_line_before_the_workdir_exists(tmp_path, capsys, argv, message):
    """The adding problem needs two steps for its two markers; a sweep checks every length before training any."""
    with pytest.raises(SystemExit) as info:
        memory.main([*argv, "--steps", "2", "--test-size", "4", "--no-progress", "--workdir", str(tmp_path / "run")])
    assert message in str(info.value.code) + capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_results_dir_that_cannot_be_made_is_refused_before_the_sweep_trains(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        memory.main(["--sweep", "--sweep-cells", "rnn", "--sweep-lengths", "4", "--steps", "2", "--test-size", "4",
                     "--no-progress", "--workdir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "a_file" / "res")])
    assert str(info.value.code).startswith(f"error: cannot create --results-dir {tmp_path / 'a_file' / 'res'}: ")
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_sweep_figure_leaves_out_runs_stopped_before_their_first_evaluation(tmp_path):
    """``--max-steps`` below ``--eval-every`` leaves a run without scheduled evaluations; the figure still draws."""
    run = {"task": "adding", "T": 4, "baseline_loss": 1 / 6, "solved_below": 0.01}
    runs = [{**run, "cell": "rnn", "test_curve": []}, {**run, "cell": "gru", "test_curve": [(5, 0.2), (10, 0.1)]}]
    memory.plot_sweep(runs, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
