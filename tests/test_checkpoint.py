"""Tests for lstm_jax.checkpoint: Orbax round trips, retention, damaged checkpoints, best-by-metric.

Damage is done to the files Orbax writes for a step (``<step>/state/...`` holds the
arrays in an OCDBT database under ``d/`` folders, ``<step>/meta/metadata`` the JSON),
the way a full disk or a killed copy would leave them.
"""

import errno
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lstm_jax.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    WorkdirBusy,
    config_differences,
    prepare_workdir,
    resumable_fields,
    workdir_lock,
    write_config,
)
from lstm_jax.loop import LoopConfig
from lstm_jax.model import ModelConfig
from lstm_jax.optim import OptimConfig, make_optimizer
from lstm_jax.parallel import MeshConfig
from lstm_jax.train import init_train_state

OPTIMIZER = make_optimizer(OptimConfig(warmup_steps=0), total_steps=10)
UPDATE = jax.jit(OPTIMIZER.update)
# A restore that fails half-way inside Orbax leaves TensorStore futures behind, reported when collected, and now and
# then one of Orbax's coroutines that it never awaited (a RuntimeWarning when collected). lstm_jax itself has no
# coroutines, so the second filter hides only Orbax's.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


def make_state(value: float, seed: int = 0, ema: bool = True):
    """A TrainState whose every float leaf depends on ``value`` (params, Adam moments, EMA)."""
    params = {
        "rnn": [{"w_h": jnp.arange(6.0).reshape(3, 2) + value, "b": jnp.full((2,), value)}],
        "head": {"w": jnp.eye(2) * value},
    }
    state = init_train_state(params, OPTIMIZER, seed, ema=ema)
    grads = jax.tree.map(lambda p: jnp.sin(p + value), params)
    _, opt_state = UPDATE(grads, state.opt_state, params)
    return state.replace(
        opt_state=opt_state,
        step=jnp.asarray(int(value), jnp.int32),
        nonfinite_steps=jnp.asarray(2, jnp.int32),
        ema_params=jax.tree.map(lambda p: p * 0.5, params) if ema else None,
    )


def assert_states_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def checkpoints(tmp_path):
    managers = []

    def open_(**kwargs):
        kwargs.setdefault("async_save", False)
        managers.append(RunCheckpoints(tmp_path, **kwargs))
        return managers[-1]

    yield open_
    for manager in managers:
        manager.close()
    gc.collect()  # report what a failed restore left behind here, under this module's filter


def meta_for(step):
    return {
        "step": step,
        "epoch": 1,
        "val": {"accuracy": 0.5 + step / 100, "loss": None},
        "buckets": [8, 16],
        "name": "ß",
    }


def test_round_trip_is_bit_exact_across_reopen(checkpoints, tmp_path):
    state = make_state(3.0)
    run = checkpoints(async_save=True)
    run.save(3, state, meta_for(3))
    run.wait()
    reopened = checkpoints()
    restored = reopened.restore(make_state(0.0))  # the template's values must not leak into the result
    assert restored.step == 3 and restored.skipped == []
    assert restored.meta == meta_for(3)
    assert_states_equal(restored.state, state)
    assert np.asarray(restored.state.rng).dtype == np.uint32


def test_reading_a_checkpoint_back_warns_about_nothing(checkpoints, caplog):
    """Orbax warned, four lines per predict, that an item "was found but could not be restored" when one item's
    metadata was read from a manager that knew the items by name only."""
    run = checkpoints()
    run.save(3, make_state(3.0), meta_for(3))
    run.save_best(3, make_state(3.0), meta_for(3))
    reopened = checkpoints()
    with caplog.at_level("WARNING"):
        assert reopened.restore(make_state(0.0)).step == 3 and reopened.restore_best(make_state(0.0))[0].step == 3
        assert reopened.best_meta() == meta_for(3) and reopened.latest_meta(3) == meta_for(3)
    assert [record.getMessage() for record in caplog.records] == []


def test_round_trip_without_ema(checkpoints):
    run = checkpoints()
    run.save(1, make_state(1.0, ema=False), {})
    restored = run.restore(make_state(0.0, ema=False))
    assert restored.state.ema_params is None
    assert_states_equal(restored.state, make_state(1.0, ema=False))


def test_restore_of_an_empty_workdir_is_none(checkpoints):
    run = checkpoints()
    assert run.restore(make_state(0.0)) is None
    assert run.restore(make_state(0.0), which="best") is None
    assert run.best_meta() is None


def test_keeps_only_the_latest_k(checkpoints, tmp_path):
    run = checkpoints(keep=2)
    for step in (1, 2, 3, 4):
        run.save(step, make_state(float(step)), meta_for(step))
    assert sorted(run.latest.all_steps()) == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]
    restored = run.restore(make_state(0.0))
    assert restored.step == 4
    assert_states_equal(restored.state, make_state(4.0))


