"""The CPU LSTM kernel of ``csrc/lstm_cpu.cc``: built on first use, called through XLA's FFI.

:mod:`lstm_jax.fused` runs its two loops through this kernel on CPU for float32, and
through ``lax.scan`` everywhere else. The kernel keeps each core's slice of the weights
in its cache for the whole sequence and fuses the gates into the step; ``benchmarks/NOTES.md``
(section 8) has the measurements that motivate it.

The shared library is compiled with the system's C++ compiler (``$CXX``, else the first of
``c++``, ``g++`` and ``clang++`` on the PATH) for the CPU it runs on, once per source, compiler
and CPU, into ``$LSTM_JAX_CACHE`` (default ``~/.cache/lstm_jax``). Without a compiler, or with ``LSTM_JAX_NATIVE=0``, the
``lax.scan`` loops run instead, after one warning in the first case. ``LSTM_JAX_NUM_THREADS``
caps the kernel's threads (a whole number >= 1; default, and for any other value after a
warning: the cores this process may use; :func:`thread_count`); the results do not depend on it. The kernel reads it at every call, so set it before the process starts, or at
least not while a computation may be running (JAX dispatches asynchronously).

Where the CPU has AMX (Intel since Sapphire Rapids) the kernel also takes bfloat16 operands,
the ``compute_dtype="bfloat16"`` of :class:`lstm_jax.model.ModelConfig`: each matmul then
multiplies the operands rounded to bfloat16 on the tile units, with float32 sums, while the
gates, the cell state and everything saved stay float32. :func:`bf16_supported` says whether
it can.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import varying

SOURCE = Path(__file__).parent / "csrc" / "lstm_cpu.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")
TARGETS = {"forward": "lstm_jax_cpu_forward", "backward": "lstm_jax_cpu_backward"}
_registered = []  # the library whose handlers XLA holds


_scan_only = []  # non-empty inside `disabled()`


def enabled():
    """Whether :mod:`lstm_jax.fused` uses the kernel in what it traces now.

    True unless ``LSTM_JAX_NATIVE=0``, inside :func:`disabled`, or where the kernel cannot be built.
    """
    return os.environ.get("LSTM_JAX_NATIVE", "1") != "0" and not _scan_only and load()


@contextlib.contextmanager
def disabled():
    """Trace with the ``lax.scan`` loops instead of the kernel, e.g. to compare the two in one process.

    The choice is made when a function is traced: a function jitted and first called inside the block keeps
    the scan loops afterwards, and one traced before keeps the kernel. JAX also keeps what it traced of inner
    functions by their identity (a ``lax.scan`` body, a function under ``jax.jit`` or ``jax.checkpoint``), so a
    fresh outer function built from inner functions already traced elsewhere may keep their first choice: call
    ``jax.clear_caches()`` before entering, and again after leaving, where both paths must be traced from the same
    inner functions. A gradient's backward pass always runs where its forward pass ran.
    """
    _scan_only.append(True)
    try:
        yield
    finally:
        _scan_only.pop()


def _cpu_signature(compiler):
    """What ``-march=native`` builds for here: the target macros the compiler predefines for it (every ISA extension
    it would use), and the CPU's feature line (``flags`` on x86 Linux, ``Features`` on Arm Linux) where there is one,
    so that a cache shared between machines never hands one CPU another's build."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            features = next((line for line in cpuinfo if line.split(":")[0].strip() in ("flags", "Features")), "")
    except OSError:
        features = platform.processor()
    macros = subprocess.run([*compiler, "-march=native", "-E", "-dM", "-x", "c++", os.devnull], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60).stdout  # fmt: skip
    return features + "".join(sorted(macros.splitlines(keepends=True)))


def _compiler():
    """The compiler command as a list: ``$CXX`` (which may carry arguments, e.g. ``ccache g++``), else the first of
    c++, g++ and clang++ on the PATH; None without one."""
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    found = _compiler_on_path()
    return [found] if found else None


