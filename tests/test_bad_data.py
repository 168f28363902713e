"""Bad input to ``python -m experiments.sentiment``: each case is a one-line error naming the fix,
or is counted and reported; never a traceback or a silent drop.

The README's Troubleshooting table lists the same cases. Errors are checked through
``sentiment.main`` (what the command runs); they all happen before anything is
compiled. The accepted cases are trained on once, in one small messy dataset.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets

from experiments import sentiment
from lstm_jax import data

REPO = Path(__file__).resolve().parents[1]
# a failed restore leaves TensorStore futures and Orbax coroutines behind, reported when collected (see
# test_checkpoint.py)
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]
TINY = ["--embed-dim", "8", "--hidden-size", "8", "--head-hidden", "0", "--no-bidirectional", "--max-len", "32",
        "--num-buckets", "1", "--batch-size", "64", "--epochs", "2", "--eval-every", "0", "--warmup-steps", "1",
        "--no-progress"]  # fmt: skip
GOOD_TEXTS = [f"{word} film number {i}" for i, word in enumerate(["good", "bad", "great", "awful"] * 10)]
GOOD_LABELS = [1, 0, 1, 0] * 10


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # in case `datasets` was imported before the variables


def write_parquet(folder: Path, split: str, columns: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / f"{split}.parquet")
    return folder


def good_folder(folder: Path, **replace) -> Path:
    """train (40 rows) and validation (8 rows) parquet files, with any split's columns replaced."""
    splits = {
        "train": {"text": GOOD_TEXTS, "label": GOOD_LABELS},
        "validation": {"text": GOOD_TEXTS[:8], "label": GOOD_LABELS[:8]},
    }
    for split, columns in {**splits, **replace}.items():
        write_parquet(folder, split, columns)
    return folder


def renamed_columns(folder: Path, text: str, label: str) -> Path:
    """The good data with its columns renamed in every split."""
    return good_folder(
        folder, train={text: GOOD_TEXTS, label: GOOD_LABELS}, validation={text: GOOD_TEXTS[:8], label: GOOD_LABELS[:8]}
    )


def one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as info:
        sentiment.main([str(a) for a in argv])
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def run_args(folder, workdir, *flags) -> list[str]:
    return [str(a) for a in ("--dataset", folder, "--workdir", workdir, *TINY, *flags)]


def csv_folder(folder: Path, **files: bytes) -> Path:
    folder.mkdir(parents=True)
    for split, content in files.items():
        (folder / f"{split}.csv").write_bytes(content)
    return folder