def test_saving_an_existing_step_again_keeps_the_first(checkpoints):
    run = checkpoints()
    run.save(2, make_state(2.0), meta_for(2))
    run.save(2, make_state(7.0), {"other": True})
    restored = run.restore(make_state(0.0))
    assert restored.meta == meta_for(2)
    assert_states_equal(restored.state, make_state(2.0))


def truncate_arrays(step_dir: Path):
    files = [
        f
        for f in (step_dir / "state").rglob("*")
        if f.is_file() and "d" in f.relative_to(step_dir / "state").parts[:-1]
    ]
    assert files, "Orbax wrote no array data files where expected"
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])


def garble_meta(step_dir: Path):
    target = step_dir / "meta" / "metadata"
    assert target.is_file()
    target.write_text('{"step": 3, "val"')


def halve_every_file(step_dir: Path):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def delete_array_file(step_dir: Path):
    largest_array_file(step_dir).unlink()


def zero_bytes_in_arrays(step_dir: Path):
    """Zeroes 16 bytes inside the array data; Orbax alone reads such a file without complaint."""
    target = largest_array_file(step_dir)
    content = bytearray(target.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 16] = bytes(16)
    target.write_bytes(bytes(content))


def largest_array_file(step_dir: Path) -> Path:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, "Orbax wrote no array data files where expected"
    return max(files, key=lambda f: f.stat().st_size)


def make_big_state(value: float):
    """A state with an incompressible 64k-float leaf, so damage hits raw array bytes."""
    state = make_state(value, ema=False)
    noise = np.random.default_rng(int(value)).standard_normal(1 << 16).astype(np.float32)
    return state.replace(params={**state.params, "embed": jnp.asarray(noise)})


@pytest.mark.parametrize("damage", [truncate_arrays, garble_meta, halve_every_file, delete_array_file, zero_bytes_in_arrays])
def test_damaged_newest_checkpoint_is_skipped_and_reported(damage, checkpoints, tmp_path):
    run = checkpoints()
    for step in (1, 2, 3):
        run.save(step, make_big_state(float(step)), meta_for(step))
    run.close()
    damage(tmp_path / "checkpoints" / "3")
    restored = checkpoints().restore(make_big_state(0.0))
    assert restored.step == 2
    assert restored.meta == meta_for(2)
    assert_states_equal(restored.state, make_big_state(2.0))
    assert len(restored.skipped) == 1 and restored.skipped[0].startswith("step 3: ")
    if damage is zero_bytes_in_arrays:
        assert "checksum mismatch" in restored.skipped[0]


def test_a_damaged_checkpoint_is_moved_aside_so_its_step_is_saved_again(checkpoints, tmp_path):
    folder = tmp_path / "checkpoints"
    run = checkpoints(keep=3)
    for step in (1, 2, 3):
        run.save(step, make_big_state(float(step)), meta_for(step))
    run.close()
    for n in (1, 2):  # damaged, resumed, saved again, damaged again
        truncate_arrays(folder / "3")
        resumed = checkpoints(keep=3)
        restored = resumed.restore(make_big_state(0.0))
        assert restored.step == 2 and len(restored.skipped) == 1
        aside = folder / f"3.damaged-{n}"
        assert restored.skipped[0].startswith("step 3: ") and restored.skipped[0].endswith(f"; moved to {aside}")
        assert aside.is_dir() and not (folder / "3").exists()
        assert resumed.latest.all_steps() == [1, 2]
        resumed.save(3, make_big_state(3.5 + n), meta_for(3))  # the resumed run reaches step 3 again
        resumed.close()
        again = checkpoints().restore(make_big_state(0.0))
        assert again.step == 3 and again.skipped == [] and again.meta == meta_for(3)
        assert_states_equal(again.state, make_big_state(3.5 + n))
    resumed = checkpoints(keep=3)
    resumed.save(4, make_big_state(4.0), meta_for(4))
    assert resumed.latest.all_steps() == [2, 3, 4]  # the folders moved aside count toward no limit
    assert sorted(p.name for p in folder.iterdir()) == ["2", "3", "3.damaged-1", "3.damaged-2", "4"]


def test_all_checkpoints_damaged_is_an_error_that_names_the_fix(checkpoints, tmp_path):
    run = checkpoints()
    for step in (1, 2):
        run.save(step, make_state(float(step)), meta_for(step))
    run.close()
    for step in ("1", "2"):
        truncate_arrays(tmp_path / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="--restart") as error:
        checkpoints().restore(make_state(0.0))
    message = str(error.value)
    assert "step 2:" in message and "step 1:" in message and str(tmp_path / "checkpoints") in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]  # none read: none moved aside


