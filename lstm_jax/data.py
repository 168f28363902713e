"""Text-classification data: Hugging Face datasets in, static-shape batches out.

The pipeline is four steps, each a small function a notebook can call alone:

  splits = load_text_splits("sst2")                    # or a Hub id, or a local folder
  tok = train_tokenizer(texts_of(splits.train), vocab_size=20000)
  enc = encode(tok, texts_of(splits.train), max_len=256)
  buckets = bucket_lengths(enc.lengths_N, max_len=256)
  batches = epoch_batches(enc, labels_of(splits.train), batch_size=64,
                          buckets=buckets, seed=0, epoch=0)

Every batch has a shape from the few `(batch_size, bucket)` pairs, so XLA
compiles a handful of programs. The order depends only on `(seed, epoch)`.
Nothing is dropped or truncated silently: see `TextSplits.notes` and the
counts in `Encoded`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from lstm_jax.vocab import PAD, PAD_ID, UNK, UNK_ID

PRESETS = {
    "sst2": "stanfordnlp/sst2",
    "imdb": "stanfordnlp/imdb",
    "ag_news": "fancyzhx/ag_news",
    "yelp_polarity": "fancyzhx/yelp_polarity",
    "rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes",
}
TEXT_COLUMNS = ("sentence", "text", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment")
VALIDATION_NAMES = ("validation", "dev", "valid")
UNLABELLED = -1  # the Hub's marker for a hidden label (e.g. the GLUE test split)


class DataError(ValueError):
    """Bad data or arguments; the message is one line that names the fix."""


@dataclasses.dataclass(frozen=True)
class TextSplits:
    """Splits with exactly two columns, `text` (str) and `label` (int64)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset | None
    num_classes: int
    label_names: tuple[str, ...]
    notes: tuple[str, ...]

    def used(self) -> dict[str, datasets.Dataset]:
        """``{name: split}`` for the splits a run reads: train, validation, and test where there is one."""
        named = {"train": self.train, "validation": self.validation, "test": self.test}
        return {name: split for name, split in named.items() if split is not None}


# --------------------------------------------------------------------------- loading


def _load_raw(dataset: str, config: str | None = None) -> datasets.DatasetDict:
    """Loads a preset name, a local folder (``~`` expanded) or a Hub id (with its ``config``, if it has several) as a
    `DatasetDict`."""
    dataset = os.path.expanduser(dataset)
    hub_id = PRESETS.get(dataset, dataset)
    # A preset's bare name is the preset, even beside a folder of that name (a --workdir called sst2, say).
    if os.path.isdir(dataset) and dataset not in PRESETS:
        if config is not None:
            raise DataError(f"--dataset-config {config} names a configuration of a Hub dataset, but '{dataset}' is a "
                            "local folder; drop --dataset-config")
        try:
            return datasets.load_dataset(dataset)
        except Exception as err:
            raise _folder_error(dataset, err) from err
    looks_local = dataset.startswith((".", os.sep, "~")) or dataset.count("/") > 1 or (
        os.altsep is not None and os.altsep in dataset)
    if looks_local:
        raise DataError(f"local folder '{dataset}' does not exist; pass an existing folder "
                        f"or a Hub id / preset ({', '.join(PRESETS)})")
    try:
        if (host := _unresolvable_hub_host()) and not _hub_cache_has(hub_id):
            raise ConnectionError(f"no network: the Hub's host {host} does not resolve, and no copy of {hub_id} is cached")
        return datasets.load_dataset(hub_id, config)
    except Exception as err:
        if configs := re.search(r"Config name is missing.*?available configs: (\[[^\]]*\])", str(err), re.S):
            raise DataError(f"'{hub_id}' has several configurations {configs[1]}; pick one with --dataset-config "
                            "NAME") from err
        folder = f" (for the folder '{dataset}' here, write it as a path: ./{dataset})" if os.path.isdir(dataset) else ""
        raise DataError(f"could not load '{hub_id}' from the Hugging Face Hub ({_short(err)}); "
                        f"check the name (presets: {', '.join(PRESETS)}), or with no network "
                        f"pass a local folder: --dataset path/to/folder{folder}") from err


