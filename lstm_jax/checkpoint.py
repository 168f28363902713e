"""Orbax checkpoints for a run directory.

``<workdir>/checkpoints`` keeps the latest ``keep`` saves (periodic and end of
epoch); ``<workdir>/best`` keeps the single best save by a metric. Each save holds
the train state (a pytree of arrays) and a JSON ``meta`` dict (data position,
config, metrics). Restoring walks back from the newest step and skips damaged
checkpoints, reporting each one; once an older one reads, each skipped one is moved
aside to ``<step>.damaged-<n>`` (a name Orbax does not read as a step), so that step
is saved again and no longer counts toward ``keep``. Each save records the SHA-256 of
its arrays, and a restore whose arrays hash differently is damaged too: Orbax reads
flipped bytes inside an array file without complaint. Saves are asynchronous: a save
killed half-way leaves only an Orbax temporary folder, which restore ignores and the
next start removes. A save that fails (full disk, no permission) is a
``CheckpointError`` naming the folder.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

from lstm_jax.faults import kill_point
from lstm_jax.train import params_sha256

CHECKSUM_KEY = "state_sha256"  # kept in the saved meta, never shown to callers


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclasses.dataclass
class Restored:
    state: Any
    meta: dict
    step: int
    skipped: list[str]  # "step N: reason" for each newer checkpoint that could not be read


def _manager(directory: Path, keep: int, async_save: bool, read_only: bool = False) -> ocp.CheckpointManager:
    # a reader (predict, explain) leaves unfinished saves alone: they may be a training run's, in flight
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=not read_only, cleanup_tmp_directories=not read_only)  # fmt: skip
    # handlers named up front: with item names alone, reading one item's metadata warned about the other (absl)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


class RunCheckpoints:
    """The latest-k and best-by-metric Orbax managers of one run."""

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """``read_only``: for reading a run that another process may be training (no folders made, no unfinished
        save cleaned up); only a run's owner, holding its workdir lock, writes."""
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / "checkpoints", keep, async_save, read_only)
        self.best = _manager(self.workdir / "best", 1, async_save, read_only)

    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def _save(self, manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
        if step in manager.all_steps():
            return
        try:
            manager.save(step, args=self._args(state, {**meta, CHECKSUM_KEY: params_sha256(state)}), force=True)
        except Exception as error:  # Orbax and TensorStore wrap OS errors in their own types
            raise _write_error(manager, error) from error

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` as latest checkpoint ``step`` (a no-op if it exists)."""
        self._save(self.latest, step, state, meta)
        kill_point("save", step)

    def save_best(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` as the best checkpoint, replacing the previous best. A best already at ``step`` is
        one the caller could not read (else it would not beat it): it is moved aside, not kept in the new one's place."""
        if step in self.best.all_steps():
            print(f"note: the best checkpoint at step {step} could not be read; {_set_aside(self.best.directory, step)}")
            self.best.reload()
        self._save(self.best, step, state, meta)
        kill_point("best", step)

    def best_meta(self) -> dict | None:
        """The meta of the best checkpoint; None if there is none or it cannot be read (a new best replaces it)."""
        return _read_meta(self.best, self.best.latest_step())

    def latest_meta(self, step: int) -> dict | None:
        """The meta of latest checkpoint ``step``; None if there is none or it cannot be read."""
        return _read_meta(self.latest, step) if step in self.latest.all_steps() else None

    def restore(self, abstract_state, *, which: str = "latest",
                fix: str = "pass --restart to start from scratch (this deletes nothing)") -> Restored | None:
        """The newest readable checkpoint of ``which`` ("latest" or "best"), or None if there is none. When no latest
        one reads but the best one does, the latest ones are damaged (the template is right): they are moved aside
        and the best one, a whole train state too, is returned.

        Raises:
          CheckpointError: checkpoints exist but none can be read; its message ends with ``fix``.
        """
        manager = self.latest if which == "latest" else self.best
        restored, skipped = _newest_readable(manager, abstract_state)
        if restored is None and skipped and which == "latest":
            best, _ = _newest_readable(self.best, abstract_state, move_aside=False)
            if best is not None:
                print(f"warning: no latest checkpoint reads ({_reasons(skipped)}); resuming from the best one, step {best.step}")
                reports = [f"step {bad}: {reason}; {_set_aside(manager.directory, bad)}" for bad, reason in skipped]
                manager.reload()
                return dataclasses.replace(best, skipped=reports)
        if restored is None and skipped:  # none read: perhaps the template is wrong, not the checkpoints
            raise CheckpointError(f"no readable checkpoint in {manager.directory} ({_reasons(skipped)}); {fix}")
        return restored

    def restore_best(self, abstract_state) -> tuple[Restored | None, str | None]:
        """The best checkpoint, or None and a one-line warning where it exists but cannot be read, so that the
        caller can go on with other weights and say so. Nothing is moved aside."""
        restored, skipped = _newest_readable(self.best, abstract_state, move_aside=False)
        if restored is None and skipped:
            return None, f"warning: the best checkpoint in {self.best.directory} cannot be read ({_reasons(skipped)})"
        return restored, None

    def wait(self) -> None:
        """Block until every started save is on disk."""
        for manager in (self.latest, self.best):
            try:
                manager.wait_until_finished()
            except Exception as error:
                raise _write_error(manager, error) from error

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _newest_readable(manager: ocp.CheckpointManager, abstract_state, *, move_aside: bool = True
                     ) -> tuple[Restored | None, list[tuple[int, str]]]:
    """The newest checkpoint of ``manager`` that reads and matches its checksum, and ``(step, reason)`` for each newer
    one that does not. Once one reads, the newer ones are moved aside (see the module docstring) if ``move_aside``;
    if none reads, none is moved."""
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        mismatch = _shape_mismatch(manager, step, abstract_state)
        if mismatch:  # found before Orbax starts reading: a restore that fails half-way leaves coroutines behind
            skipped.append((step, mismatch))
            continue
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            )
        except Exception as error:  # a damaged checkpoint can fail in many ways inside Orbax and TensorStore
            skipped.append((step, _reason(error)))
            continue
        meta = dict(restored["meta"])
        saved_sha256 = meta.pop(CHECKSUM_KEY, None)
        if saved_sha256 is not None and saved_sha256 != params_sha256(restored["state"]):
            skipped.append((step, "checksum mismatch: the arrays on disk changed after they were saved"))
            continue
        reports = [f"step {bad}: {reason}" for bad, reason in skipped]
        if move_aside and skipped:
            reports = [f"{report}; {_set_aside(manager.directory, bad)}" for report, (bad, _) in zip(reports, skipped)]
            manager.reload()  # forget the steps moved aside
        return Restored(restored["state"], meta, step, reports), skipped
    return None, skipped