def test_checkpoint_of_another_shape_is_not_loaded(checkpoints):
    run = checkpoints()
    run.save(1, make_state(1.0), meta_for(1))
    other = make_state(0.0)
    other = other.replace(params={**other.params, "head": {"w": jnp.zeros((3, 3))}})
    reason = r"step 1: saved with another shape: params/head/w is \(2, 2\) there and \(3, 3\) in this model"
    with pytest.raises(CheckpointError, match=reason):
        run.restore(other)  # refused from the metadata, before Orbax starts reading
    assert run.latest.all_steps() == [1] and (Path(run.latest.directory) / "1").is_dir()  # the template was wrong


def test_best_keeps_the_last_save_best_apart_from_the_latest(checkpoints, tmp_path):
    run = checkpoints(keep=1)
    assert run.best_meta() is None
    run.save_best(5, make_state(5.0), meta_for(5))
    assert run.best_meta() == meta_for(5)
    run.save_best(9, make_state(9.0), meta_for(9))
    for step in (5, 9, 10, 11):
        run.save(step, make_state(float(step)), meta_for(step))
    assert run.best_meta() == meta_for(9)
    assert run.best.all_steps() == [9] and run.latest.all_steps() == [11]
    best = run.restore(make_state(0.0), which="best")
    assert best.step == 9 and best.meta == meta_for(9)
    assert_states_equal(best.state, make_state(9.0))
    assert run.restore(make_state(0.0)).step == 11
    assert (tmp_path / "best" / "9").is_dir() and not (tmp_path / "best" / "5").exists()


@pytest.mark.parametrize("damage", [truncate_arrays, garble_meta])
def test_a_damaged_best_checkpoint_is_reported_for_the_caller_to_fall_back(damage, checkpoints, tmp_path):
    run = checkpoints()
    run.save_best(4, make_state(4.0), meta_for(4))
    run.save(6, make_state(6.0), meta_for(6))
    best, warning = run.restore_best(make_state(0.0))
    assert warning is None and best.step == 4 and best.meta == meta_for(4)
    damage(tmp_path / "best" / "4")
    best, warning = run.restore_best(make_state(0.0))
    assert best is None and warning.startswith(f"warning: the best checkpoint in {tmp_path / 'best'} cannot be read (step 4: ")
    assert "\n" not in warning
    assert (tmp_path / "best" / "4").is_dir()  # nothing moved: a wrong template would look the same
    assert run.restore(make_state(0.0)).step == 6  # the latest still reads
    if damage is garble_meta:
        assert run.best_meta() is None  # so the loop warns and its next evaluation replaces it


def test_a_new_best_at_the_step_of_an_unreadable_one_replaces_it(checkpoints, tmp_path, capsys):
    """A resumed run re-evaluates the step of a best checkpoint it could not read: the new one is saved, and the old
    one moved aside (before, the save was skipped as a step that exists, and the run ended with no readable best)."""
    run = checkpoints()
    run.save_best(4, make_state(4.0), meta_for(4))
    garble_meta(tmp_path / "best" / "4")
    assert run.best_meta() is None
    run.save_best(4, make_state(5.0), meta_for(5))
    best, warning = run.restore_best(make_state(0.0))
    assert warning is None and best.step == 4 and best.meta == meta_for(5)
    assert_states_equal(best.state, make_state(5.0))
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["4", "4.damaged-1"]
    assert f"moved to {tmp_path / 'best' / '4.damaged-1'}" in capsys.readouterr().out


def test_a_reader_leaves_an_unfinished_save_alone(checkpoints, tmp_path):
    """predict and explain open a run read-only: a save in flight may be a training run's (here this process's own,
    asynchronous); a manager that cleaned up unfinished saves on opening deleted it, and the save failed."""
    owner = checkpoints(async_save=True)
    owner.save_best(2, {"w": jnp.ones((4000, 4000))}, meta_for(2))  # 64 MB: still being written below
    if not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "best").iterdir()):
        pytest.skip("the save finished before the reader could open the run")
    checkpoints(read_only=True)
    owner.wait()
    assert owner.best.all_steps() == [2] and owner.best_meta() == meta_for(2)


