"""Train an LSTM text classifier on a Hugging Face dataset, resumably.

Run (with a network, Hub SST-2)::

    python -m experiments.sentiment

Offline, or on any local folder that ``datasets.load_dataset`` reads::

    python -m experiments.sentiment --dataset ../shared/data/sst2 --workdir runs/sst2
    python -m experiments.sentiment --dataset ../shared/data/imdb --workdir runs/imdb
    python -m experiments.sentiment predict --workdir runs/sst2 "a gorgeous, witty film"
    python -m experiments.sentiment explain --workdir runs/sst2 "a gorgeous, witty film"  # gate plot

Rerunning with the same ``--workdir`` resumes from the latest checkpoint. The run
writes ``config.json``, ``tokenizer.json``, ``metrics.jsonl``, ``curves.png``,
``results.json`` and Orbax checkpoints (``checkpoints/``, ``best/``) to the workdir.

Expected result on 2 CPU cores (``experiments/results/sentiment.md`` has every run): the default SST-2 run (its preset adds
adversarial training, ``--adversarial-epsilon 0.1``) reaches about 84.6-84.9 % validation and 84.9 % test
accuracy (83.49-85.89 % validation over seeds 0-2 on three machines, measured 2026-12-01 and 12-02 with the CPU kernel)
in 4 to 4.5 minutes of wall time alone on an AVX-512 machine and 5.5 to 12 minutes on an AVX2 one (Zen 3 EPYCs
of this project: 5 min 35 s to 9 min 30 s alone), compiling included.
With ``--compute-dtype bfloat16`` on a CPU with AMX the LSTM multiplies in bfloat16: the same accuracy over seeds 0-2
(84.52 % validation against 84.79 % for float32 on that machine) in 3 min 22 s instead of 4 min 22 s.
The IMDB preset reaches 92.32 / 91.24 %
validation and 90.15 / 89.14 % test accuracy (seeds 0 / 1) in 52-55 minutes of wall time on a Zen 3 EPYC.

Run as a script, it first starts itself again with glibc's malloc told to keep freed memory
(:mod:`experiments.allocator`; about a tenth off the training time on SST-2, same results);
``LSTM_JAX_KEEP_FREED_MEMORY=0`` turns that off.
"""