# Each case: (name, builds the dataset folder or argument from tmp_path, a regex the error must match)
ERROR_CASES = [
    ("dataset name that does not exist", lambda tmp: "no_such_dataset", r"could not load 'no_such_dataset'.*presets: sst2.*local folder"),
    ("local folder that does not exist", lambda tmp: tmp / "nowhere", r"does not exist; pass an existing folder"),
    ("Hub id when offline", lambda tmp: "stanfordnlp/sst2", r"from the Hugging Face Hub.*pass a local folder"),
    ("missing text column", lambda tmp: renamed_columns(tmp, "body", "label"), r"no column one of .*'sentence'.*pass --text-column NAME"),
    ("missing label column", lambda tmp: renamed_columns(tmp, "text", "stars"), r"no column one of .*'label'.*pass --label-column NAME"),
    ("splits with different columns", lambda tmp: good_folder(tmp, train={"body": GOOD_TEXTS, "label": GOOD_LABELS}), r"have different columns.*same column names"),
    ("non-string text", lambda tmp: good_folder(tmp, train={"text": list(range(40)), "label": GOOD_LABELS}, validation={"text": [1, 2], "label": [0, 1]}), r"type int64, not string; make every value a string"),
    ("text of another type in one split", lambda tmp: good_folder(tmp, train={"text": list(range(40)), "label": GOOD_LABELS}), r"Failed to parse string.*the same columns, each of one type"),
    ("class-name labels that train never has", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": ["pos", "neg"] * 20}, validation={"text": ["a", "b"], "label": ["pos", "neutral"]}), r"'validation' has 1 labels that train never has \(\['neutral'\]\)"),
    ("float labels", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": [1.0, 0.0] * 20}, validation={"text": ["a", "b"], "label": [0.0, 1.0]}), r"type double; labels must be integer class ids 0..C-1 or class names"),
    ("a CSV label left blank", lambda tmp: csv_folder(tmp, train=b"text,label\ngood,1\nbad,0\nfine,\n"), r"'train' has 1 missing labels; fill or remove them"),
    ("sparse label ids", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": [0, 10**9] * 20}), r"train labels go up to 1000000000 but only 2 distinct values occur.*class names"),
    ("negative labels", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": [1, -2, 0, 1] * 10}), r"'train' has 10 negative labels"),
    ("labels starting at 1", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": [1, 2] * 20}, validation={"text": ["a", "b"], "label": [1, 2]}), r"train labels run from 1 to 2 with no class 0.*subtract 1"),
    ("labels outside the class range", lambda tmp: good_folder(tmp, validation={"text": ["a", "b"], "label": [0, 5]}), r"'validation' has 1 labels >= num_classes=2"),
    ("empty split file", lambda tmp: csv_folder(tmp, train=b"text,label\ngood,1\nbad,0\n", validation=b"text,label\n"), r"split file .* has no rows.*add rows or delete that file"),
    ("empty train split", lambda tmp: good_folder(tmp, train={"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), r"split file .* has no rows.*add rows or delete that file"),
    ("train split with one class only", lambda tmp: good_folder(tmp, train={"text": GOOD_TEXTS, "label": [1] * 40}), r"'train' has examples of 1 class\(es\) only \(\[1\]\).*add examples"),
    ("every training text tokenises to nothing", lambda tmp: good_folder(tmp, train={"text": ["", " \x00 ", "\u200b"] * 13 + [""], "label": GOOD_LABELS}), r"contain no words"),
    ("file that is not UTF-8", lambda tmp: csv_folder(tmp, train=b"text,label\ngood,1\ncaf\xe9 bad,0\n"), r"is not UTF-8 .*re-encode it as UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize("name, build, expected", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_bad_data_is_a_one_line_error_naming_the_fix(name, build, expected, tmp_path):
    message = one_line_error(run_args(build(tmp_path / "data"), tmp_path / "run"))
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()  # nothing left behind: a corrected rerun is not refused as another config


@pytest.mark.parametrize("flag", ["--max-len", "--batch-size", "--epochs", "--log-every", "--num-layers", "--embed-dim",
                                  "--hidden-size", "--unroll", "--ensemble"])
def test_zero_for_a_size_flag_is_a_usage_error_naming_the_flag(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sentiment.main(run_args(good_folder(tmp_path / "data"), tmp_path / "run", flag, "0"))
    assert info.value.code == 2
    assert f"error: {flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--seed", "-1", f"--seed must be in [0, {2**63}), got -1"), ("--min-freq", "-1", "--min-freq must be >= 0, got -1"),
     ("--val-fraction", "0", "--val-fraction must be in (0, 1), got 0.0"),
     ("--val-fraction", "1", "--val-fraction must be in (0, 1), got 1.0"),
     ("--val-fraction", "-0.5", "--val-fraction must be in (0, 1), got -0.5"),
     ("--input-dropout", "1.5", "--input-dropout must be in [0, 1), got 1.5"),
     ("--zoneout", "1", "--zoneout must be in [0, 1), got 1.0"),
     ("--layer-dropout", "-0.1", "--layer-dropout must be in [0, 1), got -0.1"),
     ("--head-hidden", "-1", "--head-hidden must be >= 0, got -1"),
     ("--learning-rate", "-0.01", "--learning-rate must be > 0, got -0.01"),
     ("--learning-rate", "0", "--learning-rate must be > 0, got 0.0"),
     ("--b2", "1.5", "--b2 must be in [0, 1), got 1.5"),
     ("--ema-decay", "-1", "--ema-decay must be in [0, 1), got -1.0"),
     ("--final-lr-factor", "1.5", "--final-lr-factor must be in [0, 1], got 1.5"),
     ("--clip-norm", "-1", "--clip-norm must be >= 0, got -1.0"),
     ("--warmup-steps", "-1", "--warmup-steps must be >= 0, got -1"),
     ("--seed", str(2**63), f"--seed must be in [0, {2**63}), got {2**63}"),  # jax.random.key overflowed, after loading
     ("--adversarial-epsilon", "inf", "--adversarial-epsilon must be a finite number >= 0, got inf")],
)  # fmt: skip
def test_out_of_range_flag_is_a_usage_error_before_the_workdir_is_touched(flag, value, expected, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")  # a previous run, which --restart would move aside
    with pytest.raises(SystemExit) as info:
        sentiment.main(run_args(good_folder(tmp_path / "data"), workdir, "--restart", flag, value))
    assert info.value.code == 2
    assert f"error: {expected}" in capsys.readouterr().err
    assert [path.name for path in workdir.iterdir()] == ["config.json"]


def test_the_command_prints_one_error_line_and_no_traceback(tmp_path):
    folder = renamed_columns(tmp_path / "data", "body", "label")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    process = subprocess.run([sys.executable, "-m", "experiments.sentiment", *run_args(folder, tmp_path / "run")], check=False,
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 1
    error_lines = [line for line in process.stderr.splitlines() if "examples/s" not in line and line.strip()]
    assert error_lines == [next(line for line in error_lines if line.startswith("error: no column"))], process.stderr
    assert "Traceback" not in process.stderr


# --------------------------------------------------------------------------- counted and reported

LONG_TEXT = " ".join(["long"] * 120_000)


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """A run on data with every accepted oddity: ``(workdir, results, printed output)``."""
    texts = GOOD_TEXTS[:33] + [None, "", " \x00\x07 ", "good\x1bfilm\u200b here", "\x93great\x94 soft\u00adly", LONG_TEXT, "bad film"]
    folder = tmp_path_factory.mktemp("messy")
    write_parquet(folder, "train", {"text": texts, "label": GOOD_LABELS[:40]})
    write_parquet(
        folder, "validation", {"text": GOOD_TEXTS[:10], "label": [1, -1, 1, -1, 1, 1, 1, 1, 1, 1]}
    )  # one class only
    write_parquet(folder, "test", {"text": GOOD_TEXTS[:4], "label": [-1] * 4})  # hidden labels
    workdir = tmp_path_factory.mktemp("messy_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = sentiment.train([str(a) for a in run_args(folder, workdir)])
    return workdir, results, printed.getvalue()


@pytest.mark.slow
def test_accepted_oddities_are_counted_and_reported(messy_run):
    workdir, results, printed = messy_run
    expected_notes = [
        "note: train: 1 missing texts read as empty strings (a CSV reader also takes a text that is only NA, N/A, "
        "null, None or nan as missing)",  # None
        "note: train: 3 texts contain control or invisible characters; the tokenizer reads controls as spaces and drops "
        "invisible ones inside words",
        "note: validation: removed 2 unlabelled rows (label -1)",
        "note: validation: no examples of class(es) [0] out of 2",
        "note: test: all 4 labels are -1 (unlabelled); split not used",
        "note: train: 1 of 40 texts cut to --max-len 32; 3 empty texts kept as [UNK]",  # None, "", control-only
        "note: --batch-size 64 exceeds the 40 training texts; each step is one padded batch",
    ]
    for note in expected_notes:
        assert note in printed, f"{note!r} not in:\n{printed}"
    assert results["truncated"] == {"train": 1, "validation": 0} and results["empty_texts"] == {
        "train": 3,
        "validation": 0,
    }
    assert results["steps"] == 2 and results["test_accuracy"] is None
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["count"] for r in records if r["split"] == "validation"] == [8, 8]  # every labelled row evaluated


@pytest.mark.slow
def test_predict_reads_empty_and_control_character_texts(messy_run, capsys):
    workdir, _, _ = messy_run
    answers = sentiment.predict(["--workdir", str(workdir), "", "\x00\x07", LONG_TEXT, "qwzx blorf zzyzx"])
    assert len(answers) == 4 and all(0.5 <= probability <= 1.0 for _, probability in answers)
    cut_note = "cut to --max-len 32 tokens: 119968 of its 120000 tokens dropped"
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: text")]
    assert notes == ["note: text 1 ('') has no tokens; it is read as one [UNK]",
                     "note: text 2 ('\\x00\\x07') has no tokens; it is read as one [UNK]",
                     f"note: text 3 ('long long long long long long long long '...) {cut_note}",
                     "note: text 4 ('qwzx blorf zzyzx') has only words outside the vocabulary, all read as [UNK]: its "
                     "answer is a guess"]  # fmt: skip


@pytest.mark.slow
def test_explain_says_a_long_text_was_cut(messy_run, tmp_path, capsys):
    workdir, _, _ = messy_run
    sentiment.explain(["--workdir", str(workdir), "--out", str(tmp_path / "gates.png"), LONG_TEXT])
    printed = capsys.readouterr().out
    assert "note: text 1 (" in printed and "cut to --max-len 32 tokens: 119968 of its 120000 tokens dropped" in printed
    assert "after 32 tokens" in printed
    sentiment.explain(["--workdir", str(workdir), "--out", str(tmp_path / "short.png"), "good film"])
    assert "note: text" not in capsys.readouterr().out


# --------------------------------------------------------------------------- run directories


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir, tmp_path / "copy"))


def saved_argv(workdir: Path, *flags, into: Path | None = None) -> list[str]:
    """The arguments of the run in ``workdir`` (with ``flags`` added), writing to ``into`` if given."""
    config = json.loads((workdir / "config.json").read_text())
    return run_args(config["DataConfig"]["dataset"], into or workdir, *flags)


@pytest.mark.slow
def test_predict_on_a_workdir_without_checkpoints(messy_run, tmp_path):
    workdir = copy_of(messy_run[0], tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    shutil.rmtree(workdir / "best")
    assert "has no checkpoint yet" in one_line_error(["predict", "--workdir", workdir, "fine"])
    assert "holds no training run" in one_line_error(["predict", "--workdir", tmp_path / "empty", "fine"])


@pytest.mark.slow
def test_missing_tokenizer_is_named_for_predict_and_for_resuming(messy_run, tmp_path):
    workdir = copy_of(messy_run[0], tmp_path)
    (workdir / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in one_line_error(["predict", "--workdir", workdir, "fine"])
    message = one_line_error(saved_argv(workdir))
    assert "has checkpoints but no tokenizer.json; restore that file, or pass --restart" in message


@pytest.mark.slow
def test_missing_or_damaged_config_of_a_run_with_checkpoints(messy_run, tmp_path):
    workdir = copy_of(messy_run[0], tmp_path)
    argv = saved_argv(workdir)
    (workdir / "config.json").write_text('{"DataConfig": {"data')
    assert re.search(r"config.json is damaged .*; restore it, or pass --restart", one_line_error(argv))
    (workdir / "config.json").unlink()
    assert "has checkpoints but no config.json; restore that file, or pass --restart" in one_line_error(argv)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, content", [("config.json", '{"DataConfig": {"data'), ("run.json", '{"vocab'), ("run.json", "[]")]
)
def test_damaged_run_files_are_named_for_predict_and_explain(messy_run, tmp_path, name, content):
    workdir = copy_of(messy_run[0], tmp_path)
    (workdir / name).write_text(content)
    for command in (["predict", "--workdir", workdir, "fine"], ["explain", "--workdir", workdir, "fine"]):
        message = one_line_error(command)
        assert message.startswith(f"error: {workdir / name} is damaged (")
        assert "; restore it from a copy of the run" in message


@pytest.mark.slow
def test_damaged_tokenizer_is_named(messy_run, tmp_path):
    workdir = copy_of(messy_run[0], tmp_path)
    (workdir / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert "tokenizer.json' is damaged" in one_line_error(["predict", "--workdir", workdir, "fine"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, fields",
    [(["--cell", "gru"], ["ModelConfig.cell: 'lstm' -> 'gru'"]),
     (["--vocab-size", "500"], ["DataConfig.vocab_size: 20000 -> 500"]),
     (["--hidden-size", "16", "--cell", "peephole"], ["ModelConfig.cell: 'lstm' -> 'peephole'", "ModelConfig.hidden_size: 8 -> 16"])],
)  # fmt: skip
def test_config_mismatch_names_every_differing_field(messy_run, flags, fields):
    workdir = messy_run[0]
    message = one_line_error(saved_argv(workdir, *flags))
    assert (
        f"error: {workdir} holds a run with another config ({'; '.join(fields)}); use another --workdir or pass --restart"
        == message
    )


@pytest.mark.slow
def test_no_intact_checkpoint_is_an_error_until_restart(messy_run, tmp_path, capsys):
    workdir = copy_of(messy_run[0], tmp_path)
    # the best checkpoint too: with it intact the run resumes from it (test_fault_tolerance)
    for step_dir in [*(workdir / "checkpoints").iterdir(), *(workdir / "best").iterdir()]:
        for f in step_dir.rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\x00garbage")
    message = one_line_error(saved_argv(workdir))
    assert "no readable checkpoint in" in message and "pass --restart to start from scratch" in message
    results = sentiment.train(saved_argv(workdir, "--restart"))
    assert results["resumed_from_step"] == 0 and results["steps"] == 2
    assert "--restart: moved the previous run to" in capsys.readouterr().out
    assert len(list(workdir.glob("previous-*/checkpoints"))) == 1  # the damaged run is kept aside, not deleted


def test_unwritable_workdir_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    message = one_line_error(run_args(good_folder(tmp_path / "data"), blocker / "run"))
    assert f"cannot create workdir {blocker / 'run'}" in message and "pass a writable --workdir" in message


@pytest.mark.slow
def test_resuming_on_changed_data_is_refused_naming_the_split(tmp_path, capsys):
    folder = good_folder(tmp_path / "data")
    workdir = tmp_path / "run"
    first = sentiment.train(run_args(folder, workdir, "--max-steps", "1"))
    assert set(first["data_sha256"]) == {"train", "validation"}
    assert json.loads((workdir / "run.json").read_text())["data_sha256"] == first["data_sha256"]
    edited = [*GOOD_TEXTS[:-1], "bad film number 39, edited"]
    good_folder(folder, train={"text": edited, "label": GOOD_LABELS})
    message = one_line_error(run_args(folder, workdir, "--max-steps", "2"))
    train_now = data.split_sha256(data.load_text_splits(str(folder)).train)
    assert (f"differ from those this run began on (SHA-256 of train {first['data_sha256']['train'][:8]} -> "
            f"{train_now[:8]}), so it cannot resume as the same run; restore that data, or pass --restart") in message
    good_folder(folder, validation={"text": GOOD_TEXTS[1:9], "label": GOOD_LABELS[1:9]})  # train restored, validation not
    message = one_line_error(run_args(folder, workdir, "--max-steps", "2"))
    changed = message.split("(SHA-256 of ")[1].split(")")[0]
    assert changed.startswith("validation ") and "train" not in changed, message
    moved = Path(shutil.copytree(good_folder(folder), tmp_path / "moved"))  # the data the run began on, elsewhere
    resumed = sentiment.train(run_args(moved, workdir, "--max-steps", "2"))
    assert resumed["resumed_from_step"] == 1 and resumed["data_sha256"] == first["data_sha256"]
    assert f"note: --dataset {moved} holds the same rows as {folder}, which this run last started on" in capsys.readouterr().out
    run_file = workdir / "run.json"  # as a run begun before the digests wrote it: the name must then match
    run_file.write_text(json.dumps({k: v for k, v in json.loads(run_file.read_text()).items() if k != "data_sha256"}))
    message = one_line_error(run_args(folder, workdir, "--max-steps", "3"))
    assert f"this run began on --dataset {moved}, before runs recorded their data's SHA-256" in message
    assert sentiment.train(run_args(moved, workdir, "--max-steps", "3"))["resumed_from_step"] == 2
    run_file.unlink()  # lost: config.json's --dataset, the name the run began with, must then match
    assert f"this run began on --dataset {folder}, before runs recorded" in one_line_error(run_args(moved, workdir, "--max-steps", "4"))


def test_split_digest_follows_every_row_in_order():
    def digest(texts, labels):
        return data.split_sha256(datasets.Dataset.from_dict({"text": texts, "label": labels}))

    base = digest(["ab", "c"], [0, 1])
    assert base == digest(["ab", "c"], [0, 1])
    changed = [digest(["a", "bc"], [0, 1]), digest(["c", "ab"], [1, 0]), digest(["ab", "c"], [1, 1]),
               digest(["ab", "c", ""], [0, 1, 0]), digest(["ab"], [0])]  # fmt: skip
    assert len({base, *changed}) == 6


@pytest.mark.slow
def test_test_texts_do_not_change_training(tmp_path):
    """Training is bucketed by its own lengths: a test split of other lengths trains the same bits. (Bucketed
    together, the test's 4-word texts moved the training buckets from (3, 5) to (4, 5), and so the batches.)"""
    texts = [" ".join(t.split()[: 3 + i % 3]) + (" more" if i % 3 == 2 else "") for i, t in enumerate(GOOD_TEXTS)]
    train = {"train": {"text": texts, "label": GOOD_LABELS}, "validation": {"text": texts[:8], "label": GOOD_LABELS[:8]}}
    short_test = {"text": ["good film ok fine"] * 100, "label": [1, 0] * 50}
    flags = ("--max-steps", "2", "--num-buckets", "2")
    plain = sentiment.train(run_args(good_folder(tmp_path / "a", **train), tmp_path / "run_a", *flags))
    with_test = sentiment.train(run_args(good_folder(tmp_path / "b", **train, test=short_test), tmp_path / "run_b", *flags))
    assert with_test["params_sha256"] == plain["params_sha256"]
    assert with_test["buckets"]["train"] == plain["buckets"]["train"] == [3, 5] and with_test["buckets"]["evaluation"] == [4, 5]


@pytest.mark.slow
def test_a_run_begun_with_shared_buckets_resumes_with_them(tmp_path, capsys):
    folder, workdir = good_folder(tmp_path / "data"), tmp_path / "run"
    sentiment.train(run_args(folder, workdir, "--max-steps", "1", "--num-buckets", "3"))
    run_file = workdir / "run.json"
    old_style = {**json.loads(run_file.read_text()), "buckets": [4, 5, 7]}  # one list for every split, as before
    del old_style["data_sha256"]
    run_file.write_text(json.dumps(old_style))
    for steps in (2, 3):  # on every resume, not only the first (run.json is rewritten in the new form)
        resumed = sentiment.train(run_args(folder, workdir, "--max-steps", str(steps), "--num-buckets", "3"))
        assert resumed["resumed_from_step"] == steps - 1 and resumed["buckets"]["train"] == [4, 5, 7]
        assert "note: this run keeps the training buckets (4, 5, 7) it began with" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_keeps_its_preset_when_dataset_is_spelt_another_way(tmp_path, capsys):
    """Begun on a folder named sst2 (its preset: adversarial training), resumed from a copy of another name: the
    preset comes from the run, not the new name (which gave another config, refused)."""
    folder = good_folder(tmp_path / "sst2")
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    workdir = tmp_path / "run"
    sentiment.train(run_args(folder, workdir, "--max-steps", "1"))
    assert json.loads((workdir / "run.json").read_text())["preset"] == "sst2"
    resumed = sentiment.train(run_args(copy, workdir, "--max-steps", "2"))
    assert resumed["resumed_from_step"] == 1 and resumed["config"]["ModelConfig"]["adversarial_epsilon"] == 0.1
    printed = capsys.readouterr().out
    assert "note: this run began with preset sst2, which it keeps (--dataset " + str(copy) + " alone would give none)" in printed
    assert "note: preset 'sst2' applied: --adversarial-epsilon 0.1" in printed
    fresh = sentiment.parse_train_args(run_args(copy, tmp_path / "fresh"))[0]  # a new run on the copy: no preset
    assert fresh["ModelConfig"].adversarial_epsilon == 0.0


@pytest.mark.slow
def test_predict_and_explain_name_the_fix_for_a_dashed_text_and_a_missing_out_folder(messy_run, tmp_path, capsys):
    workdir = messy_run[0]
    for command in (["predict", "--workdir", workdir, "-bad"], ["explain", "--workdir", workdir, "-bad"],
                    ["predict", "--workdir", workdir, "-1e5"]):  # float() reads it, argparse takes it for an option
        with pytest.raises(SystemExit) as info:
            sentiment.main([str(a) for a in command])
        assert info.value.code == 2
        assert f"{command[-1]!r} is no option of this command; a text starting with '-' goes after --" in capsys.readouterr().err
    assert sentiment.predict(["--workdir", str(workdir), "--", "-bad"])[0][0] in ("0", "1")
    with pytest.raises(SystemExit) as info:
        sentiment.main(["explain", "--workdir", str(workdir), "--out", str(tmp_path / "nowhere" / "e.png"), "good"])
    assert info.value.code == 2
    assert f"--out {tmp_path / 'nowhere' / 'e.png'}: the folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