@pytest.mark.parametrize("failing", ["save", "wait"])
def test_a_full_disk_is_an_error_naming_the_folder(failing, checkpoints, tmp_path, monkeypatch):
    """Simulated: Orbax raises ENOSPC when it starts a save (``RunCheckpoints.save``), or when an
    asynchronous one finishes (``RunCheckpoints.wait``; Orbax's own save waits for the previous one first).

    A really full disk is not made here; the error path from Orbax onwards is the same.
    """

    def no_space(manager, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(manager.directory))

    run = checkpoints(async_save=True)
    if failing == "save":
        monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
        with pytest.raises(CheckpointError) as error:
            run.save(1, make_state(1.0), meta_for(1))
    else:
        run.save(1, make_state(1.0), meta_for(1))
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", no_space)
        with pytest.raises(CheckpointError) as error:
            run.wait()
    message = str(error.value)
    assert message.startswith(f"could not write a checkpoint to {(tmp_path / 'checkpoints').absolute()} (OSError: ")
    assert "No space left on device" in message and "pass another --workdir" in message and "\n" not in message
    monkeypatch.undo()


def test_a_run_directory_is_held_by_one_process_at_a_time(tmp_path):
    """Another process holding the workdir (a job restarted while the old one still runs) makes a second trainer stop
    with a one-line error; in one process the lock nests, and it is free again once released or its holder ends."""
    workdir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    hold = ("import sys; from lstm_jax.checkpoint import workdir_lock\n"
            f"with workdir_lock({str(workdir)!r}):\n    print('held', flush=True); sys.stdin.readline()")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"another process is training in {workdir}; .*another --workdir"):
            with workdir_lock(workdir):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)

    def another_process_can_lock() -> bool:
        attempt = subprocess.run([sys.executable, "-c", f"from lstm_jax.checkpoint import workdir_lock\nwith workdir_lock({str(workdir)!r}): pass"],
                                 cwd=repo, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert attempt.returncode == 0 or "another process is training" in attempt.stderr, attempt.stderr
        return attempt.returncode == 0

    with workdir_lock(workdir):  # free again
        with workdir_lock(workdir):  # nested in this process
            pass
        assert not another_process_can_lock()  # the inner block's end did not release the outer one's lock
    assert another_process_can_lock()


def test_config_differences_lists_nested_leaves():
    saved = {"ModelConfig": {"hidden_size": 256, "cell": "lstm", "gone": 1}, "lr": 0.1, "same": {"x": [1, 2]}}
    current = {"ModelConfig": {"hidden_size": 128, "cell": "lstm", "new": True}, "lr": 0.1, "same": {"x": [1, 2]}}
    assert config_differences(saved, current) == [
        "ModelConfig.gone: 1 -> None",
        "ModelConfig.hidden_size: 256 -> 128",
        "ModelConfig.new: None -> True",
    ]
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 2}}) == ["a.b: 1 -> 2"]
    assert config_differences({"a": {"b": 1}}, {"a": 3}) == ["a: {'b': 1} -> 3"]
    assert config_differences(current, current) == []


def test_only_fields_marked_resumable_may_change_on_resume(tmp_path):
    configs = {"LoopConfig": LoopConfig(epochs=2, eval_every=100), "MeshConfig": MeshConfig()}
    assert {"eval_every", "max_steps", "keep", "mesh", "shard_embedding"} <= resumable_fields(configs)
    assert not {"epochs"} & resumable_fields(configs)
    assert prepare_workdir(tmp_path, configs) is False
    write_config(tmp_path, configs)
    resumed = {**configs, "LoopConfig": LoopConfig(epochs=2, eval_every=50, max_steps=7), "MeshConfig": MeshConfig(mesh="data=1")}
    assert prepare_workdir(tmp_path, resumed) is True
    changed = {**configs, "LoopConfig": LoopConfig(epochs=3, eval_every=50)}
    with pytest.raises(SystemExit, match=r"another config \(LoopConfig\.epochs: 2 -> 3\)"):
        prepare_workdir(tmp_path, changed)


@pytest.mark.parametrize("text", ["null", "[]", '"x"'])
def test_a_config_json_that_is_not_an_object_is_damaged(text, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SystemExit, match=rf"config.json is damaged \(it holds {re.escape(text)}, not the run's configs\)"):
        prepare_workdir(tmp_path, {"LoopConfig": LoopConfig()})


def test_a_run_saved_before_a_field_existed_resumes_with_that_field_at_its_default(tmp_path):
    configs = {"ModelConfig": ModelConfig(), "LoopConfig": LoopConfig(epochs=2)}
    write_config(tmp_path, configs)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["ModelConfig"]["ensemble"], saved["ModelConfig"]["label_smoothing"]  # as a run written before them
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert prepare_workdir(tmp_path, configs) is True
    with pytest.raises(SystemExit, match=r"another config \(ModelConfig\.ensemble: 1 -> 2\)"):
        prepare_workdir(tmp_path, {**configs, "ModelConfig": ModelConfig(ensemble=2)})
    saved["ModelConfig"]["removed_field"] = 3  # a field the code no longer has is still a difference
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"ModelConfig\.removed_field: 3 -> None"):
        prepare_workdir(tmp_path, configs)