def _compiler_on_path():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _flags():
    """The compiler flags: ``FLAGS`` and ``$LSTM_JAX_CXXFLAGS`` (e.g. ``-DLSTM_JAX_LANES=16``, the AVX-512 layout)."""
    return [*FLAGS, *shlex.split(os.environ.get("LSTM_JAX_CXXFLAGS", ""))]


def library_path(compiler):
    """Where the build for this source, compiler, flags, jaxlib and CPU lives."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(compiler), version, " ".join(_flags()), jax.__version__,
                     _cpu_signature(compiler)])  # fmt: skip
    cache = Path(os.environ.get("LSTM_JAX_CACHE") or Path.home() / ".cache" / "lstm_jax")
    return cache / f"lstm_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(compiler, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        command = [*compiler, *_flags(), "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
        subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(partial, path)  # atomic: a concurrent process sees the whole library or none


@functools.cache
def load():
    """Build (once) and register the kernel; False, with one warning, where that is impossible."""
    try:
        compiler = _compiler()
        if compiler is None:
            raise FileNotFoundError("no C++ compiler found (set CXX)")
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        handlers = {name: jax.ffi.pycapsule(getattr(library, symbol))
                    for name, symbol in (("forward", "LstmForward"), ("backward", "LstmBackward"))}  # fmt: skip
    except Exception as error:  # whatever stops the build or the load, the scan loops still run
        warnings.warn(
            f"lstm_jax: the CPU LSTM kernel could not be built or loaded ({_first_error(error)}); using the lax.scan "
            "loops instead. Check the C++ compiler ($CXX) or set LSTM_JAX_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    threads = os.environ.get("LSTM_JAX_NUM_THREADS")
    if threads is not None and _c_function(library, "LstmRequestedThreads")() < 1:  # the kernel's own reading of it
        warnings.warn(f"lstm_jax: LSTM_JAX_NUM_THREADS={threads!r} is not a whole number >= 1; the CPU kernel uses "
                      "every usable core", RuntimeWarning, stacklevel=2)  # fmt: skip
    if not _registered:  # XLA keeps the first registration of a name for the life of the process
        for name, handler in handlers.items():
            jax.ffi.register_ffi_target(TARGETS[name], handler, platform="cpu")
        _registered.append(library)
    return True


def _first_error(error: Exception) -> str:
    """The compiler's first line that says ``error`` (its last line is often a caret), else the exception itself."""
    lines = (getattr(error, "stderr", None) or "").strip().splitlines()
    return next((line.strip() for line in lines if "error" in line.lower()), lines[-1].strip() if lines else str(error))


@functools.cache
def bf16_supported():
    """Whether the kernel takes bfloat16 operands here: it was built with AMX, and Linux lets this process use it."""
    return load() and bool(_registered[0].LstmBf16Supported())


def thread_count(hidden_size: int) -> int | None:
    """The threads the kernel runs an LSTM of ``hidden_size`` units on, as the environment stands now:
    ``LSTM_JAX_NUM_THREADS`` where it is a whole number >= 1, else every usable core, and never more than its vectors
    of units. None where the kernel is not loaded."""
    if not load():
        return None
    return int(_c_function(_registered[0], "LstmThreadCount", ctypes.c_int64)(hidden_size))


def _c_function(library, name: str, *argtypes):
    """``library``'s function ``name``, returning an int64, of ``argtypes``."""
    function = getattr(library, name)
    function.restype, function.argtypes = ctypes.c_int64, list(argtypes)
    return function


def _optional(valid_TN, mask_NH):
    """The optional inputs as the kernel takes them: a placeholder and a flag where one is absent."""
    valid = jnp.zeros((1,), bool) if valid_TN is None else valid_TN
    mask = jnp.zeros((1,), jnp.float32) if mask_NH is None else mask_NH
    return (valid, mask), dict(has_valid=int(valid_TN is not None), has_mask=int(mask_NH is not None))


def _registered_targets():
    if not load():
        raise RuntimeError("the CPU LSTM kernel is not available here (see the warning above); lstm_jax.fused runs the "
                           "lax.scan loops instead, so call it rather than lstm_jax.native directly")
    return TARGETS


