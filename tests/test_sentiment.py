"""End-to-end tests of ``python -m experiments.sentiment`` on a slice of the real SST-2."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments import sentiment  # noqa: E402
from lstm_jax import data  # noqa: E402
from lstm_jax.checkpoint import RunCheckpoints  # noqa: E402
from lstm_jax.model import classifier_logits  # noqa: E402

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
SMALL_MODEL = ["--embed-dim", "32", "--hidden-size", "32", "--head-hidden", "32", "--vocab-size", "4000",
               "--batch-size", "32", "--warmup-steps", "20", "--no-progress", "--log-every", "10", "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory) -> Path:
    """The first 3,000 training sentences and the full validation set, as a local dataset folder."""
    folder = tmp_path_factory.mktemp("sst2_slice")
    pq.write_table(pq.read_table(SST2 / "train.parquet").slice(0, 3000), folder / "train.parquet")
    pq.write_table(pq.read_table(SST2 / "validation.parquet"), folder / "validation.parquet")
    pq.write_table(pq.read_table(SST2 / "test.parquet").slice(0, 300), folder / "test.parquet")
    return folder


def run(*args) -> dict:
    return sentiment.train([str(a) for a in args])


def trained_run_args(sst2_slice) -> list:
    return ["--dataset", sst2_slice, "--epochs", 3, *SMALL_MODEL, "--num-buckets", 4]


@pytest.fixture(scope="module")
def trained_run(sst2_slice, tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("run")
    results = run(*trained_run_args(sst2_slice), "--workdir", workdir)
    return workdir, results


@pytest.mark.slow
def test_end_to_end_writes_every_output_and_beats_the_majority_class(trained_run):
    workdir, results = trained_run
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "curves.png", "results.json", "run.json"):
        assert (workdir / name).is_file(), name
    assert any((workdir / "checkpoints").iterdir()) and any((workdir / "best").iterdir())
    saved = json.loads((workdir / "results.json").read_text())
    for key in ("dataset", "val_accuracy", "test_accuracy", "steps", "epochs", "train_seconds", "tokens_per_second",
                "num_params", "params_sha256", "config"):  # fmt: skip
        assert key in saved, key
    majority = 444 / 872  # validation: 428 negative, 444 positive
    assert saved["val_accuracy"] > majority + 0.05
    assert saved["test_accuracy"] is not None and 0.0 < saved["test_accuracy"] <= 1.0
    assert saved["epochs"] == 3 and saved["steps"] % 3 == 0
    steps_per_epoch = saved["steps"] // 3
    assert steps_per_epoch >= 3000 // 32
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in evaluations] == [steps_per_epoch * k for k in (1, 2, 3)]
    best = max(evaluations, key=lambda r: r["accuracy"])  # the first of equal ones, as the loop keeps it
    assert saved["best_step"] == best["step"] and saved["val_accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)


def best_checkpoint_state(workdir):
    """The best checkpoint's step and state, restored here without predict's own loading code."""
    checkpoints = RunCheckpoints(workdir)
    try:
        best_step = checkpoints.best.latest_step()
        restored = checkpoints.best.restore(best_step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        checkpoints.close()
    return best_step, restored["state"]


def assert_answers_come_from(weights, workdir, texts, answers):
    """Each of predict's ``answers`` is the label and probability that ``weights`` give the text."""
    model_cfg = sentiment.ModelConfig(**json.loads((workdir / "config.json").read_text())["ModelConfig"])
    tokenizer = data.load_tokenizer(workdir / "tokenizer.json")
    for (label, probability), text in zip(answers, texts, strict=True):
        ids = jnp.asarray([tokenizer.encode(text, add_special_tokens=False).ids])
        probs = jax.nn.softmax(classifier_logits(weights, model_cfg, ids, jnp.asarray([ids.shape[1]]))[0])
        assert label == ("negative", "positive")[int(probs.argmax())]
        assert probability == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.slow
def test_predict_prints_a_label_and_probability(trained_run, capsys):
    workdir, _ = trained_run
    texts = ["a gorgeous , witty , seductive movie .", "dull and tedious"]
    answers = sentiment.predict(["--workdir", str(workdir), *texts])
    assert len(answers) == 2
    best_step, state = best_checkpoint_state(workdir)
    assert best_step == json.loads((workdir / "results.json").read_text())["best_step"]
    assert_answers_come_from(state["ema_params"], workdir, texts, answers)  # the best checkpoint's averaged weights
    printed = capsys.readouterr().out.splitlines()
    assert f"note: answering from the best checkpoint, step {best_step} (validation accuracy" in printed[-3]
    assert [line.split("\t")[0] for line in printed[-2:]] == [label for label, _ in answers]
    assert [line.split("\t")[2] for line in printed[-2:]] == texts


