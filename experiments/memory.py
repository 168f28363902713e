"""Long-range memory: the adding problem and the copy task, for every cell, resumably.

One run (adding problem, T = 200, LSTM)::

    python -m experiments.memory --task adding --cell lstm --T 200 --workdir runs/memory/adding

The comparison sweep (LSTM, GRU, tanh RNN, layer-norm, peephole and CIFG LSTMs on the
adding problem at T = 100 and 200) and the copy task at T = 100 for every cell::

    python -m experiments.memory --sweep --workdir runs/memory
    python -m experiments.memory --sweep --task copy --sweep-lengths 100 --sweep-cells all --steps 1000 --workdir runs/memory-copy1000

A run writes ``config.json``, ``metrics.jsonl`` (train lines, and a line per evaluation
on the fixed test set, which the shared loop marks ``"split": "validation"``), ``curves.png``,
``results.json`` (final test loss, steps and seconds to solve, wall time) and Orbax
checkpoints to its workdir (``best/`` is the evaluation with the highest test accuracy: a
learning-curve task has no held-out split to choose on, and the results report the final
weights); rerunning it resumes. A sweep
runs its cells one after another in ``<workdir>/<task>-T<T>-<cell>`` and renders
``experiments/results/memory.md`` with a figure and a table.

Training batches are drawn from ``fold_in(key, step)``, so data depend on the seed and
the step only; the test set is a fixed draw from another key.

Expected result (defaults, seed 0, 2 shared CPU cores; all in ``experiments/results/memory.md``):
adding at T = 200, the LSTM reaches test MSE < 0.01 at step 1,000 (about 5 min) and ends at 0.0012;
the tanh RNN ends at 0.163, the baseline. No cell solves copy at T = 100 in 1,000 steps.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from lstm_jax import cli, parallel
from lstm_jax.cells import CELLS, get_cell
from lstm_jax.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    atomic_write_text,
    config_changes,
    config_dict,
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
from lstm_jax.optim import OptimConfig, make_optimizer, run_notes
from lstm_jax.tasks import TASKS, get_task, init_task_model, make_task_loss
from lstm_jax.train import init_train_state, make_train_step, params_sha256

SWEEP_CELLS = "lstm,gru,rnn,layer_norm,peephole,cifg"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task and the network."""

    task: str = dataclasses.field(default="adding", metadata={"help": "synthetic task: " + ", ".join(TASKS)})
    cell: str = dataclasses.field(default="lstm", metadata={"help": "recurrent cell: " + ", ".join(CELLS)})
    T: int = dataclasses.field(
        default=200, metadata={"range": cli.AT_LEAST_1, "help": "sequence length (adding) or delay (copy: sequences have T + 20 steps)"}
    )
    hidden_size: int = dataclasses.field(default=64, metadata={"range": cli.AT_LEAST_1, "help": "units of the recurrent layer"})
    batch_size: int = dataclasses.field(
        default=64, metadata={"range": cli.AT_LEAST_1, "help": "training sequences per step, drawn fresh every step"}
    )
    steps: int = dataclasses.field(
        default=2000, metadata={"range": cli.AT_LEAST_1, "help": "training steps (the learning-rate schedule spans them)"}
    )
    test_size: int = dataclasses.field(default=1000, metadata={"range": cli.AT_LEAST_1, "help": "sequences in the fixed test set"})
    seed: int = dataclasses.field(default=0, metadata={"range": cli.SEED, "help": "seed for init, training data and test set"})

    def __post_init__(self):
        cli.check_ranges(self)
        task = get_task(self.task)
        if self.T < task.min_T:
            raise ValueError(f"--T must be >= {task.min_T} for --task {self.task}, got {self.T}")
        get_cell(self.cell)


