"""Deterministic crash points, so tests can SIGKILL a run at an exact moment.

Set ``LSTM_JAX_KILL_AT="<point>:<step>"`` and the process kills itself with
SIGKILL (no cleanup, no flush, as a preempted machine would) the first time it
reaches ``<point>`` at training step ``<step>``. The points, in the order a step
passes them:

  step  a train step has been dispatched and may still be computing; nothing saved
  eval  validation ran and its metrics line was written; the best checkpoint not yet saved
  best  an asynchronous save of the best checkpoint has started and is still being written
  save  an asynchronous save of the latest checkpoint has started and is still being written

``"<point>:<step>:<SIGNAL>"`` sends that signal instead (``TERM``, ``INT``), as a
scheduler or Ctrl-C would. Unset (the normal case), a call costs one environment lookup.
"""

import os
import signal

KILL_AT_ENV = "LSTM_JAX_KILL_AT"
POINTS = ("step", "eval", "best", "save")


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if ``LSTM_JAX_KILL_AT`` is ``f"{point}:{step}"`` (or send the signal it names after)."""
    wanted = os.environ.get(KILL_AT_ENV)
    if wanted and (wanted == f"{point}:{step}" or wanted.startswith(f"{point}:{step}:")):
        name = wanted.split(":")[2] if wanted.count(":") == 2 else "KILL"
        os.kill(os.getpid(), signal.Signals[f"SIG{name}"])