@pytest.mark.slow
def test_predict_without_ema_answers_from_the_best_checkpoints_raw_weights(sst2_slice, tmp_path):
    """With ``--ema-decay 0`` no averaged weights exist: the run evaluates and predict answers from the trained ones."""
    workdir = tmp_path / "run"
    results = run("--dataset", sst2_slice, "--epochs", 2, *SMALL_MODEL, "--num-buckets", 2, "--ema-decay", 0,
                  "--workdir", workdir)  # fmt: skip
    assert results["val_accuracy"] > 444 / 872  # above the majority class
    texts = ["a gorgeous , witty , seductive movie .", "dull and tedious"]
    answers = sentiment.predict(["--workdir", str(workdir), *texts])
    best_step, state = best_checkpoint_state(workdir)
    assert best_step == results["best_step"]
    assert state.get("ema_params") is None
    assert_answers_come_from(state["params"], workdir, texts, answers)


@pytest.mark.slow
def test_predict_reads_the_best_checkpoint_when_a_newer_latest_one_differs(trained_run, tmp_path, capsys):
    """A newer latest checkpoint that predicts the opposite class (the latest one's head negated): predict must still
    answer from the best, until the best is gone, and then from the negated one."""
    workdir, _ = trained_run
    copy, without_best = tmp_path / "run", tmp_path / "without_best"
    shutil.copytree(workdir, copy)
    shutil.copytree(workdir, without_best)
    shutil.rmtree(without_best / "best")
    texts = ["a gorgeous , witty , seductive movie .", "dull and tedious", "it is a film"]
    best_answers = sentiment.predict(["--workdir", str(workdir), *texts])
    latest_answers = sentiment.predict(["--workdir", str(without_best), *texts])
    saved = json.loads((copy / "config.json").read_text())
    template = sentiment.state_template(sentiment.ModelConfig(**saved["ModelConfig"]),
                                        sentiment.OptimConfig(**saved["OptimConfig"]), json.loads((copy / "run.json").read_text()))
    checkpoints = RunCheckpoints(copy, async_save=False)
    try:
        latest = checkpoints.restore(template)
        evaluated = "params" if latest.state.ema_params is None else "ema_params"  # what predict reads: eval_params
        weights = getattr(latest.state, evaluated)
        negated = {**weights, "head": {**weights["head"], "out": jax.tree.map(jnp.negative, weights["head"]["out"])}}
        checkpoints.save(latest.step + 1, latest.state.replace(**{evaluated: negated}), latest.meta)
        checkpoints.wait()
    finally:
        checkpoints.close()
    assert sentiment.predict(["--workdir", str(copy), *texts]) == best_answers
    shutil.rmtree(copy / "best")  # now predict falls back to the newest latest checkpoint, the negated one
    capsys.readouterr()
    from_latest = sentiment.predict(["--workdir", str(copy), *texts])
    assert "has no best checkpoint yet" in capsys.readouterr().out  # said, since the best checkpoint is what --help promises
    flipped = {"positive": "negative", "negative": "positive"}
    assert [label for label, _ in from_latest] == [flipped[label] for label, _ in latest_answers]
    assert [p for _, p in from_latest] == pytest.approx([p for _, p in latest_answers], abs=1e-5)


@pytest.mark.slow
def test_explain_plots_gates_and_ends_on_the_predicted_probability(trained_run, tmp_path):
    workdir, _ = trained_run
    text = "a gorgeous , witty , seductive movie ."
    explanation = sentiment.explain(["--workdir", str(workdir), "--out", str(tmp_path / "gates.png"), text])
    assert (tmp_path / "gates.png").stat().st_size > 10_000
    num_tokens = len(text.split())
    assert explanation.trace.forget.shape == (num_tokens, 32) and explanation.probabilities_TC.shape == (num_tokens, 2)
    assert np.all((explanation.trace.input > 0) & (explanation.trace.input < 1))
    [(label, probability)] = sentiment.predict(["--workdir", str(workdir), text])
    assert explanation.probabilities_TC[-1].max() == pytest.approx(probability, abs=1e-5)
    assert label == ("negative", "positive")[int(explanation.probabilities_TC[-1].argmax())]
    with pytest.raises(SystemExit) as info:  # refused before the run is loaded: matplotlib cannot write it
        sentiment.main(["explain", "--workdir", str(workdir), "--out", str(tmp_path / "gates.txt"), text])
    assert info.value.code == 2 and not (tmp_path / "gates.txt").exists()
    with pytest.raises(SystemExit, match="layer 1 does not exist"):
        sentiment.main(["explain", "--workdir", str(workdir), "--layer", "1", text])
    with pytest.raises(SystemExit, match=r"--member 1 does not exist; the run is one model"):
        sentiment.main(["explain", "--workdir", str(workdir), "--member", "1", text])