if __name__ == "__main__":  # before the imports below, so that the restart does not pay for them twice
    from experiments.allocator import rerun_keeping_freed_memory

    rerun_keeping_freed_memory()

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import cli, data, gates, parallel
from lstm_jax.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    WorkdirBusy,
    atomic_write_text,
    config_dict,
    has_checkpoints,
    prepare_workdir,
    workdir_lock,
    write_config,
)
from lstm_jax.loop import (
    LoopConfig,
    MetricsLog,
    NonFiniteError,
    interrupted,
    resume_on_mesh,
    save_curves,
    train_loop,
)
from lstm_jax.model import ModelConfig, classifier_logits, init_classifier, member_config
from lstm_jax.optim import OptimConfig, make_optimizer, run_notes
from lstm_jax.train import (
    classifier_loss,
    evaluate,
    init_train_state,
    language_model_pretraining_loss,
    make_eval_step,
    make_language_model_eval_step,
    make_train_step,
    params_sha256,
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset, tokeniser and batching."""

    dataset: str = dataclasses.field(default="sst2", metadata={"resumable": True, "help": "a preset (" + ", ".join(data.PRESETS) + "), a Hub id, or a local folder (a resumed run may spell it another way, but its rows must be the same: checked by their SHA-256)"})
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "configuration (subset) of a Hub dataset that has several, e.g. --dataset nyu-mll/glue --dataset-config sst2"})
    text_column: str | None = dataclasses.field(default=None, metadata={"help": "text column (detected when unset)"})
    label_column: str | None = dataclasses.field(default=None, metadata={"help": "label column (detected when unset)"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={"range": cli.Range(0, 1, low_open=True), "help": "fraction of train carved out as validation when there is no validation split"})
    tokenizer: str = dataclasses.field(default="word", metadata={"help": "tokenizer model: word (one id per word) or wordpiece (rare and unseen words split into pieces; give it a --vocab-size below the number of distinct training words, or no word is split in training)"})
    vocab_size: int = dataclasses.field(default=20000, metadata={"range": cli.Range(3), "help": "vocabulary cap, [PAD] and [UNK] included"})
    min_freq: int = dataclasses.field(default=1, metadata={"range": cli.AT_LEAST_0, "help": "words (wordpiece: merges) rarer than this in train are left out of the vocabulary"})
    max_len: int = dataclasses.field(default=128, metadata={"range": cli.AT_LEAST_1, "help": "tokens kept per text (the rest is cut, and counted)"})
    num_buckets: int = dataclasses.field(default=8, metadata={"range": cli.AT_LEAST_1, "help": "padded lengths for training, chosen from the training texts, and as many for evaluation, chosen from the validation and test texts (one XLA program each)"})
    batch_size: int = dataclasses.field(default=64, metadata={"range": cli.AT_LEAST_1, "help": "training batch size"})
    eval_batch_size: int = dataclasses.field(default=256, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "evaluation batch size"})

    def __post_init__(self):
        cli.check_ranges(self)
        if self.tokenizer not in data.TOKENIZER_MODELS:
            raise ValueError(f"unknown --tokenizer {self.tokenizer!r}; choose one of {', '.join(data.TOKENIZER_MODELS)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how it starts."""

    workdir: str = dataclasses.field(default="runs/sentiment", metadata={"resumable": True, "help": "run directory: checkpoints, logs, results; reruns resume from it"})
    seed: int = dataclasses.field(default=0, metadata={"range": cli.SEED, "help": "seed for init, dropout and data order, and for the rows carved as validation where the data has no validation split"})
    restart: bool = dataclasses.field(default=False, metadata={"resumable": True, "help": "start fresh even if the workdir has a run (the old files move to <workdir>/previous-<time>)"})

    def __post_init__(self):
        cli.check_ranges(self)


CONFIG_CLASSES = (DataConfig, ModelConfig, OptimConfig, LoopConfig, RunConfig, parallel.MeshConfig)

# Settings that suit a dataset better than the defaults; explicit flags win.
DATASET_PRESETS = {
    "sst2": {"adversarial_epsilon": 0.1},
    "imdb": {"max_len": 800, "vocab_size": 30000, "epochs": 5, "batch_size": 32, "embed_dropout": 0.2, "input_dropout": 0.4,
             "output_dropout": 0.4, "pooling": "mean_max"},
    "yelp_polarity": {"max_len": 256, "epochs": 1},
    "ag_news": {"max_len": 64, "epochs": 3},
}

# Pre-training's per-step keys fold the step into fold_in(key(seed), this), the classifier's into
# fold_in(key(seed), train.STEP_STREAM), so the two phases never draw the same dropout masks.
PRETRAINING_STREAM = 0xFFFFFFFF

def preset_name(dataset: str) -> str | None:
    """``imdb`` for ``imdb``, its Hub id ``stanfordnlp/imdb`` or a local folder named ``imdb``; else None."""
    if dataset in data.PRESETS:
        return dataset
    reverse_presets = {hub_id: name for name, hub_id in data.PRESETS.items()}
    if dataset in reverse_presets:
        return reverse_presets[dataset]
    folder = Path(os.path.expanduser(dataset))
    return folder.resolve().name if folder.is_dir() and folder.resolve().name in data.PRESETS else None


def run_preset(dataset: str, began: dict) -> str | None:
    """The preset a run applies: the one it began with, as its ``run.json`` (``began``) records it (so that a resumed
    run may spell ``--dataset`` another way), else that of ``dataset``'s name."""
    if "preset" in began and (began["preset"] is None or began["preset"] in DATASET_PRESETS):
        return began["preset"]
    return preset_name(dataset)


def presets_epilog() -> str:
    lines = [f"  {name}: {' '.join(cli.flag_text(field, value) for field, value in preset.items())}"
             for name, preset in DATASET_PRESETS.items()]  # fmt: skip
    heading = "dataset presets (for the preset name, its Hub id or a local folder of that name; explicit flags win):"
    return "\n".join([heading, *lines])


def parse_train_args(argv: list[str]) -> tuple[dict, jax.sharding.Mesh]:
    """Configs from flags, with the dataset's preset applied under any explicit flag, and the device mesh."""
    cli.check_unique_flags(*CONFIG_CLASSES)
    parser = cli.Parser(prog="python -m experiments.sentiment", description=__doc__,
                                     epilog=presets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in CONFIG_CLASSES:
        cli.add_flags(parser, cls, presets=DATASET_PRESETS)
    args = parser.parse_args(argv)
    explicit = cli.explicit_flags(parser, argv)
    preset = run_preset(args.dataset, {} if args.restart else previous_run_file(Path(args.workdir) / "run.json"))
    if preset != (named := preset_name(args.dataset)):
        print(f"note: this run began with preset {preset or 'none'}, which it keeps (--dataset {args.dataset} alone "
              f"would give {named or 'none'})")
    applied = {name: value for name, value in DATASET_PRESETS.get(preset, {}).items() if name not in explicit}
    for name, value in applied.items():
        setattr(args, name, value)
    out_of_range = cli.range_errors(vars(args), *CONFIG_CLASSES)  # before anything is read or written
    if out_of_range:
        parser.error("; ".join(out_of_range))
    try:
        configs = {cls.__name__: cli.from_args(cls, args) for cls in CONFIG_CLASSES}
        mesh = parallel.start(configs["MeshConfig"])
        parallel.check_batch_size(args.batch_size, mesh)
        parallel.check_batch_size(args.eval_batch_size, mesh, flag="--eval-batch-size")
    except ValueError as error:  # a config's own check, e.g. an unknown --cell, or a mesh that does not fit
        parser.error(str(error))
    if applied:
        print(f"note: preset '{preset}' applied: {' '.join(cli.flag_text(name, value) for name, value in applied.items())}")
    return configs, mesh


def load_data(cfg: DataConfig, workdir: Path, seed: int):
    """Splits, tokenizer (the run's own, or trained on train but not yet saved), encodings, and buckets: ``train``'s
    from the training texts' lengths alone (so that no validation or test text changes how training batches), and
    ``evaluation``'s from the other splits' (which share those programs)."""
    splits = data.load_text_splits(cfg.dataset, text_column=cfg.text_column, label_column=cfg.label_column, val_fraction=cfg.val_fraction, seed=seed, config=cfg.dataset_config)
    for note in splits.notes:
        print(f"note: {note}")
    tokenizer_path = workdir / "tokenizer.json"
    if tokenizer_path.exists():
        tokenizer = data.load_tokenizer(tokenizer_path)
    elif has_checkpoints(workdir):
        raise data.DataError(f"{workdir} has checkpoints but no tokenizer.json; restore that file, or pass --restart to start over")
    else:
        tokenizer = data.train_tokenizer(data.texts_of(splits.train), vocab_size=cfg.vocab_size, min_freq=cfg.min_freq, model=cfg.tokenizer)
    encoded = {name: (data.encode(tokenizer, data.texts_of(split), max_len=cfg.max_len), data.labels_of(split)) for name, split in splits.used().items()}
    if tokenizer.get_vocab_size() > cfg.vocab_size:  # WordPiece keeps every character and its ## form
        print(f"note: the vocabulary has {tokenizer.get_vocab_size()} entries, above --vocab-size {cfg.vocab_size}: the "
              "tokenizer keeps every character of the training texts")
    for name, (enc, _) in encoded.items():
        if enc.num_truncated or enc.num_empty:
            print(f"note: {name}: {enc.num_truncated} of {len(enc)} texts cut to --max-len {cfg.max_len}; {enc.num_empty} empty texts kept as [UNK]")
        if unknown := data.unknown_tokens(enc):
            tokens = len(enc.ids_flat) - enc.num_empty
            print(f"note: {name}: {unknown} of {tokens} tokens ({100 * unknown / tokens:.1f} %) are words outside the vocabulary, read as [UNK]")
    evaluated = np.concatenate([enc.lengths_N for name, (enc, _) in encoded.items() if name != "train"])
    buckets = {name: data.bucket_lengths(lengths, max_len=cfg.max_len, num_buckets=cfg.num_buckets)
               for name, lengths in (("train", encoded["train"][0].lengths_N), ("evaluation", evaluated))}  # fmt: skip
    return splits, tokenizer, encoded, buckets


def previous_run_file(path: Path) -> dict:
    """The ``run.json`` a resumed run wrote when it last started; ``{}`` when it is missing or damaged (the run writes
    it again)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def recorded_training_buckets(previous: dict) -> tuple[int, ...] | None:
    """The training buckets a run's ``run.json`` recorded: ``buckets["train"]``, or the one list of a run begun before
    training had buckets of its own; None when it holds neither."""
    recorded = previous.get("buckets")
    recorded = recorded.get("train") if isinstance(recorded, dict) else recorded
    valid = isinstance(recorded, list) and recorded and all(isinstance(b, int) and b > 0 for b in recorded)
    return tuple(recorded) if valid and list(recorded) == sorted(set(recorded)) else None


def buckets_json(buckets: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    return {name: list(lengths) for name, lengths in buckets.items()}


def check_same_data(saved: dict | None, began_on: str, dataset: str, data_sha256: dict[str, str]) -> None:
    """Stops a resumed run whose splits differ from the digests (``saved``) its ``run.json`` recorded when it began
    (edited files, a newer revision of a Hub dataset): its next steps would read other rows than the uninterrupted
    run's. The rows must match, not the name: ``--dataset`` may be spelt another way (a path from another folder, a
    copy of the folder). Without digests (a ``run.json`` older than them, lost or damaged), the ``--dataset`` it
    began on (``began_on``) must match."""
    if not isinstance(saved, dict):
        if began_on != dataset:
            raise data.DataError(f"this run began on --dataset {began_on}, before runs recorded their data's SHA-256, "
                                 f"so nothing shows that {dataset} holds the same rows; pass --dataset {began_on}, "
                                 "or --restart to start over")  # fmt: skip
        return
    changed = [f"{name} {(saved.get(name) or 'none')[:8]} -> {(data_sha256.get(name) or 'none')[:8]}"
               for name in sorted(set(saved) | set(data_sha256)) if saved.get(name) != data_sha256.get(name)]
    if changed:
        raise data.DataError(f"the rows of --dataset {dataset} differ from those this run began on (SHA-256 of "
                             f"{'; '.join(changed)}), so it cannot resume as the same run; restore that data, or "
                             "pass --restart to train on this data from the start")
    if began_on != dataset:
        print(f"note: --dataset {dataset} holds the same rows as {began_on}, which this run last started on")


@contextlib.contextmanager
def removed_if_left_empty(workdir: Path):
    """Removes ``workdir`` again when this run created it and then failed before writing anything into it."""
    created = not workdir.exists()
    try:
        yield
    except WorkdirBusy:  # the folder is another process's, even if this one saw it missing a moment before
        raise
    except BaseException:
        if created and workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()
        raise


def train(argv: list[str]) -> dict:
    configs, mesh = parse_train_args(argv)
    workdir = Path(configs["RunConfig"].workdir)
    with removed_if_left_empty(workdir), workdir_lock(workdir):
        return train_configs(configs, mesh)


def train_configs(configs: dict, mesh) -> dict:
    """Train (or resume) the run that ``configs`` describe, on ``mesh``; returns ``results.json``'s contents, or
    ``{"steps": 0, "lm_pretraining": ...}`` when ``--max-steps`` ends the run in language-model pre-training."""
    data_cfg, model_cfg, optim_cfg, loop_cfg, run_cfg, mesh_cfg = (configs[cls.__name__] for cls in CONFIG_CLASSES)
    workdir = Path(run_cfg.workdir)
    if model_cfg.compute_dtype == "bfloat16" and model_cfg.vat_epsilon > 0:
        print("note: under --compute-dtype bfloat16 most of virtual adversarial training's probe (a tenth of "
              "--vat-epsilon, spread over every embedded word) is below bfloat16's resolution of the embeddings and "
              "rounds away; float32 keeps it")
    resuming = prepare_workdir(workdir, configs, restart=run_cfg.restart)
    splits, tokenizer, encoded, buckets = load_data(data_cfg, workdir, run_cfg.seed)
    data_sha256 = data.splits_sha256(splits)
    previous = previous_run_file(workdir / "run.json")  # {} for a fresh run (--restart moved the old one aside)
    if resuming:
        began_on = previous.get("dataset")
        if not isinstance(began_on, str):  # run.json lost or damaged: config.json keeps the name the run began with
            began_on = json.loads((workdir / "config.json").read_text())["DataConfig"]["dataset"]
        check_same_data(previous.get("data_sha256"), began_on, data_cfg.dataset, data_sha256)
        if (began_with := recorded_training_buckets(previous)) and began_with != buckets["train"]:
            print(f"note: this run keeps the training buckets {began_with} it began with (chosen from every split's "
                  f"lengths, before {buckets['train']} from the training texts alone), so it resumes to the same bits")
            buckets["train"] = began_with
    (train_enc, train_labels), (val_enc, _) = encoded["train"], encoded["validation"]
    vocab_size = tokenizer.get_vocab_size()
    print(f"data: {len(train_enc)} train / {len(val_enc)} validation / {len(encoded['test'][0]) if 'test' in encoded else 0} test, "
          f"{splits.num_classes} classes, vocabulary {vocab_size}, training buckets {buckets['train']}")  # fmt: skip
    if data_cfg.batch_size > len(train_enc):
        print(f"note: --batch-size {data_cfg.batch_size} exceeds the {len(train_enc)} training texts; each step is one padded batch")

    def epoch_batches(epoch):
        return data.epoch_batches(train_enc, train_labels, batch_size=data_cfg.batch_size, buckets=buckets["train"], seed=run_cfg.seed, epoch=epoch)

    def eval_batches(split):
        enc, labels = encoded[split]
        return data.epoch_batches(enc, labels, batch_size=data_cfg.eval_batch_size, buckets=buckets["evaluation"], seed=0, epoch=0, shuffle=False)

    steps_per_epoch = len(epoch_batches(0))
    optimizer = make_optimizer(optim_cfg, loop_cfg.epochs * steps_per_epoch, ensemble=model_cfg.ensemble)
    for note in run_notes(optim_cfg, loop_cfg.epochs * steps_per_epoch):
        print(note)
    params = init_classifier(jax.random.key(run_cfg.seed), model_cfg, vocab_size, splits.num_classes)
    # written only now, so a setting that fails above leaves no config.json to refuse the corrected rerun
    if not resuming:  # the config first: a tokenizer.json is only ever reused under its own config
        write_config(workdir, configs)
    if not (workdir / "tokenizer.json").exists():
        data.save_tokenizer(tokenizer, workdir / "tokenizer.json")
    meta = {"dataset": data_cfg.dataset, "num_classes": splits.num_classes, "label_names": list(splits.label_names),
            "vocab_size": vocab_size, "buckets": buckets_json(buckets), "data_sha256": data_sha256,
            "preset": run_preset(data_cfg.dataset, previous)}  # fmt: skip
    atomic_write_text(workdir / "run.json", json.dumps(meta, indent=2))
    if mesh_cfg.shard_embedding and (note := parallel.unsplit_embedding_note(vocab_size, mesh)):
        print(note)
    val_split = eval_batches("validation")
    pretraining_steps = model_cfg.lm_pretrain_epochs * steps_per_epoch
    # a latest classifier checkpoint holds the pre-trained weights (a best one alone is no state to resume from)
    if pretraining_steps and not has_checkpoints(workdir, best=False):
        params = pretrain_language_model(params, configs, mesh, epoch_batches, val_split=val_split)
    pretraining_path = workdir / "pretrain" / "results.json"
    pretraining = json.loads(pretraining_path.read_text()) if pretraining_steps and pretraining_path.exists() else None
    if loop_cfg.max_steps and pretraining_steps:  # --max-steps counts the pre-training steps too
        if loop_cfg.max_steps <= pretraining_steps:
            print(f"--max-steps {loop_cfg.max_steps} ends the run in language-model pre-training ({pretraining_steps} steps); "
                  "the classifier has not started: rerun with a larger --max-steps, or none, to go on")  # fmt: skip
            return {"steps": 0, "lm_pretraining": pretraining}
        loop_cfg = dataclasses.replace(loop_cfg, max_steps=loop_cfg.max_steps - pretraining_steps)
    state = init_train_state(params, optimizer, run_cfg.seed, ema=optim_cfg.ema_decay > 0)
    checkpoints = RunCheckpoints(workdir, keep=loop_cfg.keep)
    state, state_sharding, skipped_checkpoints = resume_on_mesh(
        state, checkpoints, mesh, resuming=resuming, shard_embedding=mesh_cfg.shard_embedding
    )
    start_step = int(state.step)
    rows = parallel.batch_sharding(mesh)
    eval_step = parallel.host_batch_step(make_eval_step(model_cfg, params_sharding=state_sharding.eval_params, batch_sharding=rows), mesh)
    state, summary, best = train_phase(
        state, state_sharding, lambda p, batch, key: classifier_loss(p, model_cfg, batch, key), optimizer, eval_step, val_split,
        mesh, epoch_batches, checkpoints, workdir, loop_cfg, ema_decay=optim_cfg.ema_decay, sam_rho=optim_cfg.sam_rho, ensemble=model_cfg.ensemble, meta=meta, title=f"{data_cfg.dataset}: {model_cfg.cell}",
    )  # fmt: skip
    best_state = best.state if best else state
    val = evaluate(eval_step, best_state.eval_params, val_split)
    test = evaluate(eval_step, best_state.eval_params, eval_batches("test")) if "test" in encoded else None
    checkpoints.close()
    results = {
        "dataset": data_cfg.dataset, "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"] if test else None,
        "best_step": best.step if best else None, "weights": "best checkpoint" if best else "final",
        "best_warning": summary["best_warning"], "final_val_accuracy": summary["last_val"]["accuracy"] if summary["last_val"] else None,
        "steps": summary["steps"], "epochs": summary["steps"] / summary["steps_per_epoch"], "resumed_from_step": start_step,
        "train_seconds": summary["train_seconds"], "tokens_per_second": summary["tokens_per_second"],
        "nonfinite_steps": int(state.nonfinite_steps), "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "params_sha256": params_sha256(state.params), "data_sha256": data_sha256, "buckets": buckets_json(buckets),
        "truncated": {name: enc.num_truncated for name, (enc, _) in encoded.items()}, "config": config_dict(configs),
        "empty_texts": {name: enc.num_empty for name, (enc, _) in encoded.items()}, "skipped_checkpoints": skipped_checkpoints,
        "jax_backend": jax.default_backend(), "mesh": dict(mesh.shape), "lm_pretraining": pretraining,
    }  # fmt: skip
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2))
    tested = f"test accuracy {test['accuracy']:.4f}" if test else "no labelled test split"
    weights = f"best checkpoint (step {best.step})" if best else f"last state (step {int(state.step)}; no evaluation kept as the best)"
    print(f"{weights}: validation accuracy {val['accuracy']:.4f}, {tested}; results in {workdir / 'results.json'}")
    return results


def train_phase(state, state_sharding, loss_fn, optimizer, eval_step, val_split, mesh, epoch_batches,
                checkpoints: RunCheckpoints, folder: Path, loop_cfg: LoopConfig, *, ema_decay: float, sam_rho: float, ensemble: int = 1,
                meta: dict, title: str):
    """Trains ``state`` by ``loss_fn`` through :func:`~lstm_jax.loop.train_loop` in ``folder`` (``metrics.jsonl``,
    ``curves.png``, ``checkpoints``), on ``mesh``; evaluates ``eval_step`` (host batches) on ``val_split``.

    Returns ``(state, summary, best)``: the last state, the loop's summary and the best checkpoint by
    validation accuracy (None if there is none). ``checkpoints`` stay open.
    """
    step_on_mesh = make_train_step(loss_fn, optimizer, ema_decay=ema_decay, sam_rho=sam_rho, ensemble=ensemble, state_sharding=state_sharding,
                                   batch_sharding=parallel.batch_sharding(mesh))  # fmt: skip
    log = MetricsLog(folder / "metrics.jsonl", int(state.step))
    state, summary = train_loop(
        state, parallel.host_batch_step(step_on_mesh, mesh), epoch_batches, lambda p: evaluate(eval_step, p, val_split),
        checkpoints, log, loop_cfg, meta=meta, tokens_in=lambda batch: int(batch.lengths_B.sum()),
    )  # fmt: skip
    best, warning = checkpoints.restore_best(state)
    if warning:
        print(f"{warning}; the results are those of the final weights")
    summary = {**summary, "best_warning": warning}
    save_curves(log.read(), folder / "curves.png", title=title)
    return state, summary, best


def pretrain_language_model(params: dict, configs: dict, mesh, epoch_batches, *, val_split) -> dict:
    """The classifier's ``params`` with ``embed`` and ``rnn`` from a language model trained first.

    The language model (:func:`~lstm_jax.train.language_model_pretraining_loss`, Dai & Le 2015) trains
    for ``--lm-pretrain-epochs`` over the training texts with the run's optimiser settings, seed and
    loop settings, and the classifier's batch order, but dropout masks of its own
    (keys from :data:`PRETRAINING_STREAM`), in ``WORKDIR/pretrain``: its checkpoints, ``metrics.jsonl``
    (accuracy there is next-word accuracy), ``curves.png`` and ``results.json``. A rerun resumes it. The weights taken
    are the best checkpoint's evaluation weights by validation next-word accuracy; the language-model
    heads come along when the classifier has them (``--lm-weight``). ``--max-steps`` counts these steps
    too, so it can stop the language model's training (then the caller does not start the classifier).
    """
    model_cfg, optim_cfg, loop_cfg, run_cfg, mesh_cfg = (configs[name] for name in ("ModelConfig", "OptimConfig", "LoopConfig", "RunConfig", "MeshConfig"))
    folder = Path(run_cfg.workdir) / "pretrain"
    epochs = model_cfg.lm_pretrain_epochs
    optimizer = make_optimizer(optim_cfg, epochs * len(epoch_batches(0)))
    for note in run_notes(optim_cfg, epochs * len(epoch_batches(0))):
        print(f"{note} (language-model pre-training)")
    vocab_size, num_classes = params["embed"].shape[0], params["head"]["out"]["b"].shape[0]
    lm_params = init_classifier(jax.random.key(run_cfg.seed), model_cfg, vocab_size, num_classes, language_model=True)
    state = init_train_state(lm_params, optimizer, run_cfg.seed, ema=optim_cfg.ema_decay > 0, stream=PRETRAINING_STREAM)
    checkpoints = RunCheckpoints(folder, keep=loop_cfg.keep)
    state, state_sharding, _ = resume_on_mesh(state, checkpoints, mesh, resuming=has_checkpoints(folder), shard_embedding=mesh_cfg.shard_embedding)
    print(f"language-model pre-training: {epochs} epoch(s) from step {int(state.step)}, in {folder}")
    state, summary, best = train_phase(
        state, state_sharding, lambda p, batch, key: language_model_pretraining_loss(p, model_cfg, batch, key), optimizer,
        parallel.host_batch_step(make_language_model_eval_step(model_cfg), mesh), val_split, mesh, epoch_batches,
        checkpoints, folder, dataclasses.replace(loop_cfg, epochs=epochs), ema_decay=optim_cfg.ema_decay, sam_rho=optim_cfg.sam_rho,
        meta={"pretraining": "language model"}, title="language-model pre-training (accuracy: next word)",
    )  # fmt: skip
    checkpoints.close()
    chosen = (best.state if best else state).eval_params
    taken = [name for name in ("embed", "rnn", "lm") if name in params]
    val = best.meta["val"] if best else summary["last_val"]
    figures = {"epochs": epochs, "steps": summary["steps"], "best_step": best.step if best else None, "train_seconds": summary["train_seconds"],
               "val_word_accuracy": val["accuracy"], "val_word_loss": val["loss"], "taken": taken}  # fmt: skip
    atomic_write_text(folder / "results.json", json.dumps(figures, indent=2))
    print(f"language model: validation next-word accuracy {val['accuracy']:.4f}, loss {val['loss']:.4f}; the classifier starts from its {', '.join(taken)}")
    return {**params, **{name: chosen[name] for name in taken}}


def read_run_file(path: Path, keys: tuple[str, ...], fix: str) -> dict:
    """A run's JSON file with its top-level ``keys``; a damaged one is a one-line error ending in ``fix``."""
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {path} is damaged ({type(error).__name__}: {error}); {fix}") from None
    missing = [key for key in keys if key not in saved] if isinstance(saved, dict) else list(keys)
    if missing:
        raise SystemExit(f"error: {path} is damaged (no {', '.join(missing)}); {fix}")
    return saved


def state_template(model_cfg: ModelConfig, optim_cfg: OptimConfig, meta: dict):
    """A training state with the structure and shapes of a run's checkpoints (``meta`` is its ``run.json``)."""
    params = init_classifier(jax.random.key(0), model_cfg, meta["vocab_size"], meta["num_classes"])
    optimizer = make_optimizer(optim_cfg, 1, ensemble=model_cfg.ensemble)
    return init_train_state(params, optimizer, 0, ema=optim_cfg.ema_decay > 0)


def load_run(workdir: Path):
    """A trained run's model and data configs, ``run.json``, tokenizer, and best (else latest) evaluation parameters."""
    if not (workdir / "config.json").exists() or not (workdir / "run.json").exists():
        raise SystemExit(f"error: {workdir} holds no training run (no config.json/run.json); train first with --workdir {workdir}")
    restore = "restore it from a copy of the run, or "
    saved = read_run_file(workdir / "config.json", ("ModelConfig", "DataConfig", "OptimConfig"),
                          restore + "retrain into this --workdir with --restart")
    model_cfg, data_cfg = ModelConfig(**saved["ModelConfig"]), DataConfig(**saved["DataConfig"])
    meta = read_run_file(workdir / "run.json", ("vocab_size", "num_classes", "label_names"),
                         restore + "rerun training with the same flags and --workdir to rewrite it")
    if not (workdir / "tokenizer.json").exists():
        raise SystemExit(f"error: {workdir} has no tokenizer.json, so its checkpoints cannot read text; restore that file from a copy of the run")
    tokenizer = data.load_tokenizer(workdir / "tokenizer.json")
    abstract_state = state_template(model_cfg, OptimConfig(**saved["OptimConfig"]), meta)
    checkpoints = RunCheckpoints(workdir, read_only=True)  # training may be saving into it right now
    restored, warning = checkpoints.restore_best(abstract_state)
    if warning:
        print(f"{warning}; using the latest checkpoint instead")
    elif restored is not None:
        accuracy = (restored.meta.get("val") or {}).get("accuracy")
        print(f"note: answering from the best checkpoint, step {restored.step}"
              + (f" (validation accuracy {accuracy:.4f})" if accuracy is not None else ""))
    if restored is None:
        restored = checkpoints.restore(abstract_state, fix="restore the run's checkpoints from a copy, or train it again")
        if restored is not None and not warning:
            print(f"note: {workdir} has no best checkpoint yet (a --max-steps stop is never kept as the best; the first "
                  f"scheduled evaluation saves one); answering from the latest checkpoint, step {restored.step}")
    if restored is None:
        raise SystemExit(f"error: {workdir} has no checkpoint yet; let training save one (see --save-every) and retry")
    checkpoints.close()
    return model_cfg, data_cfg, meta, tokenizer, restored.state.eval_params


def text_notes(tokenizer, texts: list[str], max_len: int) -> list[str]:
    """A ``note:`` for each text with no tokens (it is read as one [UNK]), only unknown words, or more than
    ``max_len`` tokens (the rest is cut)."""
    notes = []
    for i, (text, encoding) in enumerate(zip(texts, tokenizer.encode_batch(list(texts), add_special_tokens=False))):
        named, length = f"note: text {i + 1} ({text[:40]!r}{'...' if len(text) > 40 else ''})", len(encoding.ids)
        if length == 0:
            notes.append(f"{named} has no tokens; it is read as one [UNK]")
        elif all(token == data.UNK_ID for token in encoding.ids):
            notes.append(f"{named} has only words outside the vocabulary, all read as [UNK]: its answer is a guess")
        if length > max_len:
            notes.append(f"{named} cut to --max-len {max_len} tokens: {length - max_len} of its {length} tokens dropped")
    return notes


def predict(argv: list[str]) -> list[tuple[str, float]]:
    parser = cli.Parser(prog="python -m experiments.sentiment predict", description="Classify texts with a run's best checkpoint.")
    parser.add_argument("--workdir", required=True, help="a run directory written by training")
    parser.add_argument("texts", nargs="+", help="texts to classify (texts starting with '-' go after --: predict --workdir W -- '-text')")
    args = parser.parse_args_with_texts(argv)
    model_cfg, data_cfg, meta, tokenizer, params = load_run(Path(args.workdir))
    encoded = data.encode(tokenizer, args.texts, max_len=data_cfg.max_len)
    if notes := text_notes(tokenizer, args.texts, data_cfg.max_len):
        print("\n".join(notes))
    tokens_BT = np.zeros((len(encoded), int(encoded.lengths_N.max())), np.int32)
    for i in range(len(encoded)):
        tokens_BT[i, : encoded.lengths_N[i]] = encoded.row(i)
    logits = classifier_logits(params, model_cfg, jnp.asarray(tokens_BT), jnp.asarray(encoded.lengths_N))
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    answers = []
    for text, probs in zip(args.texts, probabilities):
        label = int(probs.argmax())
        answers.append((meta["label_names"][label], float(probs[label])))
        print(f"{meta['label_names'][label]}\t{probs[label]:.3f}\t{text}")
    return answers


def explain(argv: list[str]):
    """Plot one layer's mean gates, cell-state norm and the running class probability over a text (``lstm_jax.gates``)."""
    parser = cli.Parser(prog="python -m experiments.sentiment explain", description="Plot the gates and running prediction of a run's best checkpoint over one text.")
    parser.add_argument("--workdir", required=True, help="a run directory written by training")
    parser.add_argument("--out", help="the PNG to write (default: <workdir>/explain.png)")
    parser.add_argument("--layer", type=int, default=0, help="recurrent layer to trace (default: 0)")
    parser.add_argument("--direction", choices=("fwd", "bwd"), default="fwd", help="direction of a bidirectional layer (default: fwd)")
    parser.add_argument("--member", type=int, default=0, help="which model of an ensemble (--ensemble) to trace (default: 0)")
    parser.add_argument("text", help="the text to explain (one starting with '-' goes after --: explain --workdir W -- '-text')")
    args = parser.parse_args_with_texts(argv)
    if args.out and not Path(args.out).parent.is_dir():
        parser.error(f"--out {args.out}: the folder {Path(args.out).parent} does not exist; create it or name another")
    if args.out and (suffix := Path(args.out).suffix.lstrip(".").lower()) not in (formats := gates.figure_formats()):
        parser.error(f"--out {args.out}: matplotlib writes no {suffix or 'extension-less'} file; end the name with one "
                     f"of .{', .'.join(sorted(formats))}")  # fmt: skip
    model_cfg, data_cfg, meta, tokenizer, params = load_run(Path(args.workdir))
    ensemble = model_cfg.ensemble
    if not 0 <= args.member < ensemble:
        which = "one model (--ensemble 1), so leave --member out" if ensemble == 1 else f"an ensemble of {ensemble} (0 to {ensemble - 1})"
        raise SystemExit(f"error: --member {args.member} does not exist; the run is {which}")
    if ensemble > 1:
        params, model_cfg = jax.tree.map(lambda leaf: leaf[args.member], params), member_config(model_cfg)
    encoded = data.encode(tokenizer, [args.text], max_len=data_cfg.max_len)
    if notes := text_notes(tokenizer, [args.text], data_cfg.max_len):
        print("\n".join(notes))
    tokens = encoded.row(0)
    try:
        explanation = gates.explain_classifier(params, model_cfg, tokens, layer=args.layer, direction=args.direction)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    names = meta["label_names"]
    shown = names.index("positive") if "positive" in names else len(names) - 1
    out = Path(args.out) if args.out else Path(args.workdir) / "explain.png"
    words = [tokenizer.id_to_token(int(token)) for token in tokens]
    member = f"member {args.member}, " if ensemble > 1 else ""
    title = f"{member}{model_cfg.cell}, layer {args.layer} {args.direction}: {args.text[:60]}"
    gates.plot_explanation(explanation, words, out, class_index=shown, class_name=names[shown], title=title)
    print(f"P({names[shown]}) {explanation.probabilities_TC[-1, shown]:.3f} after {len(words)} tokens; figure in {out}")
    return explanation


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "predict":
            predict(argv[1:])
        elif argv and argv[0] == "explain":
            explain(argv[1:])
        else:
            train(argv)
    except (data.DataError, CheckpointError, NonFiniteError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt as stop:
        note, status = interrupted(stop, argv)
        print(note, file=sys.stderr)
        raise SystemExit(status) from None
    except OSError as error:  # e.g. a full disk or a read-only folder, met outside the checks above
        raise SystemExit(cli.os_error_message(error, "free disk space or fix permissions there, or pass another --workdir")) from None


if __name__ == "__main__":
    # Orbax's first absl log gives the root logger a handler, so each Hub retry warning would print twice
    logging.getLogger("huggingface_hub").propagate = False
    main()