def _unresolvable_hub_host() -> str | None:
    """The Hub's host name if it does not resolve (no network), else None; None too in offline mode, which fails fast.

    Without a network `huggingface_hub` retries each request five times over about 25 seconds before `datasets`
    gives up; a failed name lookup says the same at once.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return None
    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def _hub_cache_has(hub_id: str) -> bool:
    """Whether `datasets` could find a copy of the Hub dataset ``hub_id`` in its caches without a network."""
    return (os.path.isdir(os.path.join(huggingface_hub.constants.HF_HUB_CACHE, f"datasets--{hub_id.replace('/', '--')}"))
            or os.path.isdir(os.path.join(datasets.config.HF_DATASETS_CACHE, hub_id.replace("/", "___"))))


DATA_FILE_ENDINGS = (".parquet", ".csv", ".tsv", ".json", ".jsonl", ".arrow")
DATASET_METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")


def _unread_files(dataset: str) -> list[str]:
    """The data files of a local folder that `datasets` maps to no split (it reads only files named as splits, once
    one is), as paths relative to the folder; [] for a Hub id or a preset."""
    folder = os.path.expanduser(dataset)
    if not os.path.isdir(folder) or dataset in PRESETS:
        return []
    try:
        split_files = datasets.load_dataset_builder(folder).config.data_files or {}
    except Exception:  # noqa: BLE001 - the load itself succeeded; a note is not worth failing over
        return []
    read = {os.path.realpath(path) for paths in split_files.values() for path in paths}
    unread = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        unread += [os.path.relpath(os.path.join(root, name), folder) for name in sorted(files)
                   if name.lower().endswith(DATA_FILE_ENDINGS) and name not in DATASET_METADATA_FILES
                   and os.path.realpath(os.path.join(root, name)) not in read]
    return unread


def _folder_error(folder: str, err: Exception) -> DataError:
    """The one-line `DataError` for a local folder that `datasets` could not read."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]  # `datasets` wraps the telling error in a generic one
    if any(isinstance(e, UnicodeDecodeError) or "Invalid UTF8" in str(e) for e in chain):
        return DataError(f"a file in '{folder}' is not UTF-8 ({_short(root)}); "
                         "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 in.csv > out.csv")
    if "column names don't match" in str(root):
        return DataError(f"the split files in '{folder}' have different columns ({_short(root)}); "
                         "give every split the same column names")
    if "corresponds to no data" in str(root) or "BatchSize must be greater than 0" in str(root):
        return DataError(f"a split file in '{folder}' has no rows ({_short(root)}); add rows or delete that file")
    return DataError(f"could not read local folder '{folder}' ({_short(root)}); it should hold train/validation/test "
                     "files (parquet, csv, json) with the same columns, each of one type")


def _short(err: Exception, limit: int = 160) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:limit]}"


def _pick_column(columns: Sequence[str], requested: str | None, candidates: Sequence[str],
                 flag: str) -> str:
    if requested is not None and requested in columns:
        return requested
    if requested is None:
        for name in candidates:
            if name in columns:
                return name
    wanted = f"'{requested}'" if requested else f"one of {list(candidates)}"
    raise DataError(f"no column {wanted} in the data (columns: {list(columns)}); "
                    f"pass {flag} NAME")


def _text_array(split: datasets.Dataset, column: str, split_name: str) -> tuple[pa.ChunkedArray, int]:
    """Returns the text column as strings, with nulls as "", and the null count."""
    texts = split.with_format("arrow")[column]
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise DataError(f"text column '{column}' of split '{split_name}' has type {texts.type}, "
                        "not string; make every value a string, or pick another column with --text-column")
    return pc.fill_null(texts, ""), texts.null_count


# Written \x{..}, which both regex engines here (pyarrow's RE2 and the tokenizer's Oniguruma) read as code points:
# Oniguruma reads \x80-\x9f as raw bytes, so C1 controls would stay in the text. Controls other than tab, newline
# and carriage return, and the zero-width space, separate words; the other invisible format characters (Cf: soft
# hyphen, zero-width (non-)joiner, byte-order mark, direction marks) sit inside words and are dropped.
SPACE_CHARACTERS = r"[\x{00}-\x{08}\x{0b}\x{0c}\x{0e}-\x{1f}\x{7f}-\x{9f}\x{200b}]"
FORMAT_CHARACTERS = r"\p{Cf}"
CONTROL_CHARACTERS = f"{SPACE_CHARACTERS}|{FORMAT_CHARACTERS}"  # either kind


