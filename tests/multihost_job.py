"""One of two processes of a two-host CPU job (2 forced devices each); run by ``test_parallel.py``.

``python multihost_job.py PROCESS_ID PORT``. Every host builds the same global batch, places it with
``parallel.put_batch`` on several meshes, and prints one JSON line: per mesh, the batch gathered back from all
hosts (it must be the one every host built) or the error.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from lstm_jax import parallel  # noqa: E402

batch = {"tokens": np.arange(16, dtype=np.int32).reshape(8, 2), "weights": np.arange(8, dtype=np.float32)}
gathered = {}
for spec in ("data=4", "data=2,model=2", "data=1,model=4"):  # the data axis: all 4 devices, one per host, none
    mesh = parallel.make_mesh(spec)
    try:
        placed = parallel.put_batch(batch, mesh)
        gathered[spec] = jax.tree.map(lambda a: multihost_utils.process_allgather(a, tiled=True).tolist(), placed)
    except Exception as error:  # reported, so that the test names the mesh that failed
        gathered[spec] = f"{type(error).__name__}: {str(error)[:200]}"
print(json.dumps({"process": jax.process_index(), "gathered": gathered}))
jax.distributed.shutdown()
