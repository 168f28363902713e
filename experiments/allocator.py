"""glibc's malloc for a training process: keep freed memory for the next step instead of returning it.

XLA's CPU runtime allocates the buffers of every call afresh, from its worker threads. glibc gives each thread an
arena whose heaps top out at 64 MiB, and serves larger blocks (or any above its mmap threshold, at most 32 MiB) with
a new ``mmap`` that it unmaps again on ``free``. So every step maps its temporary buffers anew, and the first write
of each 4 KiB page faults and is zeroed by the kernel: 9,000 to 17,000 faults per step of ``benchmarks.train_step``.
With one arena, no ``mmap`` and no trimming, freed blocks are reused on the next step and nothing faults; the
values do not change (same ``params_sha256``). ``benchmarks/NOTES.md`` (section 11) has the measurements.

These settings are read when the process starts, so a script applies them by starting itself again once with
``GLIBC_TUNABLES`` set (:func:`rerun_keeping_freed_memory`). The cost is memory: the process keeps its peak heap
until it exits. ``LSTM_JAX_KEEP_FREED_MEMORY=0`` turns this off; malloc tunables already in ``GLIBC_TUNABLES`` are
left as they are. This module imports nothing heavy, so a script can call it before it imports JAX.
"""

import os
import sys
from collections.abc import Mapping

OPT_OUT = "LSTM_JAX_KEEP_FREED_MEMORY"
# Set in the restarted process: glibc drops GLIBC_TUNABLES from a secure-execution process (setuid, or a Python
# with file capabilities), which would otherwise restart again and again.
RESTARTED = "LSTM_JAX_MALLOC_RESTARTED"
TUNABLES = (
    "glibc.malloc.arena_max=1",  # every thread allocates from the main heap, which has no 64 MiB limit
    "glibc.malloc.mmap_max=0",  # no block gets its own mapping
    "glibc.malloc.trim_threshold=1099511627776",  # the heap's free top is kept, not given back
)


def uses_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        return False


def has_malloc_tunables(environ: Mapping[str, str]) -> bool:
    """Whether ``GLIBC_TUNABLES`` holds a malloc setting: the user's own, or ours after the restart."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tuned_environment(environ: Mapping[str, str], glibc: bool = True) -> dict[str, str] | None:
    """``environ`` with the malloc tunables added, or None where there is nothing to do.

    None without glibc, with ``LSTM_JAX_KEEP_FREED_MEMORY=0``, where :func:`has_malloc_tunables`, or in a process
    that is already the restart.
    """
    if not glibc or environ.get(OPT_OUT, "1") == "0" or has_malloc_tunables(environ) or RESTARTED in environ:
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (existing, *TUNABLES))), RESTARTED: "1"}


def untuned_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without ``GLIBC_TUNABLES`` and the opt-out, so that a script started with it restarts once."""
    return {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, RESTARTED)}


def rerun_keeping_freed_memory() -> None:
    """Start this Python command again with :data:`TUNABLES`; return at once where :func:`tuned_environment` is None.

    Call it first thing under ``if __name__ == "__main__":``. The process keeps its id, arguments and standard
    streams. Where the restart itself fails, or the program came from standard input (``python -``, which the
    restart could not read again), the run goes on with glibc's defaults.
    """
    environ = tuned_environment(os.environ, uses_glibc())
    if environ is None or sys.argv[0] in ("-", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:
        return