def _count_with_control_characters(texts: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.match_substring_regex(texts, CONTROL_CHARACTERS)).as_py() or 0)


def _is_string(column_type) -> bool:
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type)


def _integer_strings(labels: pa.ChunkedArray) -> bool:
    """True for a string column whose every label is a whole number written out ("0", "1", "-1"), as JSON files
    often hold integer labels."""
    return _is_string(labels.type) and bool(pc.all(pc.match_substring_regex(labels.drop_null(), r"^-?[0-9]+$")).as_py())


def _label_names_in(split: datasets.Dataset, column: str) -> tuple[str, ...] | None:
    """The sorted distinct labels of a column of class names (strings), or None for any other column, and for
    integers written as strings, which are read as the integers they are."""
    labels = split.with_format("arrow")[column]
    if not _is_string(labels.type) or _integer_strings(labels):
        return None
    return tuple(sorted(pc.unique(labels.drop_null()).to_pylist()))


def _label_array(split: datasets.Dataset, column: str, split_name: str,
                 class_names: tuple[str, ...] | None = None) -> np.ndarray:
    """Class ids: the column's integers, or the indices in ``class_names`` of its class names (strings)."""
    labels = split.with_format("arrow")[column]
    if labels.null_count:  # before the type: pandas reads an integer column with blanks as floats
        raise DataError(f"split '{split_name}' has {labels.null_count} missing labels; "
                        "fill or remove them")
    if class_names is None and _integer_strings(labels):  # "-1" is then unlabelled, and "10" comes after "9"
        labels = pc.cast(labels, pa.int64())
    if class_names is not None and _is_string(labels.type):
        ids = pc.index_in(labels, value_set=pa.array(class_names, labels.type))
        if ids.null_count:
            unseen = sorted(set(pc.filter(labels, pc.is_null(ids)).to_pylist()))
            raise DataError(f"split '{split_name}' has {ids.null_count} labels that train never has ({unseen[:5]}); "
                            f"the classes are train's {list(class_names)[:10]}: fix the labels or remove those rows")
        return ids.to_numpy().astype(np.int64)
    if not pa.types.is_integer(labels.type):
        raise DataError(f"label column '{column}' of split '{split_name}' has type {labels.type}; labels must be "
                        "integer class ids 0..C-1 or class names as strings (map them, or pick --label-column)")
    return labels.to_numpy().astype(np.int64)


def _class_info(feature, train_labels: np.ndarray, class_names: tuple[str, ...] | None = None) -> tuple[int, tuple[str, ...]]:
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes, tuple(feature.names)
    if class_names is not None:
        return len(class_names), class_names
    labelled = train_labels[train_labels != UNLABELLED]
    present = np.unique(labelled)
    if len(present) >= 2 and present[0] > 0:  # (one class only is the next check's error)
        raise DataError(f"train labels run from {present[0]} to {present[-1]} with no class 0, which would train a class "
                        f"that never occurs; class ids start at 0 (labels 1..C: subtract 1)")
    num_classes = int(labelled.max()) + 1 if labelled.size else 0
    if num_classes > max(1000, 10 * len(present)):
        raise DataError(f"train labels go up to {num_classes - 1} but only {len(present)} distinct values occur "
                        f"({present[:5].tolist()}...); class ids must be 0..C-1: map them, or give the labels as "
                        "class names (strings)")
    return num_classes, tuple(str(c) for c in range(num_classes))


def _check_label_range(labels: np.ndarray, num_classes: int, split_name: str) -> None:
    negative = int(np.sum((labels < 0) & (labels != UNLABELLED)))
    if negative:
        raise DataError(f"split '{split_name}' has {negative} negative labels (only -1, unlabelled, "
                        "is allowed); labels must be 0..C-1")
    too_big = int(np.sum(labels >= num_classes))
    if too_big:
        raise DataError(f"split '{split_name}' has {too_big} labels >= num_classes={num_classes}; "
                        "labels must be 0..C-1 (declare a ClassLabel feature or fix the data)")