@dataclasses.dataclass(frozen=True)
class MemoryOptimConfig(OptimConfig):
    """Optimiser settings; the defaults here suit the synthetic tasks (tighter clipping, no decay, no EMA)."""

    learning_rate: float = cli.field_with_default(OptimConfig, "learning_rate", 3e-3)
    warmup_steps: int = cli.field_with_default(OptimConfig, "warmup_steps", 100)
    weight_decay: float = cli.field_with_default(OptimConfig, "weight_decay", 0.0)
    clip_norm: float = cli.field_with_default(OptimConfig, "clip_norm", 1.0)
    ema_decay: float = cli.field_with_default(OptimConfig, "ema_decay", 0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.decay_embeddings:
            raise ValueError("the memory tasks' model has no embedding table: drop --decay-embeddings")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives, and how often it logs, evaluates and saves."""

    workdir: str = dataclasses.field(
        default="runs/memory",
        metadata={"resumable": True, "help": "run directory (a sweep puts one run per cell and T under it); reruns resume"},
    )
    restart: bool = dataclasses.field(
        default=False,
        metadata={
            "resumable": True,
            "help": "start fresh even if the workdir has a run (the old files move to <workdir>/previous-<time>)"
        },
    )
    max_steps: int = dataclasses.field(
        default=0,
        metadata={"range": cli.AT_LEAST_0, "resumable": True, "help": "stop after this many steps in total (0: --steps); the schedule still spans --steps"},
    )
    eval_every: int = dataclasses.field(default=100, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "evaluate on the test set every N steps"})
    log_every: int = dataclasses.field(default=50, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "write a train metrics line every N steps"})
    save_every: int = dataclasses.field(default=500, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "checkpoint every N steps"})
    keep: int = dataclasses.field(default=2, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "latest checkpoints to keep"})
    progress: bool = dataclasses.field(default=True, metadata={"resumable": True, "help": "show a progress bar"})

    def __post_init__(self):
        cli.check_ranges(self)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The comparison sweep (not part of a run's saved config)."""

    sweep: bool = dataclasses.field(
        default=False,
        metadata={"help": "run every --sweep-cells at every --sweep-lengths, then write the results page"},
    )
    sweep_cells: str = dataclasses.field(default=SWEEP_CELLS, metadata={"help": "comma-separated cells, or 'all'"})
    sweep_lengths: str = dataclasses.field(default="100,200", metadata={"help": "comma-separated values of T"})
    results_dir: str = dataclasses.field(
        default="experiments/results", metadata={"help": "where the sweep writes memory.md and its figures"}
    )


RUN_CLASSES = (TaskConfig, MemoryOptimConfig, RunConfig, parallel.MeshConfig)


def parse_args(argv: list[str]) -> tuple[dict, SweepConfig]:
    cli.check_unique_flags(*RUN_CLASSES, SweepConfig)
    parser = cli.Parser(
        prog="python -m experiments.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for cls in (*RUN_CLASSES, SweepConfig):
        cli.add_flags(parser, cls)
    args = parser.parse_args(argv)
    out_of_range = cli.range_errors(vars(args), *RUN_CLASSES)
    if out_of_range:
        parser.error("; ".join(out_of_range))
    try:
        configs = {cls.__name__: cli.from_args(cls, args) for cls in RUN_CLASSES}
        if configs["MeshConfig"].shard_embedding:
            raise ValueError("the memory tasks' model has no embedding table: drop --shard-embedding")
        parallel.check_batch_size(args.batch_size, parallel.start(configs["MeshConfig"]))
        return configs, cli.from_args(SweepConfig, args)
    except ValueError as error:  # a config's own check, or a mesh that does not fit
        parser.error(str(error))


class StepBatches(Sequence):
    """The batches of a range of steps, each drawn only when it is read (slices stay lazy)."""

    def __init__(self, batch_at: Callable[[int], object], steps: range):
        self.batch_at, self.steps = batch_at, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return StepBatches(self.batch_at, self.steps[index])
        return self.batch_at(self.steps[index])


def scheduled_evaluations(records: list[dict], eval_every: int, steps: int) -> list[dict]:
    """The test records on the evaluation schedule (every ``eval_every`` steps, and the last step). A run stopped by
    --max-steps, or one that saved on another interval, was also evaluated elsewhere, which an uninterrupted run never
    was, so its figures would depend on how it was run."""
    return [r for r in records
            if r["split"] == "validation" and (not eval_every or r["step"] % eval_every == 0 or r["step"] == steps)]


def solved_at(records: list[dict], threshold: float) -> dict | None:
    """The first test record whose loss is below ``threshold``, or None."""
    return next((r for r in records if r["split"] == "validation" and r["loss"] < threshold), None)


def train_one(configs: dict) -> dict:
    """Train (or resume) one run and write its results; returns ``results.json``'s contents."""
    with workdir_lock(Path(configs["RunConfig"].workdir)):  # no other process trains in it meanwhile
        return _train_one_unlocked(configs)


def _train_one_unlocked(configs: dict) -> dict:
    task_cfg, optim_cfg, run_cfg = configs["TaskConfig"], configs["MemoryOptimConfig"], configs["RunConfig"]
    task, cell = get_task(task_cfg.task), get_cell(task_cfg.cell)
    workdir = Path(run_cfg.workdir)
    resuming = prepare_workdir(workdir, configs, restart=run_cfg.restart)
    if not resuming:
        write_config(workdir, configs)
    init_key, train_key, test_key = jax.random.split(jax.random.key(task_cfg.seed), 3)
    generate = task.generate
    test = generate(test_key, task_cfg.test_size, task_cfg.T)
    chunk = run_cfg.save_every  # an "epoch" of the loop is one save interval; data are keyed by step, not epoch

    def epoch_batches(epoch):
        return StepBatches(lambda step: generate(jax.random.fold_in(train_key, step), task_cfg.batch_size, task_cfg.T),
                           range(epoch * chunk, (epoch + 1) * chunk))  # fmt: skip

    optimizer = make_optimizer(optim_cfg, task_cfg.steps)
    for note in run_notes(optim_cfg, task_cfg.steps):
        print(note)
    params = init_task_model(init_key, cell, task, task_cfg.hidden_size)
    state = init_train_state(params, optimizer, task_cfg.seed, ema=optim_cfg.ema_decay > 0)
    checkpoints = RunCheckpoints(workdir, keep=run_cfg.keep)
    mesh = parallel.make_mesh(configs["MeshConfig"].mesh)
    state, state_sharding, _ = resume_on_mesh(state, checkpoints, mesh, resuming=resuming)
    test = jax.device_put(test, parallel.replicated(mesh))
    start_step = int(state.step)
    log = MetricsLog(workdir / "metrics.jsonl", start_step)
    earlier = [r for r in log.read() if r["split"] == "validation"]
    seconds_before = earlier[-1]["seconds"] if earlier else 0.0  # wall time of the run before this resume
    loss_fn = make_task_loss(cell, task)
    test_loss = jax.jit(loss_fn)
    started = time.perf_counter()

    def evaluate(params) -> dict:
        loss, correct = test_loss(params, test)
        return {
            "loss": float(loss),
            "accuracy": float(correct) / task_cfg.test_size,
            "seconds": seconds_before + time.perf_counter() - started,
        }

    loop_cfg = LoopConfig(
        epochs=math.ceil(task_cfg.steps / chunk), max_steps=run_cfg.max_steps,
        log_every=run_cfg.log_every, eval_every=run_cfg.eval_every, save_every=run_cfg.save_every, keep=run_cfg.keep, progress=run_cfg.progress,
    )  # fmt: skip
    meta = {"task": task_cfg.task, "cell": task_cfg.cell, "T": task_cfg.T}
    print(f"note: accuracy here is the fraction of {task.aux_name}, on training batches and on the test set")
    step_on_mesh = make_train_step(
        loss_fn, optimizer, ema_decay=optim_cfg.ema_decay, sam_rho=optim_cfg.sam_rho, state_sharding=state_sharding, batch_sharding=parallel.batch_sharding(mesh)
    )
    state, summary = train_loop(
        state, parallel.host_batch_step(step_on_mesh, mesh), epoch_batches, evaluate, checkpoints, log, loop_cfg,
        meta=meta, tokens_in=lambda batch: batch.x_BTE.shape[0] * batch.x_BTE.shape[1], total_steps=task_cfg.steps,
    )  # fmt: skip
    checkpoints.close()
    final = evaluate(state.eval_params)
    records = log.read()
    evaluations = scheduled_evaluations(records, run_cfg.eval_every, task_cfg.steps)
    threshold = task.solved(task_cfg.T)
    solved = solved_at(evaluations, threshold)
    title = f"{task_cfg.task}, T = {task_cfg.T}: {task_cfg.cell} (baseline {task.baseline(task_cfg.T):.4f})"
    save_curves(records, workdir / "curves.png", title=title)
    results = {
        "task": task_cfg.task, "cell": task_cfg.cell, "T": task_cfg.T, "steps": summary["steps"],
        "test_loss": final["loss"], "test_accuracy": final["accuracy"], "accuracy_counts": task.aux_name,
        "baseline_loss": task.baseline(task_cfg.T), "solved_below": threshold,
        "steps_to_solve": solved["step"] if solved else None, "seconds_to_solve": solved["seconds"] if solved else None,
        "best_test_loss": min((r["loss"] for r in evaluations), default=None),  # None: stopped before any
        "wall_seconds": final["seconds"], "train_seconds": summary["train_seconds"], "resumed_from_step": start_step,
        "nonfinite_steps": int(state.nonfinite_steps), "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "params_sha256": params_sha256(state.params), "config": config_dict(configs),
        "jax_backend": jax.default_backend(),
    }  # fmt: skip
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2))
    print(
        f"{title}: test loss {final['loss']:.4f}, "
        + (f"solved (< {threshold:.4g}) at step {results['steps_to_solve']}" if solved else f"not solved (never < {threshold:.4g})")
        + f"; results in {workdir / 'results.json'}"
    )
    return results


