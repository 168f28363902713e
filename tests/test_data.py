"""Tests for lstm_jax.data, against the real datasets in ../shared/data."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: Hub lookups fail fast
os.environ["HF_HUB_OFFLINE"] = "1"

import collections
import itertools
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lstm_jax import data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Another test module may have imported `datasets` before the variables above were set.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def sst2():
    return data.load_text_splits(str(DATA / "sst2"))


@pytest.fixture(scope="module")
def imdb():
    return data.load_text_splits(str(DATA / "imdb"))


def write_split(folder: Path, split: str, columns: dict, schema: pa.Schema | None = None) -> Path:
    """Writes one parquet split file (raw pyarrow, so invalid data can be written too)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), folder / f"{split}.parquet")
    return folder


def tiny_folder(tmp_path: Path, **splits) -> str:
    """A folder with `split=(texts, labels)` parquet files in columns text / label."""
    for split, (texts, labels) in splits.items():
        write_split(tmp_path, split, {"text": texts, "label": pa.array(labels, pa.int64())})
    return str(tmp_path)


TRAIN = (["good", "bad", "fine", "awful", "great", "poor"] * 2, [1, 0, 1, 0, 1, 0] * 2)


# --------------------------------------------------------------------------- loading


def test_sst2_splits_schema_and_classes(sst2):
    assert (len(sst2.train), len(sst2.validation), len(sst2.test)) == (67_349, 872, 1_821)
    assert sst2.num_classes == 2
    assert sst2.label_names == ("negative", "positive")
    assert sst2.notes == ()
    for split in (sst2.train, sst2.validation, sst2.test):
        assert split.column_names == ["text", "label"]
        assert split.features["text"].dtype == "string"
        assert split.features["label"].dtype == "int64"
    assert sst2.train[0]["text"].startswith("hide new secretions")
    assert np.bincount(data.labels_of(sst2.validation)).tolist() == [428, 444]


def test_imdb_carves_validation_without_overlap(imdb):
    assert len(imdb.validation) == 2_500
    assert len(imdb.train) + len(imdb.validation) == 25_000
    assert len(imdb.test) == 25_000
    assert any("carved 10% (2500 rows)" in note and "seed 0" in note for note in imdb.notes)
    raw = datasets.load_dataset(str(DATA / "imdb"))["train"]
    original = collections.Counter(raw["text"][:])
    # Duplicate reviews exist, so compare multisets: the carve is an exact partition.
    assert collections.Counter(data.texts_of(imdb.train)) + collections.Counter(
        data.texts_of(imdb.validation)) == original
    labels_val = data.labels_of(imdb.validation)
    assert 1_100 < labels_val.sum() < 1_400  # a random carve, not the first (all-negative) rows


def test_imdb_carve_depends_on_seed_only(imdb):
    again = data.load_text_splits(str(DATA / "imdb"), seed=0)
    other = data.load_text_splits(str(DATA / "imdb"), seed=1)
    assert data.texts_of(again.validation) == data.texts_of(imdb.validation)
    assert data.texts_of(other.validation) != data.texts_of(imdb.validation)
    assert len(other.validation) == 2_500


def test_folder_without_train_split_is_an_error():
    with pytest.raises(data.DataError, match="no train split"):
        data.load_text_splits(str(DATA / "ag_news"))


def test_column_override_and_missing_columns(tmp_path):
    folder = write_split(tmp_path, "train", {"body": TRAIN[0], "stars": TRAIN[1]})
    splits = data.load_text_splits(str(folder), text_column="body", label_column="stars")
    assert splits.train.column_names == ["text", "label"]
    assert len(splits.train) + len(splits.validation) == 12
    with pytest.raises(data.DataError, match=r"columns: \['body', 'stars'\].*--text-column"):
        data.load_text_splits(str(folder))
    with pytest.raises(data.DataError, match="--label-column"):
        data.load_text_splits(str(folder), text_column="body")
    with pytest.raises(data.DataError, match="no column 'title'.*'body', 'stars'"):
        data.load_text_splits(str(folder), text_column="title", label_column="stars")