def _clean_split(split: datasets.Dataset, name: str, text_col: str, label_col: str,
                 num_classes: int, notes: list[str], class_names: tuple[str, ...] | None = None) -> pa.Table | None:
    """Returns the split as a `text` / `label` table (None if wholly unlabelled), noting changes."""
    for column, flag in ((text_col, "--text-column"), (label_col, "--label-column")):
        if column not in split.column_names:
            raise DataError(f"split '{name}' has no column '{column}' "
                            f"(columns: {split.column_names}); fix the data or pass {flag}")
    texts, num_null = _text_array(split, text_col, name)
    labels = _label_array(split, label_col, name, class_names)
    _check_label_range(labels, num_classes, name)
    if num_null:
        notes.append(f"{name}: {num_null} missing texts read as empty strings (a CSV reader also takes a text that "
                     "is only NA, N/A, null, None or nan as missing)")
    num_control = _count_with_control_characters(texts)
    if num_control:
        notes.append(f"{name}: {num_control} texts contain control or invisible characters; the tokenizer reads "
                     "controls as spaces and drops invisible ones inside words")
    unlabelled = labels == UNLABELLED
    if name != "train" and len(labels) and unlabelled.all():
        notes.append(f"{name}: all {len(labels)} labels are -1 (unlabelled); split not used")
        return None
    if unlabelled.any():
        notes.append(f"{name}: removed {int(unlabelled.sum())} unlabelled rows (label -1)")
        texts, labels = texts.filter(pa.array(~unlabelled)), labels[~unlabelled]
    return pa.table({"text": texts, "label": pa.array(labels, pa.int64())})


def _check_classes_present(table: pa.Table, num_classes: int, split_name: str, notes: list[str]) -> None:
    """Train needs two classes or more; a split without some class gets a note."""
    labels = table["label"].to_numpy()
    present = np.unique(labels)
    if split_name == "train" and len(present) < 2:
        raise DataError(f"split 'train' has examples of {len(present)} class(es) only ({present.tolist()}); "
                        "a classifier needs at least 2: add examples of the other classes")
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    if len(labels) and missing:
        notes.append(f"{split_name}: no examples of class(es) {missing} out of {num_classes}")