# ------------------------------------------------------------------------------ sweep


def sweep_runs(configs: dict, sweep: SweepConfig) -> list[dict]:
    """Run every cell at every length one after another; finished runs are read back, not retrained."""
    cells = list(CELLS) if sweep.sweep_cells == "all" else [name.strip() for name in sweep.sweep_cells.split(",")]
    for name in cells:
        if name not in CELLS:
            raise SystemExit(f"error: unknown cell {name!r} in --sweep-cells; choose from {', '.join(CELLS)} or 'all'")
    try:  # every length is checked as --T is, before any run trains
        lengths = [int(value) for value in sweep.sweep_lengths.split(",")]
        for T in lengths:
            dataclasses.replace(configs["TaskConfig"], T=T)
    except ValueError as error:
        raise SystemExit(f"error: --sweep-lengths {sweep.sweep_lengths}: {error}") from None
    base = Path(configs["RunConfig"].workdir)
    runs = []
    for T in lengths:
        for name in cells:
            task_cfg = dataclasses.replace(configs["TaskConfig"], cell=name, T=T)
            run_cfg = dataclasses.replace(configs["RunConfig"], workdir=str(base / f"{task_cfg.task}-T{T}-{name}"))
            run_configs = {**configs, "TaskConfig": task_cfg, "RunConfig": run_cfg}
            done = Path(run_cfg.workdir) / "results.json"
            previous = json.loads(done.read_text()) if done.exists() and not run_cfg.restart else None
            if previous and previous["steps"] == task_cfg.steps and not config_changes(previous["config"], run_configs):
                print(f"{done}: finished earlier, read back")
                results = previous
            else:
                results = train_one(run_configs)
            records = MetricsLog(Path(run_cfg.workdir) / "metrics.jsonl", results["steps"]).read()
            evaluations = scheduled_evaluations(records, run_cfg.eval_every, task_cfg.steps)
            results["test_curve"] = [(r["step"], r["loss"]) for r in evaluations]
            runs.append(results)
    return runs