def test_hub_id_offline_is_one_line_pointing_to_a_local_folder():
    for name, hub_id in (("stanfordnlp/sst2", "stanfordnlp/sst2"), ("imdb", "stanfordnlp/imdb")):
        with pytest.raises(data.DataError) as info:
            data.load_text_splits(name)
        message = str(info.value)
        assert f"could not load '{hub_id}' from the Hugging Face Hub" in message
        assert "local folder" in message and "\n" not in message


def test_hub_id_without_a_network_fails_at_once_unless_a_copy_is_cached(tmp_path, monkeypatch):
    """Outside offline mode, a Hub host that does not resolve (here the reserved `.invalid` domain) gives the one-line
    error before `huggingface_hub`'s five retries; a cached copy of the dataset still goes to `datasets`."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))
    program = "from lstm_jax import data\ntry:\n    data.load_text_splits('stanfordnlp/sst2')\nexcept data.DataError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert "host hub.invalid does not resolve, and no copy of stanfordnlp/sst2 is cached" in done.stdout
    assert "local folder" in done.stdout and "Retry" not in done.stdout + done.stderr
    monkeypatch.setattr(data.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert not data._hub_cache_has("stanfordnlp/sst2")
    (tmp_path / "hub" / "datasets--stanfordnlp--sst2").mkdir(parents=True)
    assert data._hub_cache_has("stanfordnlp/sst2")


def test_a_preset_name_is_the_preset_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """``--dataset imdb`` run where ``./imdb`` exists (a --workdir of that name, say) is the Hub preset; the folder is
    read when written as a path."""
    tiny_folder(tmp_path / "imdb", train=TRAIN, validation=(["a", "b"], [0, 1]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError) as info:
        data.load_text_splits("imdb")
    message = str(info.value)
    assert "could not load 'stanfordnlp/imdb' from the Hugging Face Hub" in message and "./imdb" in message
    assert "\n" not in message
    assert len(data.load_text_splits("./imdb").train) == len(TRAIN[0])


def test_a_hub_dataset_with_several_configurations_takes_one(tmp_path, monkeypatch):
    """``--dataset-config`` reaches ``datasets.load_dataset``; without it, the error lists the configurations (the
    text ``datasets`` raises, here without the network); a local folder has none."""
    table = {"sentence": TRAIN[0], "label": TRAIN[1]}
    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        if name is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['cola', 'sst2']"
                             "\nExample of usage:\n\t`load_dataset('nyu-mll/glue', 'cola')`")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(data.load_text_splits("nyu-mll/glue", config="sst2").train) + 1 == len(TRAIN[0])  # 1 carved
    assert calls == [("nyu-mll/glue", "sst2")]
    with pytest.raises(data.DataError) as info:
        data.load_text_splits("nyu-mll/glue")
    assert str(info.value) == "'nyu-mll/glue' has several configurations ['cola', 'sst2']; pick one with --dataset-config NAME"
    folder = tiny_folder(tmp_path / "local", train=TRAIN)
    with pytest.raises(data.DataError, match="is a local folder; drop --dataset-config"):
        data.load_text_splits(folder, config="sst2")


def test_missing_local_folder(tmp_path):
    for path in (str(tmp_path / "nope"), "./no/such/folder"):
        with pytest.raises(data.DataError, match="does not exist"):
            data.load_text_splits(path)


def test_dataset_path_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    tiny_folder(tmp_path / "data" / "tiny", train=TRAIN, validation=(["a", "b"], [0, 1]))
    monkeypatch.setenv("HOME", str(tmp_path))
    for dataset in ("~/data/tiny", "~/data/tiny/"):
        assert data.texts_of(data.load_text_splits(dataset).validation) == ["a", "b"]
    with pytest.raises(data.DataError, match=r"local folder '.*/data/nowhere' does not exist"):
        data.load_text_splits("~/data/nowhere")


def test_classes_are_checked_after_the_carve(tmp_path):
    """A class with one example lands on one side of the carve; the other side gets a note, as without a carve."""
    texts = [f"text {i}" for i in range(10)]
    folder = tiny_folder(tmp_path / "three", train=(texts, [0, 1] * 4 + [2, 0]))
    sides = set()
    for seed in range(8):
        splits = data.load_text_splits(folder, val_fraction=0.2, seed=seed)
        in_validation = "text 8" in data.texts_of(splits.validation)
        side = "train" if in_validation else "validation"
        sides.add(side)
        missing_2 = rf"{side}: no examples of class\(es\) \[(\d, )*2\] out of 3"
        assert any(re.fullmatch(missing_2, note) for note in splits.notes), (seed, splits.notes)
    assert sides == {"train", "validation"}
    folder = tiny_folder(tmp_path / "rare", train=(texts[:4], [0, 0, 0, 1]))
    outcomes = set()
    for seed in range(8):  # the one class-1 row is carved into validation by some seeds, leaving train one class
        try:
            splits = data.load_text_splits(folder, val_fraction=0.25, seed=seed)
        except data.DataError as error:
            one_class = r"split 'train' has examples of 1 class\(es\) only \(\[0\]\).*add examples.*"
            assert re.fullmatch(one_class, str(error))
            outcomes.add("error")
        else:
            assert "text 3" in data.texts_of(splits.train)
            assert "validation: no examples of class(es) [1] out of 2" in splits.notes
            outcomes.add("note")
    assert outcomes == {"error", "note"}


def test_labels_out_of_range_negative_or_strings(tmp_path):
    folder = tiny_folder(tmp_path / "big", train=TRAIN, validation=(["x", "y", "z"], [0, 2, 2]))
    with pytest.raises(data.DataError, match="'validation' has 2 labels >= num_classes=2"):
        data.load_text_splits(folder)
    folder = tiny_folder(tmp_path / "neg", train=(TRAIN[0], [0, -2, 1, -3, 1, 0] * 2))
    with pytest.raises(data.DataError, match="'train' has 4 negative labels"):
        data.load_text_splits(folder)


def test_class_name_labels_become_ids_in_name_order_in_every_split(tmp_path):
    names = ["pos", "neg", "neutral"] * 4  # each word of TRAIN keeps one name: its 6 words repeat, 6 % 3 == 0
    folder = write_split(tmp_path / "names", "train", {"text": TRAIN[0], "label": names})
    write_split(folder, "test", {"text": ["a", "b", "c"], "label": ["neutral", "pos", "neg"]})
    splits = data.load_text_splits(str(folder), seed=1)
    assert splits.num_classes == 3 and splits.label_names == ("neg", "neutral", "pos")
    assert data.labels_of(splits.test).tolist() == [1, 2, 0]
    by_text = dict(zip(TRAIN[0], names))
    for split in (splits.train, splits.validation):
        for text, label in zip(data.texts_of(split), data.labels_of(split)):
            assert splits.label_names[label] == by_text[text]


def test_integer_labels_written_as_strings_are_integers(tmp_path):
    """JSON files often hold "0" / "1": read as integers, "10" comes after "9" and "-1" is unlabelled."""
    texts = [f"text {i}" for i in range(12)]
    folder = write_split(tmp_path / "ints", "train", {"text": texts, "label": [str(i) for i in range(12)]})
    write_split(folder, "validation", {"text": ["a", "b", "c"], "label": ["10", "-1", "2"]})
    write_split(folder, "test", {"text": ["p", "q"], "label": ["-1", "-1"]})
    splits = data.load_text_splits(str(folder))
    assert splits.num_classes == 12 and splits.label_names == tuple(str(i) for i in range(12))
    assert data.labels_of(splits.train).tolist() == list(range(12))
    assert data.labels_of(splits.validation).tolist() == [10, 2] and splits.test is None
    assert "validation: removed 1 unlabelled rows (label -1)" in splits.notes
    assert "test: all 2 labels are -1 (unlabelled); split not used" in splits.notes
    names = write_split(tmp_path / "names", "train", {"text": texts, "label": ["-1", "x1"] * 6})  # a name among them
    assert data.load_text_splits(str(names), val_fraction=0.5).label_names == ("-1", "x1")
    stars = write_split(tmp_path / "stars", "train", {"text": texts, "label": ["1", "2", "3", "unrated"] * 3})
    write_split(stars, "validation", {"text": ["a", "b"], "label": ["1", "3"]})  # names of train's, though digits only
    splits = data.load_text_splits(str(stars))
    assert splits.label_names == ("1", "2", "3", "unrated") and data.labels_of(splits.validation).tolist() == [0, 2]


def test_data_files_in_no_split_are_named_in_a_note(tmp_path):
    folder = tiny_folder(tmp_path, train=TRAIN, test=TRAIN)
    write_split(tmp_path / "extra", "holdout", {"text": ["a"], "label": [0]})
    write_split(tmp_path, "holdout", {"text": ["a"], "label": [0]})
    (tmp_path / "README.md").write_text("not data")
    notes = data.load_text_splits(folder).notes
    assert ("files in " + folder + " that are in no split, so not read: holdout.parquet, extra/holdout.parquet "
            "(`datasets` names splits by file name: train*, test*, validation*/dev*/valid*; rename a file to use it)") in notes
    assert not any("in no split" in note for note in data.load_text_splits(tiny_folder(tmp_path / "ok", train=TRAIN)).notes)


def test_splits_other_than_train_validation_and_test_are_named_in_a_note(tmp_path, monkeypatch):
    table = {"text": TRAIN[0], "label": TRAIN[1]}
    raw = datasets.DatasetDict({name: datasets.Dataset.from_dict(table) for name in ("train", "test", "unsupervised")})
    monkeypatch.setattr(data, "_load_raw", lambda dataset, config: raw)
    notes = data.load_text_splits("anything").notes
    assert "splits not used: unsupervised (read are train, validation or dev or valid, and test)" in notes


def test_class_label_bounds_the_labels(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})
    schema = datasets.Dataset.from_dict({"text": ["a"], "label": [0]}, features=features).data.table.schema
    folder = write_split(tmp_path / "ok", "train", {"text": TRAIN[0], "label": TRAIN[1]}, schema)
    assert data.load_text_splits(str(folder)).label_names == ("no", "yes")
    folder = write_split(tmp_path / "bad", "train",
                         {"text": TRAIN[0], "label": [0, 1, 2, 0, 1, 0] * 2}, schema)
    with pytest.raises(data.DataError, match="'train' has 2 labels >= num_classes=2"):
        data.load_text_splits(str(folder))


def test_unlabelled_test_split_is_dropped_and_partial_minus_one_rows_removed(tmp_path):
    folder = tiny_folder(tmp_path, train=TRAIN, validation=(["a", "b", "c"], [0, -1, 1]),
                         test=(["p", "q"], [-1, -1]))
    splits = data.load_text_splits(folder)
    assert splits.test is None
    assert any("test: all 2 labels are -1" in note for note in splits.notes)
    assert data.texts_of(splits.validation) == ["a", "c"]
    assert any("validation: removed 1 unlabelled" in note for note in splits.notes)
    assert len(splits.train) == 12


def test_missing_text_is_empty_and_counted_and_non_string_text_is_an_error(tmp_path):
    folder = tiny_folder(tmp_path / "none", train=(["a", None] * 6, TRAIN[1]))
    splits = data.load_text_splits(folder, val_fraction=0.5)
    assert any("train: 6 missing texts read as empty" in note for note in splits.notes)
    assert sorted(data.texts_of(splits.train) + data.texts_of(splits.validation)) == [""] * 6 + ["a"] * 6
    folder = write_split(tmp_path / "int", "train", {"text": list(range(12)), "label": TRAIN[1]})
    with pytest.raises(data.DataError, match="not string"):
        data.load_text_splits(str(folder))
    with pytest.raises(data.DataError, match="val_fraction"):
        data.load_text_splits(str(DATA / "sst2"), val_fraction=1.0)


# ------------------------------------------------------------------------- tokeniser


def test_tokenizer_normalises_and_maps_unknown_words(tmp_path):
    tok = data.train_tokenizer(["The film was GREAT.<br />Really<br/>great!", "the plot, the end"])
    assert tok.token_to_id("[PAD]") == data.PAD_ID and tok.token_to_id("[UNK]") == data.UNK_ID
    assert tok.encode("GREAT great").ids == [tok.token_to_id("great")] * 2
    assert tok.encode("The<BR />end<br>plot").tokens == ["the", "end", "plot"]
    assert "<" not in tok.get_vocab() and "br" not in tok.get_vocab()
    assert tok.encode("the zebra").ids == [tok.token_to_id("the"), data.UNK_ID]
    path = tmp_path / "tokenizer.json"
    data.save_tokenizer(tok, path)
    texts = ["Great plot!", "unknown words here", ""]
    assert [e.ids for e in data.load_tokenizer(path).encode_batch(texts)] == [
        e.ids for e in tok.encode_batch(texts)]
    with pytest.raises(data.DataError, match="missing.json"):
        data.load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("model", data.TOKENIZER_MODELS)
def test_tokenizer_reads_special_token_names_in_text_as_words(tmp_path, model):
    """A text that quotes `[PAD]` or `[UNK]` gets the ids of the same words lower-cased, never the padding or
    unknown-word id; also through a tokenizer file saved with them as added tokens (runs before 2026-12-03)."""
    texts = ["a [PAD] b [UNK] c", "pad unk [ ] a b c"] * 3
    tok = data.train_tokenizer(texts, vocab_size=60, model=model)
    quoted, lowered = "the [PAD] and [UNK] here", "the [pad] and [unk] here"
    lowered_ids = tok.encode(lowered).ids
    assert tok.encode(quoted).ids == lowered_ids
    assert data.PAD_ID not in tok.encode(quoted).ids
    tok.add_special_tokens(["[PAD]", "[UNK]"])  # the tokenizer as runs of before 2026-12-03 saved it
    assert tok.encode(quoted).ids[1] == data.PAD_ID
    tok.save(str(tmp_path / "old.json"))
    assert data.load_tokenizer(tmp_path / "old.json").encode(quoted).ids == lowered_ids


def test_tokenizer_reads_controls_as_spaces_and_drops_invisible_characters_inside_words():
    """C1 controls (cp1252's curly quotes and dashes read as Latin-1) and C0 controls separate words; soft hyphens and
    zero-width joiners inside a word are dropped, and every such text is counted."""
    tok = data.train_tokenizer(["great film softly", "\u0645\u06cc\u062e\u0648\u0627\u0647\u0645"])
    assert tok.encode("\x93great\x94 film\x96softly").tokens == ["great", "film", "softly"]
    assert tok.encode("soft\u00adly gr\u200deat\x00film\u200bsoftly").tokens == ["softly", "great", "film", "softly"]
    assert tok.encode("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645").tokens == ["\u0645\u06cc\u062e\u0648\u0627\u0647\u0645"]
    texts = pa.chunked_array([["\x93great\x94", "plain", "soft\u00adly", "tab\there", "a\u200bb", "\x00"]])
    assert data._count_with_control_characters(texts) == 4


def test_cjk_ideographs_are_words_of_their_own_and_unknown_words_are_counted():
    tok = data.train_tokenizer(["\u8fd9\u90e8\u7535\u5f71\u597d good film"])
    assert tok.encode("\u7535\u5f71\u597d").tokens == ["\u7535", "\u5f71", "\u597d"]  # not one unseen run
    assert tok.encode("\u4e0d\u597d").tokens == ["[UNK]", "\u597d"]
    encoded = data.encode(tok, ["good zebra film", "", "yak yak"], max_len=8)
    assert encoded.num_empty == 1 and data.unknown_tokens(encoded) == 3  # the empty text's [UNK] is not a word


def test_tokenizer_vocab_cap_and_bad_input():
    texts = [" ".join(f"w{i}" for i in range(k)) for k in range(1, 50)]
    tok = data.train_tokenizer(texts, vocab_size=10)
    assert tok.get_vocab_size() == 10
    assert tok.token_to_id("w0") is not None  # the most frequent words are kept
    assert data.train_tokenizer(["a a b"], min_freq=2).get_vocab_size() == 3
    with pytest.raises(data.DataError, match="vocab_size"):
        data.train_tokenizer(texts, vocab_size=2)
    with pytest.raises(data.DataError, match="must be strings"):
        data.train_tokenizer(["ok", 3])
    for bad in (None, b"bytes"):
        with pytest.raises(data.DataError, match=f"texts must be strings, found {type(bad).__name__}"):
            data.train_tokenizer(["ok", bad])
        with pytest.raises(data.DataError, match=f"texts must be strings, found {type(bad).__name__}"):
            data.encode(tok, ["ok", bad], max_len=4)


def test_wordpiece_keeps_frequent_words_whole_and_reads_unseen_words_through_pieces(tmp_path):
    texts = pq.read_table(DATA / "sst2" / "train.parquet").column("sentence").to_pylist()[:5000]
    tok = data.train_tokenizer(texts, vocab_size=3000, model="wordpiece")
    assert tok.token_to_id("[PAD]") == data.PAD_ID and tok.token_to_id("[UNK]") == data.UNK_ID
    assert tok.get_vocab_size() == 3000
    assert tok.encode("The Film<br />").tokens == ["the", "film"]  # same normalisation as the word model
    seen = {word for text in texts for word in text.lower().split()}
    assert "warmly" not in seen and "warm" in seen
    pieces = tok.encode("warmly").tokens
    assert len(pieces) > 1 and "".join(p.removeprefix("##") for p in pieces) == "warmly" and data.UNK_ID not in tok.encode("warmly").ids
    data.save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert data.load_tokenizer(tmp_path / "tokenizer.json").encode("warmly").ids == tok.encode("warmly").ids
    with pytest.raises(data.DataError, match="unknown tokenizer model 'bpe'; choose one of word, wordpiece"):
        data.train_tokenizer(texts, model="bpe")


def test_wordpiece_training_gives_the_same_tokenizer_in_every_process():
    """`tokenizers` numbers the ``##`` pieces in hash-map order, which changes per process, and breaks ties between
    merges by those numbers; lstm_jax pins them first in sorted order, so fresh processes train the same file."""
    program = ("import hashlib, sys, pyarrow.parquet as pq\nfrom lstm_jax import data\n"
               "texts = pq.read_table(sys.argv[1]).column('sentence').to_pylist()[:5000]\n"
               "tok = data.train_tokenizer(texts, vocab_size=3000, model='wordpiece')\n"
               "print(hashlib.sha256(tok.to_str().encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", program, str(DATA / "sst2" / "train.parquet")], check=True,
                              capture_output=True, text=True, timeout=120).stdout.strip() for _ in range(3)}
    assert len(digests) == 1
    tok = data.train_tokenizer(["ab ba ca", "abc cab"], vocab_size=30, model="wordpiece")
    pinned = sorted((i, piece) for piece, i in tok.get_vocab().items() if piece.startswith("##"))[:3]
    assert pinned == [(2, "##a"), (3, "##b"), (4, "##c")]  # right after [PAD] and [UNK], in character order
    assert tok.encode("cab ab").tokens == ["cab", "ab"] and data.UNK_ID not in tok.encode("bac").ids


# -------------------------------------------------------------------------- encoding


def test_encode_counts_truncation_and_empty_texts():
    tok = data.train_tokenizer(["a b c d e"])
    texts = ["", "a", "a b c d e", "a b c d e a", " ".join(["b"] * 12), "<br />", "zzz"]
    enc = data.encode(tok, texts, max_len=5)
    assert len(enc) == 7
    assert enc.lengths_N.tolist() == [1, 1, 5, 5, 5, 1, 1]
    assert enc.num_truncated == 2 and enc.num_empty == 2
    assert enc.row(0).tolist() == [data.UNK_ID] and enc.row(6).tolist() == [data.UNK_ID]
    assert enc.row(3).tolist() == [tok.token_to_id(w) for w in "abcde"]
    assert enc.ids_flat.dtype == np.int32
    with pytest.raises(data.DataError, match="max_len"):
        data.encode(tok, texts, max_len=0)


# ------------------------------------------------------------------ bucketing, batching


def padded_steps(lengths, buckets):
    buckets = np.asarray(buckets)
    return int((buckets[np.searchsorted(buckets, lengths)] - lengths).sum())


def test_bucket_lengths_minimise_padding_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(100):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 60)))
        num_buckets = int(rng.integers(1, 5))
        buckets = data.bucket_lengths(lengths, max_len=40, num_buckets=num_buckets)
        inner = np.unique(lengths)[:-1]
        best = min(padded_steps(lengths, (*c, lengths.max())) for k in range(num_buckets) for c in itertools.combinations(inner, k))
        assert len(buckets) <= num_buckets and buckets[-1] == lengths.max()
        assert padded_steps(lengths, buckets) == best


def test_bucket_lengths_are_few_ascending_and_capped():
    lengths = np.random.default_rng(0).integers(1, 700, size=5_000)
    for max_len in (256, 100, 1_000):
        buckets = data.bucket_lengths(lengths, max_len=max_len)
        assert 1 <= len(buckets) <= 8 and list(buckets) == sorted(set(buckets))
        assert buckets[-1] == min(lengths.max(), max_len)
    assert data.bucket_lengths([3, 3, 3], max_len=50) == (3,)
    assert data.bucket_lengths([0, 0], max_len=50) == (1,)
    assert len(data.bucket_lengths(lengths, max_len=1_000, num_buckets=3)) == 3
    huge = np.random.default_rng(1).integers(1, 100_000, size=3_000)  # more distinct lengths than the programme's 1024
    assert data.bucket_lengths(huge, max_len=200_000)[-1] == huge.max()  # rounded to the programme's steps, but
    assert data.bucket_lengths([1, 2000, 2001], max_len=5000) == (2, 2000, 2001)  # never past the longest text


def synthetic(lengths_N):
    """Encoded rows whose every token is `row index + 2`, so batches reveal their rows."""
    lengths_N = np.asarray(lengths_N)
    ids_flat = np.repeat(np.arange(len(lengths_N), dtype=np.int32) + 2, lengths_N)
    offsets = np.concatenate([[0], np.cumsum(lengths_N)])
    return data.Encoded(ids_flat, offsets, num_truncated=0, num_empty=0)


def rows_of(batch):
    """Row indices of the real rows of a batch, after checking tokens and padding."""
    real = batch.weights_B == 1
    assert set(np.unique(batch.weights_B)) <= {0.0, 1.0}
    assert np.all(batch.lengths_B[~real] == 0) and np.all(batch.tokens_BT[~real] == data.PAD_ID)
    inside = np.arange(batch.tokens_BT.shape[1]) < batch.lengths_B[:, None]
    assert np.all(batch.tokens_BT[~inside] == data.PAD_ID)
    rows = batch.tokens_BT[real, 0] - 2
    assert np.all(batch.tokens_BT[inside] == np.repeat(batch.tokens_BT[:, 0], batch.lengths_B))
    return rows


def test_epoch_batches_cover_every_example_once_with_static_shapes():
    lengths = np.minimum(np.random.default_rng(1).integers(1, 90, size=1_003), 64)  # as encode cuts
    labels = np.arange(1_003) % 3
    encoded, buckets = synthetic(lengths), data.bucket_lengths(lengths, max_len=64)
    batches = data.epoch_batches(encoded, labels, batch_size=32, buckets=buckets, seed=0, epoch=0)
    rows = np.concatenate([rows_of(b) for b in batches])
    assert sorted(rows.tolist()) == list(range(1_003))
    assert len({b.tokens_BT.shape for b in batches}) <= len(buckets)
    assert all(b.tokens_BT.shape[0] == 32 and b.tokens_BT.dtype == np.int32 for b in batches)
    for b in batches:
        real_rows = rows_of(b)
        assert np.array_equal(b.labels_B[b.weights_B == 1], labels[real_rows])
        assert np.array_equal(b.lengths_B[b.weights_B == 1], lengths[real_rows])
        assert b.tokens_BT.shape[1] == buckets[np.searchsorted(buckets, b.lengths_B.max())]


def test_epoch_batches_are_deterministic_per_seed_and_epoch():
    lengths = np.random.default_rng(2).integers(1, 60, size=500)
    encoded, labels = synthetic(lengths), np.zeros(500, int)
    buckets = data.bucket_lengths(lengths, max_len=64)

    def order(seed, epoch, shuffle=True):
        batches = data.epoch_batches(encoded, labels, batch_size=16, buckets=buckets,
                                     seed=seed, epoch=epoch, shuffle=shuffle)
        return [rows_of(b).tolist() for b in batches]

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    stable = order(0, 0, shuffle=False)
    assert stable == order(5, 9, shuffle=False)
    assert all(rows == sorted(rows) for rows in stable)


def test_epoch_batches_batch_size_larger_than_dataset_and_bad_input():
    lengths = np.array([3, 9, 17, 2, 30])
    encoded, buckets = synthetic(lengths), (8, 16, 32)
    batches = data.epoch_batches(encoded, np.ones(5), batch_size=64, buckets=buckets, seed=0, epoch=0)
    assert len(batches) == 3 and sum(b.weights_B.sum() for b in batches) == 5
    assert {b.tokens_BT.shape for b in batches} == {(64, 8), (64, 16), (64, 32)}
    with pytest.raises(data.DataError, match="exceeds the largest bucket"):
        data.epoch_batches(encoded, np.ones(5), batch_size=4, buckets=(8, 16), seed=0, epoch=0)
    with pytest.raises(data.DataError, match="one label per text"):
        data.epoch_batches(encoded, np.ones(4), batch_size=4, buckets=buckets, seed=0, epoch=0)
    with pytest.raises(data.DataError, match="batch_size"):
        data.epoch_batches(encoded, np.ones(5), batch_size=0, buckets=buckets, seed=0, epoch=0)
    with pytest.raises(data.DataError, match="a row of 17 tokens does not fit the padded length 16"):
        data.gather_batch(encoded, np.ones(5), np.array([0, 2, -1]), 16)


def test_sst2_end_to_end_epoch(sst2):
    tok = data.train_tokenizer(data.texts_of(sst2.train), vocab_size=5_000)
    encoded = data.encode(tok, data.texts_of(sst2.train), max_len=64)
    assert len(encoded) == 67_349 and encoded.num_truncated == 0 and encoded.num_empty == 0
    buckets = data.bucket_lengths(encoded.lengths_N, max_len=64)
    labels = data.labels_of(sst2.train)
    batches = data.epoch_batches(encoded, labels, batch_size=64, buckets=buckets, seed=0, epoch=0)
    assert sum(b.weights_B.sum() for b in batches) == 67_349
    assert sum(b.labels_B[b.weights_B == 1].sum() for b in batches) == labels.sum() == 37_569
    assert len({b.tokens_BT.shape for b in batches}) <= len(buckets) <= 8
    assert len(batches) <= 67_349 // 64 + len(buckets)