def _carve(table: pa.Table, val_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Splits rows into (train, validation) by a seeded permutation, keeping row order."""
    num_val = int(round(val_fraction * table.num_rows))
    if not 0 < num_val < table.num_rows:
        raise DataError(f"cannot carve {val_fraction * 100:g}% of {table.num_rows} train rows as validation; "
                        "pass a val_fraction giving at least one row on each side, or add a validation split")
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    return table.take(np.sort(perm[num_val:])), table.take(np.sort(perm[:num_val]))


def load_text_splits(dataset: str, *, text_column: str | None = None,
                     label_column: str | None = None, val_fraction: float = 0.1,
                     seed: int = 0, config: str | None = None) -> TextSplits:
    """Loads a text-classification dataset as train / validation / test splits.

    Args:
      dataset: a preset name (see `PRESETS`), a Hub id, or a local folder.
      text_column: the text column; detected from `TEXT_COLUMNS` when None.
      label_column: the label column; detected from `LABEL_COLUMNS` when None.
      val_fraction: share of train carved out as validation when there is none.
      seed: seed of that carve.
      config: the configuration (subset) of a Hub dataset that has several, e.g. ``"sst2"`` of ``"nyu-mll/glue"``.

    Returns:
      A `TextSplits`; `notes` says what was carved, removed or filled.

    Raises:
      DataError: on anything unusable, with a one-line message naming the fix.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    raw = _load_raw(dataset, config)
    if "train" not in raw:
        raise DataError(f"'{dataset}' has no train split (splits: {list(raw)}); "
                        "pass a dataset or folder with a train split")
    train_raw = raw["train"]
    text_col = _pick_column(train_raw.column_names, text_column, TEXT_COLUMNS, "--text-column")
    label_col = _pick_column(train_raw.column_names, label_column, LABEL_COLUMNS, "--label-column")
    val_name = next((name for name in VALIDATION_NAMES if name in raw), None)
    splits_used = ["train"] + ([val_name] if val_name else []) + (["test"] if "test" in raw else [])

    class_names = None if isinstance(train_raw.features[label_col], datasets.ClassLabel) else _label_names_in(train_raw, label_col)
    train_labels = _label_array(train_raw, label_col, "train", class_names)
    if not np.any(train_labels != UNLABELLED):
        raise DataError(f"train split of '{dataset}' has no labelled rows; pass a dataset with training data")
    num_classes, label_names = _class_info(train_raw.features[label_col], train_labels, class_names)
    if num_classes < 2:
        raise DataError(f"train labels give {num_classes} class(es); a classifier needs at least 2")
    notes: list[str] = []
    tables = {name: _clean_split(raw[name], name, text_col, label_col, num_classes, notes, class_names)
              for name in splits_used}
    if unused := [name for name in raw if name not in splits_used]:
        notes.append(f"splits not used: {', '.join(unused)} (read are train, {' or '.join(VALIDATION_NAMES)}, and test)")
    if unread := _unread_files(dataset):
        notes.append(f"files in {dataset} that are in no split, so not read: {', '.join(unread[:10])}"
                     f"{' ...' if len(unread) > 10 else ''} (`datasets` names splits by file name: train*, test*, "
                     "validation*/dev*/valid*; rename a file to use it)")
    train = tables["train"]
    validation = tables.get(val_name) if val_name else None
    validation_name = val_name
    if validation is None or validation.num_rows == 0:
        train, validation = _carve(train, val_fraction, seed)
        validation_name = "validation"
        notes.append(f"no {'rows in the ' if val_name else ''}validation split: carved {val_fraction * 100:g}% ({validation.num_rows} rows) "
                     f"of train with seed {seed}")
    test = tables.get("test")
    if test is not None and test.num_rows == 0:
        notes.append("test: the split has no rows; not used")
    for name, table in (("train", train), (validation_name, validation), ("test", test)):
        if table is not None and table.num_rows:  # checked after the carve, which can leave a class on one side only
            _check_classes_present(table, num_classes, name, notes)
    return TextSplits(
        train=datasets.Dataset(train), validation=datasets.Dataset(validation),
        test=datasets.Dataset(test) if test is not None and test.num_rows else None,
        num_classes=num_classes, label_names=label_names, notes=tuple(notes))


def texts_of(split: datasets.Dataset) -> list[str]:
    """Returns the `text` column as a list (fast: no per-row Python access)."""
    return split.with_format("arrow")["text"].to_pylist()


def labels_of(split: datasets.Dataset) -> np.ndarray:
    """Returns the `label` column as an int32 array."""
    return split.with_format("arrow")["label"].to_numpy().astype(np.int32)


def split_sha256(split: datasets.Dataset) -> str:
    """A SHA-256 of a split's texts and labels in their order: the same rows give the same digest in any process,
    and a changed, added, removed or reordered row gives another."""
    digest = hashlib.sha256()
    for text in texts_of(split):
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # so that no two splittings of the bytes hash alike
        digest.update(encoded)
    digest.update(labels_of(split).astype("<i8").tobytes())
    return digest.hexdigest()


def splits_sha256(splits: TextSplits) -> dict[str, str]:
    """``{split name: split_sha256}`` for the splits a run reads (:meth:`TextSplits.used`)."""
    return {name: split_sha256(split) for name, split in splits.used().items()}


# ------------------------------------------------------------------------- tokeniser


def _as_texts(texts: Iterable[str]) -> list[str]:
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):  # None too (load_text_splits reads missing texts as "", with a note)
            raise DataError(f"texts must be strings, found {type(text).__name__}: {text!r:.60}")
    return texts