def plot_sweep(runs: list[dict], path: Path) -> None:
    """Test loss against step, one panel per T, one line per cell, with the baseline and the solve line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["T"] for r in runs})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
    for ax, T in zip(axes[0], lengths):
        for r in (r for r in runs if r["T"] == T and r["test_curve"]):  # a run stopped early may have none
            steps, losses = zip(*r["test_curve"])
            ax.plot(steps, losses, label=r["cell"])
        first = next(r for r in runs if r["T"] == T)
        ax.axhline(first["baseline_loss"], color="k", ls="--", lw=1, label="baseline")
        ax.axhline(first["solved_below"], color="k", ls=":", lw=1, label="solved")
        ax.set(yscale="log", xlabel="step", ylabel="test loss", title=f"{first['task']}, T = {T}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_table(runs: list[dict]) -> str:
    """A markdown table: one row per run."""
    rows = ["| T | cell | final test loss | baseline | best test loss | steps to solve | seconds to solve | wall s | test accuracy |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        solve = lambda v, fmt: "not solved" if v is None else format(v, fmt)
        rows.append(f"| {r['T']} | {r['cell']} | {r['test_loss']:.4f} | {r['baseline_loss']:.4f} | {'-' if r['best_test_loss'] is None else format(r['best_test_loss'], '.4f')} | "
                    f"{solve(r['steps_to_solve'], 'd')} | {solve(r['seconds_to_solve'], '.0f')} | {r['wall_seconds']:.0f} | {r['test_accuracy']:.3f} |")  # fmt: skip
    return "\n".join(rows)


def write_results_page(results_dir: Path) -> Path:
    """Render ``memory.md`` from every sweep summary (``memory_<task>.json``) in ``results_dir``."""
    sections = ["# Long-range memory: adding and copy tasks",
                ("Written by `python -m experiments.memory --sweep`. Test loss is on a fixed held-out draw of "
                "1,000 sequences, evaluated every 100 steps; \"solved\" means below the line in the figure "
                "(adding: MSE 0.01; copy: a tenth of the baseline). Seconds are wall time on the machine named "
                 "below, compilation and evaluation included; on a machine shared with other jobs they are upper "
                 "bounds that vary with the load, so compare cells by steps.")]  # fmt: skip
    for summary_path in sorted(results_dir.glob("memory_*.json")):
        summary = json.loads(summary_path.read_text())
        runs = summary["runs"]
        counts = runs[0]["accuracy_counts"]
        sections += [f"## {summary['task']}", f"Command: `{summary['command']}`  \n{summary['machine']}",
                     f"![{summary['task']}]({summary['figure']})", sweep_table(runs),
                     f"Test accuracy counts {counts}. Settings: {summary['settings']}."]  # fmt: skip
    path = results_dir / "memory.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def run_sweep(configs: dict, sweep: SweepConfig, argv: list[str]) -> Path:
    results_dir = Path(sweep.results_dir)
    try:  # before training, which a results folder that cannot be written would waste
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: cannot create --results-dir {results_dir}: {error.strerror}; pass a writable one") from None
    runs = sweep_runs(configs, sweep)
    task = configs["TaskConfig"].task
    figure = f"memory_{task}.png"
    plot_sweep(runs, results_dir / figure)
    settings = {k: v for k, v in dataclasses.asdict(configs["TaskConfig"]).items() if k not in ("cell", "T")}
    settings.update(
        {
            k: v
            for k, v in dataclasses.asdict(configs["MemoryOptimConfig"]).items()
            if k in ("learning_rate", "clip_norm", "schedule")
        }
    )
    machine = f"{jax.default_backend()}, {jax.device_count()} device(s), {parallel.usable_cores()} CPU cores"
    summary = {"task": task, "command": "python -m experiments.memory " + " ".join(argv), "figure": figure,
               "machine": machine, "settings": settings, "runs": runs}  # fmt: skip
    (results_dir / f"memory_{task}.json").write_text(json.dumps(summary, indent=1))
    page = write_results_page(results_dir)
    print(sweep_table(runs))
    print(f"results page: {page}")
    return page


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        configs, sweep = parse_args(argv)
        if sweep.sweep:
            run_sweep(configs, sweep, argv)
        else:
            train_one(configs)
    except (CheckpointError, NonFiniteError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt as stop:
        note, status = interrupted(stop, argv)
        print(note, file=sys.stderr)
        raise SystemExit(status) from None
    except OSError as error:  # e.g. a full disk or a read-only folder, met outside the checks above
        raise SystemExit(cli.os_error_message(error, "free disk space or fix permissions there")) from None


if __name__ == "__main__":
    main()
