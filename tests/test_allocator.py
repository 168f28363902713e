"""experiments.allocator: the restart with glibc's malloc keeping freed memory, and that memory being reused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.allocator import OPT_OUT, RESTARTED, TUNABLES, tuned_environment, untuned_environment, uses_glibc

REPO = Path(__file__).resolve().parents[1]
UNTUNED_ENV = untuned_environment(os.environ)  # so a restart happens

# Allocates and touches a 96 MiB block from a second thread (as XLA's workers allocate), frees it, and does it
# again: prints the page faults of the second round.
SECOND_ROUND_FAULTS = """
import resource, sys, threading
from experiments.allocator import rerun_keeping_freed_memory
if sys.argv[1] == "restart":
    rerun_keeping_freed_memory()
size = 96 << 20
def allocate_and_touch():
    block = bytearray(size)
    block[::4096] = bytes(len(range(0, size, 4096)))
def round_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=allocate_and_touch)
    worker.start()
    worker.join()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
round_faults()
print(round_faults())
"""


def test_the_tunables_are_added_after_any_the_user_set():
    environ = tuned_environment({"HOME": "/h", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"})
    assert environ["HOME"] == "/h"
    assert environ["GLIBC_TUNABLES"] == ":".join(("glibc.rtld.optional_static_tls=2048", *TUNABLES))
    assert tuned_environment({})["GLIBC_TUNABLES"] == ":".join(TUNABLES)
    assert tuned_environment({})[RESTARTED] == "1" and RESTARTED not in untuned_environment(tuned_environment({}))


@pytest.mark.parametrize(
    "environ, glibc",
    [
        ({OPT_OUT: "0"}, True),  # turned off
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True),  # the user's own malloc settings win
        ({"GLIBC_TUNABLES": ":".join(TUNABLES)}, True),  # already restarted: no loop
        ({RESTARTED: "1"}, True),  # restarted, but glibc dropped GLIBC_TUNABLES (secure execution): no loop either
        ({}, False),  # another C library
    ],
)
def test_nothing_to_do(environ, glibc):
    assert tuned_environment(environ, glibc) is None


@pytest.mark.skipif(not uses_glibc(), reason="glibc only")
def test_the_restarted_process_keeps_its_arguments_and_reuses_freed_memory():
    run = lambda *args, **extra: subprocess.run(
        [sys.executable, "-c", SECOND_ROUND_FAULTS, *args], cwd=REPO, env={**UNTUNED_ENV, **extra}, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    restarted = int(run("restart"))
    plain = int(run("plain"))
    opted_out = int(run("restart", **{OPT_OUT: "0"}))
    assert plain > 20_000 and opted_out > 20_000  # every 4 KiB page of the new mapping faults again
    assert restarted < 1_000, restarted  # the freed block came back from the heap, already mapped


@pytest.mark.skipif(not uses_glibc(), reason="glibc only")
def test_the_sentiment_command_restarts_itself_once():
    code = (
        "import os, runpy, sys; sys.argv = ['experiments.sentiment', '--help']; "
        "print(os.environ.get('GLIBC_TUNABLES', 'unset'), flush=True); "
        "runpy.run_module('experiments.sentiment', run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=UNTUNED_ENV, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "unset" and lines[1] == ":".join(TUNABLES), lines[:2]
    assert "usage:" in out and out.count("usage:") == 1


def test_a_program_from_standard_input_runs_once_without_the_restart():
    """``python -`` has read its program from stdin: a restart would find stdin empty, run nothing and exit 0."""
    program = "from experiments.allocator import rerun_keeping_freed_memory\nrerun_keeping_freed_memory()\nprint('ran')\nraise SystemExit(5)\n"
    done = subprocess.run([sys.executable, "-"], input=program, cwd=REPO, env=UNTUNED_ENV, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (5, "ran\n")