# name: (tokenizers model, its trainer)
_TOKENIZER_KINDS = {"word": (models.WordLevel, trainers.WordLevelTrainer), "wordpiece": (models.WordPiece, trainers.WordPieceTrainer)}
TOKENIZER_MODELS = tuple(_TOKENIZER_KINDS)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 20000, min_freq: int = 1, model: str = "word") -> Tokenizer:
    """Trains a lower-casing tokeniser (call it on the train split only).

    Args:
      texts: training texts.
      vocab_size: vocabulary size, `[PAD]` and `[UNK]` included; for WordPiece a floor, since it keeps every
        character of the training texts and its ``##`` form whatever the size.
      min_freq: words (or, for WordPiece, merges) seen fewer times are not in the vocabulary.
      model: ``"word"``, one id per word and `[UNK]` for the rest; or ``"wordpiece"``, which keeps
        the frequent words whole and splits the others into pieces (``warm ##ly``), so a word never
        seen in training is still read through its pieces (Wu et al. 2016, sec. 4.1). With a
        `vocab_size` above the number of distinct training words every training word stays whole
        and the pieces are never trained, so choose it below that.

    Returns:
      A `tokenizers.Tokenizer` with `[PAD]` = `PAD_ID` and `[UNK]` = `UNK_ID`.
    """
    if vocab_size < 3:
        raise DataError(f"vocab_size must be >= 3 ([PAD], [UNK] and one word), got {vocab_size}")
    if model not in TOKENIZER_MODELS:
        raise DataError(f"unknown tokenizer model {model!r}; choose one of {', '.join(TOKENIZER_MODELS)}")
    texts = _as_texts(texts)
    model_class, trainer_class = _TOKENIZER_KINDS[model]
    tok = _with_word_splitting(Tokenizer(model_class(unk_token=UNK)))
    pinned = _continuation_pieces(texts) if model == "wordpiece" else []
    trainer = trainer_class(vocab_size=vocab_size, min_frequency=min_freq, special_tokens=[PAD, UNK, *pinned],
                            show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok = _without_added_tokens(tok)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(UNK) == UNK_ID
    if tok.get_vocab_size() <= 2:
        raise DataError("the training texts contain no words (all empty, or only spaces and control characters); "
                        "check --text-column")
    return tok


def _with_word_splitting(tok: Tokenizer) -> Tokenizer:
    """Sets the normaliser and pre-tokeniser every trained tokeniser shares; returns `tok`."""
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(r"(?i)<br\s*/?>"), " "),
        normalizers.Replace(Regex(SPACE_CHARACTERS), " "),
        normalizers.Replace(Regex(FORMAT_CHARACTERS), ""),
        normalizers.NFKC(),
        # CJK ideographs stand alone (as in BERT): a run of them has no spaces, and read whole it is one rare "word"
        normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False),
        normalizers.Lowercase(),
    ])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ and runs of punctuation
    return tok


def _continuation_pieces(texts: list[str]) -> list[str]:
    """``##c`` for every character c that follows another inside a training word, sorted.

    `tokenizers`' WordPiece trainer numbers these pieces as it meets them in a hash map, whose order
    changes from process to process, and breaks ties between equally frequent merges by those numbers:
    two runs of one command would train different vocabularies. Given in a fixed order up front (as
    special tokens, which take the first ids), they keep the numbers the same in every process.
    """
    words = Tokenizer(models.WordLevel(unk_token=UNK))
    words = _with_word_splitting(words)
    words.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(vocab_size=2**31 - 1, show_progress=False))
    later_chars = {char for word in words.get_vocab() for char in word[1:]}
    return [f"##{char}" for char in sorted(later_chars)]


