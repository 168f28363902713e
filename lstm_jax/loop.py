"""The resumable training loop shared by experiments.

The loop owns what must be right for a killed run to resume to the same bits: the
data position is ``divmod(step, steps_per_epoch)`` over a deterministic per-epoch
batch list, randomness is ``fold_in(rng, step)`` (see :mod:`lstm_jax.train`), and
checkpoints hold the whole train state. Metrics after the restored step are cut
from ``metrics.jsonl``, and each checkpoint's meta carries the loop's running figures
(last validation metrics, training seconds and tokens, the unfinished metrics window),
so a resumed log reads like an uninterrupted one (but for ``tokens_per_second``, a
timing, and the lines a ``--max-steps`` stop wrote off the schedule, which are marked
``"stop": true``) and a rerun of a finished run reports what the run did.
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from lstm_jax import cli, parallel
from lstm_jax.checkpoint import RunCheckpoints, atomic_write_text
from lstm_jax.faults import kill_point


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient too many times."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train, and how often to log, evaluate and save."""

    epochs: int = dataclasses.field(default=2, metadata={"range": cli.AT_LEAST_1, "help": "training epochs (sets the learning-rate schedule)"})
    max_steps: int = dataclasses.field(
        default=0,
        metadata={"range": cli.AT_LEAST_0, "resumable": True, "help": "stop after this many steps in total (0: no limit); the schedule still spans --epochs, and the evaluation at the stop is shown but never kept as the best, so a rerun goes on as one uninterrupted run (the stop's own lines in metrics.jsonl are marked stop: true)"},
    )
    log_every: int = dataclasses.field(default=50, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "write a metrics line every N steps"})
    eval_every: int = dataclasses.field(
        default=250, metadata={"range": cli.AT_LEAST_0, "resumable": True, "help": "also evaluate (and keep the best) every N steps (0: only at epoch ends)"}
    )
    save_every: int = dataclasses.field(
        default=500, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "checkpoint every N steps (and at every epoch end)"}
    )
    keep: int = dataclasses.field(
        default=3, metadata={"range": cli.AT_LEAST_1, "resumable": True, "help": "latest checkpoints to keep (the best one is kept apart)"}
    )
    skip_nonfinite: int = dataclasses.field(
        default=0, metadata={"range": cli.AT_LEAST_0, "resumable": True, "help": "tolerate up to N steps with a NaN/Inf loss or gradient by skipping their updates"}
    )
    progress: bool = dataclasses.field(default=True, metadata={"resumable": True, "help": "show a progress bar"})

    def __post_init__(self):
        cli.check_ranges(self)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the restored step are dropped.

    A last line cut short (a full disk, a power loss) is dropped with a note; a damaged line
    before it is an error, as a write cut short explains only the last.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        kept = [line for line, record in zip(lines, parse_metrics_lines(lines, path)) if record["step"] <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def parse_metrics_lines(lines: list[str], path: Path) -> list[dict]:
    """The records of non-blank ``lines`` of ``path``, without a last line that does not parse."""
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise SystemExit(
                    f"error: line {number} of {path} is damaged ({error.msg}); "
                    "delete that line, or pass --restart to start over"
                ) from None
            print(f"note: dropped the last line of {path}: it was cut short ({error.msg})")
    return records


EMPTY_WINDOW = {"loss": 0.0, "correct": 0.0, "rows": 0.0}

# What an experiment prints on Ctrl-C: the loop's ``finally`` has already let a pending checkpoint finish.
INTERRUPTED_NOTE = "interrupted; rerun the same command to resume from the last checkpoint (--save-every sets how often)"


class StopSignal(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step's end, after a checkpoint of that step was saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


def interrupted(stop: KeyboardInterrupt, argv: list[str]) -> tuple[str, int]:
    """The note and exit status (the shell's 128 + signal) for a stop; ``--restart`` in ``argv`` would start over."""
    note = INTERRUPTED_NOTE
    if isinstance(stop, StopSignal):
        note = note.replace("the last checkpoint", f"the checkpoint of step {stop.step}")
    if "--restart" in argv:
        note += "; without --restart, which would move this run aside and start over"
    return note, 128 + getattr(stop, "signum", signal.SIGINT)


@contextlib.contextmanager
def deferred_stop_signals():
    """Within, SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption) only ask the loop to stop at the end of the
    step, so no save in flight is cut; a second one stops at once. Yields a one-item list holding the signal asked
    for, or None. Outside the main thread (where handlers cannot be set) it changes nothing."""
    asked = [None]
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum, frame):
        if asked[0] is not None:
            raise KeyboardInterrupt
        asked[0] = signum
        print(f"{signal.Signals(signum).name}: stopping at the end of this step, after saving it (again: stop now)",
              file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, ask) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def carried_figures(meta: dict | None) -> tuple[dict | None, float | None, int, dict]:
    """``(last validation metrics, train seconds, train tokens, metrics window)`` as of a checkpoint's ``meta``.

    ``meta`` None is a fresh start. The seconds are None when ``meta`` predates carrying them (or
    is empty: unreadable): the time before the resume is unknown, so tokens restart from 0 too.
    """
    if meta is None:
        return None, 0.0, 0, dict(EMPTY_WINDOW)
    loop = meta.get("loop") or {}
    seconds = loop.get("train_seconds")
    tokens = loop.get("train_tokens", 0) if seconds is not None else 0
    return meta.get("val"), seconds, tokens, dict(loop.get("window", EMPTY_WINDOW))


def window_figures(window: dict) -> dict:
    """The training loss and accuracy of a metrics window; None for a window of skipped (non-finite) steps only."""
    rows = window["rows"]
    return {"loss": window["loss"] / rows if rows else None, "accuracy": window["correct"] / rows if rows else None}


def loop_figures(seconds: float | None, tokens: int, window: dict) -> dict:
    """What a checkpoint's meta carries for :func:`carried_figures`."""
    return {"train_seconds": seconds, "train_tokens": tokens, "window": dict(window)}


def train_loop(
    state,
    train_step: Callable,
    epoch_batches: Callable[[int], list],
    evaluate: Callable[[object], dict],
    checkpoints: RunCheckpoints,
    log: MetricsLog,
    config: LoopConfig,
    *,
    meta: dict,
    tokens_in: Callable[[object], int] = lambda batch: 0,
    best_metric: str = "accuracy",
    total_steps: int | None = None,
):
    """Train from ``state.step`` to the end, checkpointing and evaluating on the way.

    Args:
      state: a ``TrainState`` (fresh or restored).
      train_step: ``(state, batch) -> (state, metrics)`` with ``loss``, ``aux`` (the
        number of correct rows) and ``finite`` in the metrics.
      epoch_batches: the deterministic batch list of an epoch.
      evaluate: ``params -> {"loss", "accuracy", ...}`` on the validation split (given ``state.eval_params``).
      checkpoints: the run's checkpoint managers.
      log: the metrics log.
      config: the loop settings.
      meta: JSON-able run description saved with every checkpoint.
      tokens_in: number of real tokens in a batch, for tokens/s.
      best_metric: the validation metric (higher is better) that picks the best checkpoint.
      total_steps: the run's length, when it is not ``config.epochs`` whole epochs (it ends inside the last).

    Returns:
      ``(state, summary)`` with ``train_seconds``, ``tokens_per_second`` and the last validation metrics
      (``last_val``), all over the whole run, also when it resumed (or had already finished). The
      timings exclude each batch shape's first, compiling step; ``train_seconds`` is None when the
      checkpoint resumed from predates carrying it, and ``tokens_per_second`` is None when no step was timed.

    Raises:
      NonFiniteError: more than ``config.skip_nonfinite`` steps were not finite.
    """
    steps_per_epoch = len(epoch_batches(0))
    total_steps = config.epochs * steps_per_epoch if total_steps is None else total_steps
    stop_step = min(total_steps, config.max_steps) if config.max_steps > 0 else total_steps
    step = int(state.step)
    best_meta = checkpoints.best_meta()
    best = best_meta["val"][best_metric] if best_meta else -math.inf
    if best_meta is None and (best_step := checkpoints.best.latest_step()) is not None:
        print(f"warning: the best checkpoint (step {best_step}) cannot be read; the next scheduled evaluation replaces it")
    # a run whose latest checkpoints were all damaged resumes from the best one, which carries the same figures
    restored_meta = checkpoints.latest_meta(step) or (best_meta if best_meta and best_meta.get("step") == step else None)
    val, seconds, tokens, window = carried_figures((restored_meta or {}) if step else None)
    if 0 < step == stop_step < total_steps:
        print(f"note: the run already stopped at step {step}, where --max-steps stops it: nothing to train (drop "
              "--max-steps, or raise it, to go on)")
    elif 0 < stop_step < step < total_steps:
        print(f"note: the run is already at step {step}, past --max-steps {stop_step}: nothing to train (drop "
              f"--max-steps, or raise it above {step}, to go on)")
    elif 0 < total_steps <= step:
        print(f"note: the run already finished its {total_steps} steps: nothing to train (--restart trains it again)")
    seconds_known = seconds is not None
    seconds = seconds or 0.0
    compiled_shapes = set()  # the first step of each batch shape compiles; keep it out of tokens/s
    bar = tqdm(total=max(stop_step, step), initial=step, disable=not config.progress, unit="step", dynamic_ncols=True)
    stopped_by_error = True
    signals = contextlib.ExitStack()
    asked = signals.enter_context(deferred_stop_signals())
    try:
        while step < stop_step:
            epoch, first = divmod(step, steps_per_epoch)
            batches = epoch_batches(epoch)
            for batch in batches[first:]:
                started = time.perf_counter()
                state, metrics = train_step(state, batch)
                kill_point("step", step + 1)  # while the step may still be computing: dispatch is asynchronous
                loss, finite = float(metrics["loss"]), bool(metrics["finite"])
                shape = jax.tree.map(np.shape, batch)
                if shape in compiled_shapes:
                    seconds += time.perf_counter() - started
                    tokens += tokens_in(batch)
                compiled_shapes.add(shape)
                step += 1
                bar.update(1)
                if not finite:
                    bad = int(state.nonfinite_steps)
                    if bad > config.skip_nonfinite:
                        latest = checkpoints.latest.latest_step()
                        kept = (
                            "no checkpoint was saved before it"
                            if latest is None
                            else f"the last good checkpoint (step {latest}) is kept"
                        )
                        raise NonFiniteError(
                            f"non-finite loss or gradient at step {step} ({bad} so far, --skip-nonfinite {config.skip_nonfinite}); "
                            f"{kept}; lower the learning rate or raise --skip-nonfinite"
                        )
                else:
                    rows = float(np.sum(batch.weights_B))
                    window["loss"] += loss * rows
                    window["correct"] += float(metrics["aux"])
                    window["rows"] += rows
                # a --max-steps stop off the schedule logs and evaluates too, in lines marked "stop" that leave the
                # metrics window running, so that the rerun's lines are those of a run never stopped
                stop = {"stop": True} if step == stop_step < total_steps else {}
                if step % config.log_every == 0 or step == stop_step:
                    record = {"step": step, "epoch": epoch, "split": "train", **window_figures(window),
                              "tokens_per_second": tokens / seconds if seconds else None}  # fmt: skip
                    off_schedule = stop if step % config.log_every else {}
                    log.write({**record, **off_schedule})
                    bar.set_postfix({shown: "-" if record[name] is None else f"{record[name]:.{digits}f}"
                                     for shown, name, digits in (("loss", "loss", 3), ("acc", "accuracy", 3),
                                                                 ("tok_s", "tokens_per_second", 0))})
                    if not off_schedule:
                        window = dict(EMPTY_WINDOW)
                end_of_epoch = step % steps_per_epoch == 0
                scheduled_eval = end_of_epoch or step == total_steps or (config.eval_every and step % config.eval_every == 0)
                if scheduled_eval or step == stop_step:
                    val = evaluate(state.eval_params)
                    log.write({"step": step, "epoch": epoch, "split": "validation", **val, **({} if scheduled_eval else stop)})
                    kill_point("eval", step)
                    bar.write(
                        f"step {step} epoch {epoch}: validation {best_metric} {val[best_metric]:.4f}, loss {val['loss']:.4f}"
                    )
                    # one only because --max-steps stops here is shown but is no candidate: a rerun that goes on
                    # picks among the evaluations of the uninterrupted run
                    if scheduled_eval and val[best_metric] > best:
                        best = val[best_metric]
                        checkpoints.save_best(step, state, {**meta, "step": step, "epoch": epoch, "val": val,
                                                            "loop": loop_figures(seconds if seconds_known else None, tokens, window)})
                asked_to_stop = asked[0]
                if end_of_epoch or step == stop_step or step % config.save_every == 0 or asked_to_stop is not None:
                    loop = loop_figures(seconds if seconds_known else None, tokens, window)
                    checkpoints.save(step, state, {**meta, "step": step, "epoch": epoch, "val": val, "loop": loop})
                if asked_to_stop is not None:
                    raise StopSignal(asked_to_stop, step)
                if step == stop_step:
                    break
        stopped_by_error = False
    finally:  # also on an error, so the last good checkpoint is never left half-written
        bar.close()
        try:
            checkpoints.wait()
        except Exception as wait_error:
            if not stopped_by_error:
                raise
            print(f"note: while stopping, {wait_error}")  # the first error goes on; this one is said too
        finally:
            signals.close()
    if asked[0] is not None:  # a signal while the last saves were awaited: they are on disk, and the process stops
        raise StopSignal(asked[0], step)
    summary = {"train_seconds": seconds if seconds_known else None,
               "tokens_per_second": tokens / seconds if seconds and seconds_known else None, "last_val": val,
               "steps": step, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}  # fmt: skip
    return state, summary


def save_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy against step, train and validation, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        rows = [r for r in records if r["split"] == split]
        for ax, key in zip(axes, ("loss", "accuracy")):
            points = [(r["step"], r[key]) for r in rows if r[key] is not None]  # None: a window of skipped steps only
            ax.plot([step for step, _ in points], [value for _, value in points], style, label=split)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resume_on_mesh(state, checkpoints: RunCheckpoints, mesh, *, resuming: bool, shard_embedding: bool = False):
    """Place a fresh ``state`` on ``mesh`` and, when ``resuming``, restore the newest intact checkpoint onto that layout.

    Whatever mesh saved the checkpoint, the state comes back laid out for this one
    (see :mod:`lstm_jax.parallel`). Each damaged checkpoint skipped on the way is printed.

    Returns:
      ``(state, state_sharding, skipped)``: ``skipped`` lists ``"step N: reason"``.
    """
    sharding = parallel.state_sharding(state, mesh, shard_embedding=shard_embedding)
    state = jax.device_put(state, sharding)
    restored = checkpoints.restore(state) if resuming else None
    if restored is None:
        return state, sharding, []
    for skipped in restored.skipped:
        print(f"warning: skipped damaged checkpoint {skipped}")
    print(f"resumed from step {restored.step} in {checkpoints.workdir}")
    return restored.state, sharding, restored.skipped