def forward(reverse, save, w_x, w_h, b, x_TNE, h_NH, c_NH, valid_TN, mask_NH, bf16=False):
    """The forward loop of :func:`lstm_jax.fused._forward`: ``(h_NH, c_NH, acts_TNG, h_TNH, c_TNH)``.

    Without ``save`` (inference) the kernel stores no gate activations nor cell states, and
    ``acts_TNG`` and ``c_TNH`` are None. With ``bf16`` the step's matmul multiplies ``x``, ``h``
    and the weights rounded to bfloat16 (float32 sums); everything else stays float32.
    """
    num_steps, rows, _ = x_TNE.shape
    hidden = h_NH.shape[-1]
    result = (
        varying.result_type((num_steps if save else 0, rows, 4 * hidden), jnp.float32, x_TNE),
        varying.result_type((num_steps, rows, hidden), jnp.float32, x_TNE),
        varying.result_type((num_steps, rows, hidden) if save else (rows, hidden), jnp.float32, x_TNE),
    )
    optional, flags = _optional(valid_TN, mask_NH)
    call = jax.ffi.ffi_call(_registered_targets()["forward"], result, vmap_method="sequential")
    operands = (x_TNE, h_NH, c_NH, w_x, w_h, b, *optional)
    acts_TNG, h_TNH, c = call(*operands, reverse=int(reverse), save=int(save), bf16=int(bf16), **flags)
    last = 0 if reverse else -1
    if not save:
        return h_TNH[last], c, None, h_TNH, None
    return h_TNH[last], c[last], acts_TNG, h_TNH, c


def backward(reverse, w_x, w_h, x_TNE, h0_NH, c0_NH, acts_TNG, h_TNH, c_TNH, dy_TNH, dh_NH, dc_NH, valid_TN, mask_NH,
             weights=True, bf16=False):  # fmt: skip
    """The backward pass of :func:`lstm_jax.fused._lstm_scan_bwd`: ``(dz_TNG, dx_TNE, dw_x, dw_h, dh0_NH, dc0_NH)``.

    The weight gradients are the matmuls over all steps that ``fused`` does after its loop, done here
    with the kernel's own tiles. With ``weights=False`` they are skipped (a third of the FLOPs) and
    ``dw_x`` and ``dw_h`` are zeros. With ``bf16`` every matmul multiplies its operands rounded
    to bfloat16 (``dz``, ``W``, ``x``, ``h``), as the forward pass's did.
    """
    like = lambda a: varying.result_type(a.shape, jnp.float32, x_TNE)
    result = tuple(map(like, (acts_TNG, x_TNE, w_x, w_h, dh_NH, dc_NH)))
    optional, flags = _optional(valid_TN, mask_NH)
    operands = (x_TNE, h0_NH, c0_NH, w_x, w_h, acts_TNG, h_TNH, c_TNH, dy_TNH, dh_NH, dc_NH, *optional)
    # Result 0 (dz) is written over operand 5 (the gate activations it is computed from, step by step): no fresh
    # 4H-wide buffer to fault in. XLA copies the activations first wherever something else still reads them.
    call = jax.ffi.ffi_call(_registered_targets()["backward"], result, vmap_method="sequential",
                             input_output_aliases={5: 0})
    return call(*operands, reverse=int(reverse), weights=int(weights), bf16=int(bf16), **flags)


def precision(*arrays):
    """How the kernel takes these operands: ``"float32"``, ``"bfloat16"`` (all bfloat16, where
    :func:`bf16_supported`), or None where it does not (another dtype, an empty sequence or batch, or
    the kernel disabled or unbuilt)."""
    if not all(a.size > 0 for a in arrays) or not enabled():
        return None
    if all(a.dtype == np.float32 for a in arrays):
        return "float32"
    if all(a.dtype == jnp.bfloat16 for a in arrays) and bf16_supported():
        return "bfloat16"
    return None