def _without_added_tokens(tok: Tokenizer) -> Tokenizer:
    """The same tokeniser with its special tokens (`[PAD]`, `[UNK]`, pinned pieces) only in its vocabulary.

    `tokenizers` matches added tokens in the raw text before normalising, so a review that quotes
    ``[PAD]`` would get the padding id inside its words. As plain vocabulary entries they are
    unreachable from text (it is lower-cased and ``[`` splits off; ``##`` pieces only continue a
    word), yet keep their ids.
    """
    spec = json.loads(tok.to_str())
    if not spec.get("added_tokens"):
        return tok
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Writes the tokeniser as one JSON file, atomically (a killed write leaves no partial file)."""
    partial = f"{os.fspath(path)}.partial"
    tok.save(partial)
    os.replace(partial, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokeniser written by `save_tokenizer`."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file '{os.fspath(path)}' does not exist; "
                        "train one with train_tokenizer and save_tokenizer")
    try:
        return _without_added_tokens(Tokenizer.from_file(os.fspath(path)))  # runs from before 2026-12-03 have them
    except Exception as err:
        raise DataError(f"tokenizer file '{os.fspath(path)}' is damaged ({_short(err)}); "
                        "restore it from a backup, or train and save a new one") from err


# -------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Ragged token ids: row i is `ids_flat[offsets[i]:offsets[i + 1]]`.

    Attributes:
      ids_flat: int32 ids of all rows, concatenated.
      offsets: int64 row starts, length N + 1.
      num_truncated: rows cut to `max_len`.
      num_empty: rows with no tokens, kept as a single `[UNK]`.
    """

    ids_flat: np.ndarray
    offsets: np.ndarray
    num_truncated: int
    num_empty: int

    @property
    def lengths_N(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids_flat[self.offsets[i]:self.offsets[i + 1]]


def unknown_tokens(encoded: Encoded) -> int:
    """Tokens of ``encoded`` that are `[UNK]` (words the vocabulary lacks), not counting the `[UNK]` of empty texts."""
    return int(np.sum(encoded.ids_flat == UNK_ID)) - encoded.num_empty


def encode(tok: Tokenizer, texts: Iterable[str], *, max_len: int) -> Encoded:
    """Tokenises texts, truncating to `max_len` and counting what was cut or empty.

    Args:
      tok: a tokeniser from `train_tokenizer` or `load_tokenizer`.
      texts: the texts, one per example.
      max_len: the most tokens kept per text (the first ones).

    Returns:
      An `Encoded` with one row per text, none dropped.
    """
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    rows = [enc.ids for enc in tok.encode_batch(_as_texts(texts), add_special_tokens=False)]
    full_lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    num_empty = int(np.sum(full_lengths == 0))
    ids_flat = np.concatenate([np.asarray(r[:max_len] or [UNK_ID], np.int32) for r in rows]
                              or [np.zeros(0, np.int32)])
    offsets = np.concatenate([[0], np.cumsum(np.clip(full_lengths, 1, max_len))]).astype(np.int64)
    return Encoded(ids_flat, offsets, int(np.sum(full_lengths > max_len)), num_empty)


# ------------------------------------------------------------------ bucketing, batching


def bucket_lengths(lengths: Sequence[int] | np.ndarray, *, max_len: int,
                   num_buckets: int = 8) -> tuple[int, ...]:
    """Chooses at most `num_buckets` padded lengths that minimise the total padding.

    Each text is padded to the smallest bucket that holds it, so the best buckets
    end at observed lengths: a dynamic programme over the distinct lengths (capped
    at `max_len`; grouped into at most 1024 steps of equal width when there are
    more) picks the ends with the fewest padded time steps in total.

    Returns:
      Ascending distinct lengths; the last is the longest `min(length, max_len)`.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_len)
    if lengths.size == 0 or max_len < 1 or num_buckets < 1:
        raise DataError(f"bucket_lengths needs lengths, max_len >= 1 and num_buckets >= 1 "
                        f"(got {lengths.size} lengths, max_len={max_len}, num_buckets={num_buckets})")
    longest = max(int(lengths.max()), 1)
    width = max(1, -(-longest // 1024))
    lengths = np.minimum(-(-np.maximum(lengths, 1) // width) * width, longest)  # the last bucket is the longest text
    values_D, counts_D = np.unique(lengths, return_counts=True)
    rows_upto = np.concatenate([[0], np.cumsum(counts_D)])  # [j]: texts among the j shortest values
    steps_upto = np.concatenate([[0], np.cumsum(counts_D * values_D)])
    ends, starts = np.arange(1, values_D.size + 1)[:, None], np.arange(values_D.size)[None, :]
    # padding_JS[j - 1, s]: padded steps of a bucket holding values s+1..j, padded to value j
    padding_JS = values_D[ends - 1] * (rows_upto[ends] - rows_upto[starts]) - (steps_upto[ends] - steps_upto[starts])
    padding_JS = np.where(starts < ends, padding_JS, np.inf)
    least = np.concatenate([[0.0], np.full(values_D.size, np.inf)])  # least padding of the j shortest values
    previous_end = []
    for _ in range(min(num_buckets, values_D.size)):
        total_JS = least[None, :values_D.size] + padding_JS
        previous_end.append(np.argmin(total_JS, axis=1))
        least = np.concatenate([[np.inf], total_JS.min(axis=1)])
    chosen, j = [], values_D.size
    for back in reversed(previous_end):
        if j == 0:
            break
        chosen.append(int(values_D[j - 1]))
        j = int(back[j - 1])
    return tuple(sorted(chosen))


class Batch(NamedTuple):
    """One static-shape batch; padding rows have length 0 and weight 0."""

    tokens_BT: np.ndarray  # int32, PAD_ID beyond each length
    lengths_B: np.ndarray  # int32
    labels_B: np.ndarray  # int32
    weights_B: np.ndarray  # float32


def epoch_batch_rows(lengths_N: np.ndarray, *, batch_size: int, buckets: Sequence[int],
                     seed: int, epoch: int, shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
    """Plans an epoch: `(bucket length T, row indices_B)` per batch, -1 marking padding rows.

    Each row is put in the smallest bucket that holds it; each bucket is cut into
    batches of exactly `batch_size` (the last one padded), so no row is dropped.
    With `shuffle`, rows and batch order are permuted by `np.random.default_rng([seed,
    epoch])`; without it, batches go by bucket, rows in their original order.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    buckets_K = np.asarray(buckets)
    if buckets_K.size == 0 or np.any(np.diff(buckets_K) <= 0):
        raise DataError(f"buckets must be ascending and non-empty, got {tuple(buckets)}; use bucket_lengths")
    bucket_N = np.searchsorted(buckets_K, lengths_N, side="left")
    if np.any(bucket_N == len(buckets_K)):
        raise DataError(f"a sequence of length {int(np.max(lengths_N))} exceeds the largest bucket "
                        f"{int(buckets_K[-1])}; compute the buckets from these texts' lengths (bucket_lengths)")
    rng = np.random.default_rng([seed, epoch])
    order_N = rng.permutation(len(lengths_N)) if shuffle else np.arange(len(lengths_N))
    plan = []
    for k, length in enumerate(buckets_K):
        rows = order_N[bucket_N[order_N] == k]
        padded = np.full(-(-len(rows) // batch_size) * batch_size, -1, np.int64)
        padded[:len(rows)] = rows
        plan += [(int(length), chunk) for chunk in padded.reshape(-1, batch_size)]
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def gather_batch(encoded: Encoded, labels_N: np.ndarray, rows_B: np.ndarray, length: int) -> Batch:
    """Builds a `Batch` of padded length `length` from row indices (-1 = padding row)."""
    real_B = rows_B >= 0
    safe_B = np.where(real_B, rows_B, 0)
    starts_B = encoded.offsets[safe_B]
    lengths_B = np.where(real_B, encoded.offsets[safe_B + 1] - starts_B, 0).astype(np.int32)
    if lengths_B.size and int(lengths_B.max()) > length:
        raise DataError(f"a row of {int(lengths_B.max())} tokens does not fit the padded length {length}; pass a "
                        "length at least that long (epoch_batch_rows picks the bucket that holds each row)")
    positions_BT = starts_B[:, None] + np.arange(length)
    inside_BT = np.arange(length) < lengths_B[:, None]
    tokens_BT = np.where(inside_BT, encoded.ids_flat[np.where(inside_BT, positions_BT, 0)], PAD_ID)
    return Batch(tokens_BT.astype(np.int32), lengths_B,
                 np.where(real_B, labels_N[safe_B], 0).astype(np.int32), real_B.astype(np.float32))


def epoch_batches(encoded: Encoded, labels: Sequence[int] | np.ndarray, *, batch_size: int,
                  buckets: Sequence[int], seed: int, epoch: int, shuffle: bool = True) -> list[Batch]:
    """Returns one epoch of static-shape batches, each example exactly once.

    Args:
      encoded: the split's token ids.
      labels: one class id per row of `encoded`.
      batch_size: rows per batch; a batch_size above the number of examples
        gives one padded batch per used bucket.
      buckets: padded lengths from `bucket_lengths`.
      seed, epoch: together they fix the order (see `epoch_batch_rows`).
      shuffle: False for evaluation (stable order).

    Returns:
      Batches of shape `(batch_size, T)` for T in `buckets`; padding rows weigh 0.
    """
    labels_N = np.asarray(labels)
    if len(labels_N) != len(encoded):
        raise DataError(f"{len(labels_N)} labels for {len(encoded)} encoded texts; pass one label per text")
    plan = epoch_batch_rows(encoded.lengths_N, batch_size=batch_size, buckets=buckets,
                            seed=seed, epoch=epoch, shuffle=shuffle)
    return [gather_batch(encoded, labels_N, rows_B, length) for length, rows_B in plan]
