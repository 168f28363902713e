"""Data parallelism on a device mesh, against the single-device run.

The mesh tests run ``mesh_job.py`` in a subprocess with four forced host devices
(``--xla_force_host_platform_device_count=4``); the four "devices" share this
machine's cores, so only results are compared here, never speed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lstm_jax import parallel

JOB = Path(__file__).with_name("mesh_job.py")


@pytest.fixture(scope="module")
def mesh_report():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(JOB)], capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4", "2x2"])
def test_mesh_losses_track_single_device_at_every_step(mesh_report, mesh):
    single, sharded = np.array(mesh_report["losses_1"]), np.array(mesh_report[f"losses_{mesh}"])
    assert len(single) == len(sharded) == 20
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0] - 0.1  # it trained, so the steps had something to agree on
    assert mesh_report[f"params_difference_{mesh}"] < 1e-5


@pytest.mark.slow
def test_recurrent_gradients_inside_shard_map_equal_the_single_device_ones(mesh_report):
    """Zero initial carries and replicated weights are brought to the batch's varying mesh axes, so both the
    kernel and the lax.scan loops (and a generic cell's scan) run inside ``jax.shard_map``."""
    differences = mesh_report["shard_map_gradient_differences"]
    assert set(differences) == {"lstm_kernel", "lstm_scan_loops", "gru_kernel", "gru_scan_loops"}
    assert max(differences.values()) < 1e-5, differences


@pytest.mark.slow
def test_every_batch_is_split_over_the_data_axis(mesh_report):
    assert mesh_report["batch_spec"] == str(P("data"))
    assert mesh_report["batch_shard_shapes"] == [[4, 12]] * 4
    assert mesh_report["specs_in_step_4"] == [str(P("data"))]  # as the compiled step sees it
    assert mesh_report["state_param_specs_4"] == [str(P())]  # params replicated


@pytest.mark.slow
def test_embedding_table_and_its_moments_split_over_the_model_axis(mesh_report):
    assert mesh_report["embed_spec_2x2"] == str(P("model", None))
    assert mesh_report["embed_moment_specs_2x2"] == [str(P("model", None))]
    assert mesh_report["embed_shard_shapes_2x2"] == [[32, 16]] * 4
    assert mesh_report["head_spec_2x2"] == str(P())


@pytest.mark.slow
def test_checkpoint_restores_across_mesh_sizes(mesh_report):
    assert mesh_report["restored_4_to_1_devices"] == 1
    assert mesh_report["restored_1_to_4_devices"] == 4
    assert mesh_report["restored_difference_4_to_1"] == 0.0
    assert mesh_report["restored_difference_1_to_4"] == 0.0  # parameters, their average and Adam's moments
    assert mesh_report["accuracy_4_restored_on_1"] == mesh_report["accuracy_4"]
    assert mesh_report["accuracy_1_restored_on_4"] == mesh_report["accuracy_1"]
    assert mesh_report["accuracy_4"] > 0.9, mesh_report["accuracy_4"]  # labels are balanced: 0.5 is the class prior


@pytest.mark.slow
def test_batch_that_does_not_divide_gets_a_clear_error(mesh_report):
    assert mesh_report["indivisible_error"] == (
        "--batch-size 6 does not split over the mesh's 4 data devices; use a multiple of 4"
    )


@pytest.mark.parametrize(
    ("spec", "devices", "sizes"),
    [("", 4, {"data": 4, "model": 1}), ("data=4", 4, {"data": 4, "model": 1}), ("model=2", 4, {"data": 2, "model": 2}),
     ("data=2,model=2", 4, {"data": 2, "model": 2}), (" data=1 ", 1, {"data": 1, "model": 1})],
)  # fmt: skip
def test_parse_mesh(spec, devices, sizes):
    assert parallel.parse_mesh(spec, devices) == sizes


@pytest.mark.parametrize(
    ("spec", "message"),
    [("data=3", "needs 3 devices but 4 are visible"), ("batch=4", "write axis=size pairs"), ("data=x", "write axis=size"),
     ("data=0", "write axis=size"), ("data=2,data=2", "write axis=size"), ("data=2,model=4", "needs 8 devices")],
)  # fmt: skip
def test_parse_mesh_errors_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        parallel.parse_mesh(spec, 4)


def test_a_vocabulary_that_does_not_divide_over_model_gets_a_note():
    two_way = type("FakeMesh", (), {"shape": {"data": 1, "model": 2}})()
    assert parallel.unsplit_embedding_note(13838, two_way) is None
    note = parallel.unsplit_embedding_note(13837, two_way)
    assert "keeps the embedding table whole" in note and "13837 rows" in note and "model=2" in note


def test_single_device_mesh_and_shardings():
    mesh = parallel.make_mesh("")
    assert dict(mesh.shape) == {"data": len(jax.devices()), "model": 1}
    tree = {"embed": np.zeros((6, 2)), "head": {"w": np.zeros((2, 2))}, "ensemble": {"embed": np.zeros((3, 6, 2))}}
    shardings = parallel.state_sharding(tree, mesh, shard_embedding=True)
    assert shardings["embed"].spec == P("model", None)
    assert shardings["ensemble"]["embed"].spec == P(None, "model", None)  # members, vocabulary, features
    assert shardings["head"]["w"].spec == P()
    parallel.check_batch_size(len(jax.devices()) * 3, mesh)


def test_every_host_places_the_same_global_batch_on_any_mesh():
    """Two processes on the CPU (jax.distributed, 2 devices each): where the data axis is smaller than the number of
    hosts, each host used to hand over its own half of the rows, and JAX refused the batch."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    job = Path(__file__).with_name("multihost_job.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    processes = [subprocess.Popen([sys.executable, str(job), str(i), port], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]  # fmt: skip
    reports = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in processes]
    expected = {"tokens": np.arange(16).reshape(8, 2).tolist(), "weights": np.arange(8.0).tolist()}
    for report in reports:
        assert report["gathered"] == {spec: expected for spec in ("data=4", "data=2,model=2", "data=1,model=4")}