@pytest.mark.slow
def test_resume_after_max_steps_matches_an_uninterrupted_run(sst2_slice, trained_run, tmp_path, capsys):
    """Stopped by --max-steps inside epoch 1 (between saves), then rerun: the bits of ``trained_run``, never stopped.
    The same command again trains nothing and says how to go on; the closing line names the checkpoint it reports."""
    _, whole = trained_run
    args = [*trained_run_args(sst2_slice), "--save-every", 25]  # --save-every is resumable; it changes no bits
    first = run(*args, "--workdir", tmp_path / "split", "--max-steps", 37)
    assert first["steps"] == 37 and first["params_sha256"] != whole["params_sha256"]
    assert first["best_step"] is None and "last state (step 37; no evaluation kept as the best)" in capsys.readouterr().out
    again = run(*args, "--workdir", tmp_path / "split", "--max-steps", 37)
    assert again["params_sha256"] == first["params_sha256"]
    assert ("the run already stopped at step 37, where --max-steps stops it: nothing to train (drop --max-steps, or "
            "raise it, to go on)") in capsys.readouterr().out
    resumed = run(*args, "--workdir", tmp_path / "split")
    assert resumed["resumed_from_step"] == 37
    assert resumed["steps"] == whole["steps"]
    assert resumed["params_sha256"] == whole["params_sha256"]


@pytest.mark.slow
def test_rerun_with_another_config_names_the_differing_fields(trained_run):
    workdir, _ = trained_run
    saved = json.loads((workdir / "config.json").read_text())
    with pytest.raises(SystemExit, match=r"hidden_size: 32 -> 64.*--restart"):
        run("--dataset", saved["DataConfig"]["dataset"], "--workdir", workdir, "--epochs", 3, *SMALL_MODEL, "--hidden-size", 64)


def test_unreachable_hub_id_says_how_to_pass_a_local_folder(tmp_path):
    hub_failure = r"could not load 'nobody/no-such-dataset' from the Hugging Face Hub.*pass a local folder"
    with pytest.raises(SystemExit, match=hub_failure):
        sentiment.main(["--dataset", "nobody/no-such-dataset", "--workdir", str(tmp_path / "w"), "--no-progress"])


def test_predict_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no training run"):
        sentiment.main(["predict", "--workdir", str(tmp_path), "some text"])


def test_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sentiment.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for cls in sentiment.CONFIG_CLASSES:
        for field in dataclasses.fields(cls):
            assert "--" + field.name.replace("_", "-") in text
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"


def test_unknown_tokenizer_is_refused_before_any_data_is_read(capsys):
    with pytest.raises(SystemExit):
        sentiment.parse_train_args(["--tokenizer", "bpe"])
    assert "unknown --tokenizer 'bpe'; choose one of word, wordpiece" in capsys.readouterr().err


def test_dataset_preset_applies_under_explicit_flags():
    configs, _ = sentiment.parse_train_args(["--dataset", str(SST2.parent / "imdb"), "--epochs", "7"])
    assert configs["DataConfig"].max_len == sentiment.DATASET_PRESETS["imdb"]["max_len"]
    assert configs["LoopConfig"].epochs == 7
    imdb_max_len = sentiment.DATASET_PRESETS["imdb"]["max_len"]
    assert imdb_max_len != sentiment.DataConfig().max_len
    assert sentiment.parse_train_args(["--dataset", "stanfordnlp/imdb"])[0]["DataConfig"].max_len == imdb_max_len
    assert sentiment.parse_train_args(["--dataset", "sst2"])[0]["DataConfig"].max_len == sentiment.DataConfig().max_len
    sst2 = sentiment.parse_train_args(["--dataset", str(SST2)])[0]["ModelConfig"]
    assert sst2.adversarial_epsilon == sentiment.DATASET_PRESETS["sst2"]["adversarial_epsilon"] > 0
    assert sentiment.parse_train_args(["--adversarial-epsilon", "0"])[0]["ModelConfig"].adversarial_epsilon == 0
    # every preset entry names a flag, and lands in its own config class (pooling is a ModelConfig field)
    for name, preset in sentiment.DATASET_PRESETS.items():
        configs, _ = sentiment.parse_train_args(["--dataset", name])
        flat = {field: value for config in configs.values() for field, value in dataclasses.asdict(config).items()}
        assert {field: flat[field] for field in preset} == preset, name