def _reasons(skipped: list[tuple[int, str]]) -> str:
    return "; ".join(f"step {bad}: {reason}" for bad, reason in skipped)


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    path_name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")  # a field and a dict key alike
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _shape_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state) -> str | None:
    """Why checkpoint ``step`` cannot fill ``abstract_state``'s arrays (the first leaf whose shape differs), or None.

    None also where the metadata cannot be read: the restore itself then says what is wrong.
    """
    try:
        saved = manager.item_metadata(step)["state"]
    except Exception:
        return None
    saved_shapes = _shapes_by_path(getattr(saved, "tree", saved))
    for path, shape in _shapes_by_path(abstract_state).items():
        if path in saved_shapes and saved_shapes[path] != shape:
            return f"saved with another shape: {path} is {saved_shapes[path]} there and {shape} in this model"
    return None


def _read_meta(manager: ocp.CheckpointManager, step: int | None) -> dict | None:
    if step is None:
        return None
    try:
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception:  # damaged: restore() reports why
        return None
    meta.pop(CHECKSUM_KEY, None)
    return meta


def _set_aside(directory, step: int) -> str:
    """Rename the damaged checkpoint ``step`` to the first free ``<step>.damaged-<n>``; says where it went."""
    folder = Path(directory) / str(step)
    n = 1
    while (target := folder.with_name(f"{step}.damaged-{n}")).exists():
        n += 1
    try:
        folder.rename(target)
    except OSError as error:
        return f"left in place ({error.strerror or error}): move it out of {folder.parent} to save step {step} again"
    return f"moved to {target}"


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
    reason = _reason(error)
    return CheckpointError(
        f"could not write a checkpoint to {manager.directory} ({reason}); "
        "free disk space or fix its permissions, or pass another --workdir, then rerun to resume"
    )


def has_checkpoints(workdir, *, best: bool = True) -> bool:
    """Whether ``workdir`` holds a finished latest checkpoint, or (with ``best``) a best one (Orbax names them by
    step). Only a latest one is a state to resume from: a best one can be saved before the first latest."""
    return any(
        entry.is_dir() and entry.name.isdigit()
        for folder in (Path(workdir) / "checkpoints", *([Path(workdir) / "best"] if best else []))
        if folder.is_dir()
        for entry in folder.iterdir()
    )


def atomic_write_text(path, text: str) -> None:
    """Write ``path`` so that a kill at any moment leaves the old or the new content, never a part."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["field: saved -> current", ...]`` for every leaf that differs between two nested dicts."""
    differences = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, f"{prefix}{name}.")
        elif old != new:
            differences.append(f"{prefix}{name}: {old!r} -> {new!r}")
    return differences


def config_dict(configs: dict) -> dict:
    """``{config class name: its fields}`` for a dict of config dataclasses, as written to ``config.json``."""
    return {name: dataclasses.asdict(config) for name, config in configs.items()}


