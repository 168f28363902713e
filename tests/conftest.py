"""Session-wide test settings.

One JAX persistent compilation cache in a temporary folder serves the whole session, in-process and in the
subprocesses the tests start (they inherit the environment): the experiment tests train the same small
models several times (a run, then its resumed half, then predict), and each rerun would otherwise compile
every length bucket's programs again. A cached executable is the same program, so results keep their bits.
"""

import os
import shutil
import tempfile

import jax
import pytest

from lstm_jax.parallel import usable_cores

CACHE_DIR = tempfile.mkdtemp(prefix="lstm_jax_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable core, at most 4; each worker holds its own JAX runtime and compiled programs."""
    return max(1, min(4, usable_cores()))