def test_preset_note_lists_only_the_values_applied(capsys):
    sentiment.parse_train_args(["--dataset", "sst2"])
    assert capsys.readouterr().out.splitlines() == ["note: preset 'sst2' applied: --adversarial-epsilon 0.1"]
    sentiment.parse_train_args(["--dataset", "sst2", "--adversarial-epsilon", "0.1"])
    assert "note:" not in capsys.readouterr().out
    sentiment.parse_train_args(["--dataset", "imdb", "--epochs", "7", "--max-len", "100", "--pooling", "max"])
    [note] = capsys.readouterr().out.splitlines()
    assert note == ("note: preset 'imdb' applied: --vocab-size 30000 --batch-size 32 --embed-dropout 0.2 "
                    "--input-dropout 0.4 --output-dropout 0.4")  # fmt: skip


@pytest.mark.parametrize("dataset", ["someone/imdb", "someone/sst2", "no/such/folder/imdb"])
def test_a_hub_id_of_another_owner_gets_no_preset(dataset, capsys):
    configs, _ = sentiment.parse_train_args(["--dataset", dataset])
    assert configs["DataConfig"] == sentiment.DataConfig(dataset=dataset)
    assert configs["ModelConfig"] == sentiment.ModelConfig()
    assert "note:" not in capsys.readouterr().out


def test_a_local_folder_named_like_a_preset_gets_it(tmp_path, monkeypatch):
    (tmp_path / "imdb").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    for dataset in (str(tmp_path / "imdb") + "/", "~/imdb"):
        configs, _ = sentiment.parse_train_args(["--dataset", dataset])
        assert configs["DataConfig"].max_len == sentiment.DATASET_PRESETS["imdb"]["max_len"]


def test_help_lists_the_dataset_presets(capsys):
    with pytest.raises(SystemExit):
        sentiment.main(["--help"])
    text = capsys.readouterr().out
    assert "  sst2: --adversarial-epsilon 0.1\n" in text
    for name in sentiment.DATASET_PRESETS:
        assert f"\n  {name}: --" in text
    flat = " ".join(text.split())  # argparse wraps the help lines
    assert "(default: 0.0; preset sst2 0.1)" in flat  # --adversarial-epsilon, on the flag's own line too
    assert "(default: 128; preset imdb 800, yelp_polarity 256, ag_news 64)" in flat  # --max-len


def test_an_ensemble_reaches_sharpness_aware_minimisation_member_by_member(sst2_slice, tmp_path, monkeypatch):
    """The run hands --ensemble to the train step, so that SAM moves each member on its own (test_train.py)."""
    seen = []

    class Stop(Exception):
        pass

    def recording(*args, **kwargs):
        seen.append((kwargs["sam_rho"], kwargs["ensemble"]))
        raise Stop

    monkeypatch.setattr(sentiment, "make_train_step", recording)
    with pytest.raises(Stop):
        run("--dataset", sst2_slice, "--workdir", tmp_path, *SMALL_MODEL, "--ensemble", 2, "--sam-rho", 0.05)
    assert seen == [(0.05, 2)]


@pytest.mark.slow
def test_an_ensemble_run_predicts_the_mean_of_its_members_and_explains_each(sst2_slice, tmp_path, capsys):
    results = run("--dataset", sst2_slice, "--workdir", tmp_path, "--epochs", 3, "--ensemble", 2, *SMALL_MODEL, "--num-buckets", 2)
    assert results["val_accuracy"] > 444 / 872 + 0.05
    model_cfg, _, _, _, params = sentiment.load_run(tmp_path)
    assert model_cfg.ensemble == 2 and params["embed"].shape[0] == 2
    text = "a gorgeous , witty , seductive movie ."
    [(label, probability)] = sentiment.predict(["--workdir", str(tmp_path), text])
    member_probabilities = [
        sentiment.explain(["--workdir", str(tmp_path), "--member", str(i), "--out", str(tmp_path / f"m{i}.png"), text]).probabilities_TC[-1]
        for i in range(2)
    ]  # fmt: skip
    mean = np.mean(member_probabilities, 0)
    assert label == ("negative", "positive")[int(mean.argmax())] and probability == pytest.approx(mean.max(), abs=1e-5)
    assert not np.allclose(member_probabilities[0], member_probabilities[1])
    with pytest.raises(SystemExit, match="--member 2 does not exist"):
        sentiment.main(["explain", "--workdir", str(tmp_path), "--member", "2", text])


@pytest.mark.parametrize("experiment, entry", [("sentiment", "train"), ("memory", "train_one")])
def test_ctrl_c_ends_with_one_line_saying_how_to_resume(experiment, entry, monkeypatch, capsys):
    from experiments import memory
    from lstm_jax.loop import INTERRUPTED_NOTE

    module = {"sentiment": sentiment, "memory": memory}[experiment]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, entry, interrupted)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--workdir", "unused"])
    assert stopped.value.code == 130  # the shell's status for SIGINT
    assert capsys.readouterr().err.strip() == INTERRUPTED_NOTE