def write_config(workdir: Path, configs: dict) -> None:
    """Write ``config.json`` (atomically): the record ``prepare_workdir`` checks a resumed run against."""
    atomic_write_text(Path(workdir) / "config.json", json.dumps(config_dict(configs), indent=2))


def _make_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: cannot create workdir {workdir}: {error.strerror}; pass a writable --workdir") from None


_LOCKED: set[Path] = set()  # the run directories this process holds


class WorkdirBusy(SystemExit):
    """Another process holds the run directory (:func:`workdir_lock`); the message says what to do."""


@contextlib.contextmanager
def workdir_lock(workdir) -> Iterator[None]:
    """Holds an exclusive lock on the run directory (created if need be) for the block, so that a second process
    training in it (a job restarted while the old one still runs, say) stops with a one-line error instead of
    interleaving its saves and logs with this one's. The lock goes with the process, also one that is killed; nested
    use in one process is allowed. Without POSIX ``flock`` nothing is locked."""
    workdir = Path(workdir)
    _make_workdir(workdir)
    key = workdir.resolve()
    if fcntl is None or key in _LOCKED:
        yield
        return
    fd = os.open(workdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise WorkdirBusy(f"error: another process is training in {workdir}; let it finish (or stop it), "
                          "or pass another --workdir") from None
    _LOCKED.add(key)
    try:
        yield
    finally:
        _LOCKED.discard(key)
        os.close(fd)


def _move_aside(workdir: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = workdir / f"previous-{stamp}"
    for n in range(2, 1000):  # two restarts in one second
        if not backup.exists():
            break
        backup = workdir / f"previous-{stamp}-{n}"
    backup.mkdir()
    for entry in list(workdir.iterdir()):
        if not entry.name.startswith("previous-"):
            shutil.move(str(entry), backup / entry.name)
    print(f"--restart: moved the previous run to {backup}")


def resumable_fields(configs: dict) -> set[str]:
    """Names of the fields marked ``metadata={"resumable": True}``: a resumed run may change them,
    because they do not alter what was trained so far (logging, saving, stopping, device layout)."""
    return {field.name for config in configs.values() for field in dataclasses.fields(config) if field.metadata.get("resumable")}


def with_added_fields(saved: dict, configs: dict) -> dict:
    """A saved config with the fields added to the config classes since it was written, at their defaults.

    A new field's default must keep the behaviour from before the field existed, so a run saved
    then resumes unchanged."""
    filled = {name: dict(fields) if isinstance(fields, dict) else fields for name, fields in saved.items()}
    for name, config in configs.items():
        if isinstance(filled.get(name), dict):
            for field in dataclasses.fields(config):
                if field.name not in filled[name] and field.default is not dataclasses.MISSING:
                    filled[name][field.name] = field.default
    return filled


def config_changes(saved: dict, configs: dict) -> list[str]:
    """The differences (as :func:`config_differences`) between a saved config and ``configs`` in fields a resumed run
    may not change (see :func:`resumable_fields`); fields the saved one predates count as their defaults."""
    resumable = resumable_fields(configs)
    return [d for d in config_differences(with_added_fields(saved, configs), config_dict(configs))
            if d.split(": ")[0].split(".")[-1] not in resumable]  # fmt: skip


def prepare_workdir(workdir: Path, configs: dict, *, restart: bool = False) -> bool:
    """Check (or create) a run directory; True when it holds a run to resume under ``configs``.

    With ``restart``, an existing run moves to ``<workdir>/previous-<time>`` (nothing is deleted).
    A saved ``config.json`` that differs in any field not in :func:`resumable_fields` stops with an
    error naming the fields; fields it predates count as their defaults (:func:`with_added_fields`).
    Nothing is written but the folder: the caller calls ``write_config``.
    """
    workdir = Path(workdir)
    if restart and workdir.exists() and any(workdir.iterdir()):
        _move_aside(workdir)
    _make_workdir(workdir)
    config_path = workdir / "config.json"
    if config_path.exists():
        try:
            saved = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SystemExit(
                f"error: {config_path} is damaged ({error}); restore it, or pass --restart to start over"
            ) from None
        if not isinstance(saved, dict):
            raise SystemExit(f"error: {config_path} is damaged (it holds {json.dumps(saved)[:40]}, not the run's "
                             "configs); restore it, or pass --restart to start over")  # fmt: skip
        differences = config_changes(saved, configs)
        if differences:
            raise SystemExit(
                f"error: {workdir} holds a run with another config ({'; '.join(differences)}); use another --workdir or pass --restart"
            )
        return True
    if has_checkpoints(workdir):
        raise SystemExit(
            f"error: {workdir} has checkpoints but no config.json; restore that file, or pass --restart to start over"
        )
    return False
