"""One training step of the same LSTM classifier in every system, timed side by side.

The model: embedding (V=20000), one LSTM layer, a linear head on the last hidden
state, cross-entropy and Adam. Every system gets the same shapes and full-length
sequences. Systems: lstm_jax, Flax linen ``nn.RNN(nn.OptimizedLSTMCell)``, PyTorch
``nn.LSTM`` (when torch is installed: ``pip install -e ".[bench]"``) and, on GPU,
``jax.experimental.rnn.lstm`` (cuDNN).

Rounds interleave the systems, so that drift on a shared machine hits all of them
alike; each number is the median over every timed step of every round. A large
f32 matmul, timed in the same rounds, gives the GFLOP/s ceiling.

    python -m benchmarks.train_step                      # default shapes for this backend
    python -m benchmarks.train_step --shape 64,128,128,256 --json out.json
    python -m benchmarks.train_step --sst2 ../shared/data/sst2   # also one real SST-2 epoch
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lstm_jax as lj
from experiments.allocator import has_malloc_tunables, rerun_keeping_freed_memory
from lstm_jax.model import cast_floating
from lstm_jax.parallel import usable_cores

VOCAB = 20_000
NUM_CLASSES = 2
CPU_SHAPES = ("64,128,128,256", "16,512,128,256", "128,64,300,512")
GPU_SHAPES = CPU_SHAPES + ("256,256,256,512", "128,64,300,1024")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    steps: int
    embed: int
    hidden: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            return cls(*(int(part) for part in text.split(",")))
        except (TypeError, ValueError):
            raise SystemExit(f"--shape takes B,T,E,H as four integers, e.g. 64,128,128,256; got {text!r}") from None

    def __str__(self):
        return f"{self.batch},{self.steps},{self.embed},{self.hidden}"

    def forward_flops(self) -> int:
        """Matmul FLOPs of one forward pass (the input projection, the recurrence and the head)."""
        gates = 4 * self.hidden
        return 2 * self.batch * (self.steps * (self.embed + self.hidden) * gates + self.hidden * NUM_CLASSES)

    def train_flops(self) -> int:
        """Forward plus backward: the backward pass costs two forward passes of matmuls."""
        return 3 * self.forward_flops()


class System(NamedTuple):
    """A prepared model in one framework: ``train()`` runs one step, ``infer()`` a forward pass; both block."""

    name: str
    train: Callable[[], None]
    infer: Callable[[], None]
    peer: bool = True  # False for lstm_jax's own rows: they are never the peer that ratios are taken against
    precision: str = "float32"  # of the model's arithmetic; a row's ratios are against peers of its own precision


def random_batch(shape: Shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (shape.batch, shape.steps), dtype=np.int32)
    labels = rng.integers(0, NUM_CLASSES, (shape.batch,), dtype=np.int32)
    return tokens, labels


def _jax_system(name, params, logits_fn, shape):
    """Adam on ``logits_fn(params, tokens_BT)`` with a jitted, buffer-donating step."""
    optimizer = optax.adam(1e-3)
    tokens, labels = (jnp.asarray(a) for a in random_batch(shape))

    def loss_fn(params):
        logits = logits_fn(params, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def forward(params):
        return logits_fn(params, tokens)

    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = {"params": params, "opt": optimizer.init(params)}

    def train():
        state["params"], state["opt"], loss = step(state["params"], state["opt"])
        loss.block_until_ready()

    return System(name, train, lambda: forward(state["params"]).block_until_ready())


def lstm_jax_system(shape: Shape, compute_dtype=jnp.float32, kernel=True) -> System:
    """lstm_jax's step; with a ``compute_dtype`` of bfloat16, mixed precision (float32 parameters, Adam and loss).

    ``kernel=False`` traces it with the ``lax.scan`` loops instead of the CPU kernel of ``lstm_jax.native``.
    """
    k_embed, k_rnn, k_out = jax.random.split(jax.random.key(0), 3)
    params = {
        "embed": jax.random.normal(k_embed, (VOCAB, shape.embed)) * 0.1,
        "rnn": lj.init_rnn(k_rnn, lj.LSTM, shape.embed, shape.hidden),
        "out": jax.random.normal(k_out, (shape.hidden, NUM_CLASSES)) * shape.hidden**-0.5,
    }

    def logits(params, tokens_BT):
        x_TBE = params["embed"][tokens_BT.T].astype(compute_dtype)  # gathered straight into time-major: no transpose
        rnn_params, out = cast_floating((params["rnn"], params["out"]), compute_dtype)
        _, (carry,) = lj.rnn(lj.LSTM, rnn_params, x_TBE, time_major=True)
        return (carry.h @ out).astype(jnp.float32)

    precision = jnp.dtype(compute_dtype).name
    name = "lstm_jax" if compute_dtype == jnp.float32 else f"lstm_jax {precision}"
    system = _jax_system(name if kernel else f"{name} (lax.scan loops)", params, logits, shape)
    system = system._replace(peer=False, precision=precision)
    if not kernel:
        system = system._replace(train=_without_kernel(system.train), infer=_without_kernel(system.infer))
    return system


def _without_kernel(call):
    def traced_with_scan_loops():
        with lj.native.disabled():  # only the first call traces; the later ones just run
            call()

    return traced_with_scan_loops


def flax_system(shape: Shape) -> System:
    import flax.linen as nn

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, tokens_BT):
            x_BTE = nn.Embed(VOCAB, shape.embed)(tokens_BT)
            (_, h_BH), _ = nn.RNN(nn.OptimizedLSTMCell(shape.hidden), return_carry=True)(x_BTE)
            return nn.Dense(NUM_CLASSES)(h_BH)

    model = Classifier()
    tokens, _ = random_batch(shape)
    params = model.init(jax.random.key(0), jnp.asarray(tokens))
    return _jax_system("flax OptimizedLSTMCell", params, model.apply, shape)


def cudnn_jax_system(shape: Shape) -> System | None:
    """``jax.experimental.rnn.lstm``: JAX's cuDNN binding (GPU only); None, with a note, where this jax lacks it."""
    try:
        from jax.experimental import rnn as jrnn
    except ImportError as error:
        print(f"note: no 'jax.experimental.rnn (cuDNN)' row: this jax {jax.__version__} has no such module ({error})")
        return None

    k_embed, k_rnn, k_out = jax.random.split(jax.random.key(0), 3)
    weights = jrnn.init_lstm_weight(k_rnn, shape.embed, shape.hidden, 1, False)
    params = {
        "embed": jax.random.normal(k_embed, (VOCAB, shape.embed)) * 0.1,
        "rnn": weights,
        "out": jax.random.normal(k_out, (shape.hidden, NUM_CLASSES)) * shape.hidden**-0.5,
    }
    lengths = jnp.full((shape.batch,), shape.steps, jnp.int32)
    zeros = jnp.zeros((1, shape.batch, shape.hidden))

    def logits(params, tokens_BT):
        x_BTE = params["embed"][tokens_BT]
        _, h_n, _ = jrnn.lstm(x_BTE, zeros, zeros, params["rnn"], lengths, shape.embed, shape.hidden, 1, 0.0, False)
        return h_n[0] @ params["out"]

    return _jax_system("jax.experimental.rnn (cuDNN)", params, logits, shape)


def torch_system(shape: Shape, bf16: bool = False, on_gpu: bool = False) -> System | None:
    """PyTorch's step, on the GPU where JAX's systems run on one (``on_gpu``), else on the CPU; with ``bf16``, under
    ``torch.autocast`` to bfloat16 (float32 parameters, Adam and loss): on a CPU with AMX, oneDNN then runs the LSTM
    in bfloat16. None, with a note, where torch is missing or cannot run that configuration here."""
    try:
        import torch
    except ImportError:
        return None
    if on_gpu and not torch.cuda.is_available():
        print("note: no PyTorch row: this torch has no CUDA, and the other systems run on the GPU")
        return None
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, shape.embed)
            self.lstm = torch.nn.LSTM(shape.embed, shape.hidden, batch_first=True)
            self.out = torch.nn.Linear(shape.hidden, NUM_CLASSES)

        def forward(self, tokens_BT):
            _, (h_n, _) = self.lstm(self.embed(tokens_BT))
            return self.out(h_n[0])

    model = Classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens, labels = (torch.as_tensor(a, dtype=torch.long, device=device) for a in random_batch(shape))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        sync()

    def infer():
        with torch.inference_mode(), autocast():
            model(tokens)
        sync()

    name = f"torch nn.LSTM ({'cuDNN' if device == 'cuda' else 'CPU'})" + (" bfloat16 autocast" if bf16 else "")
    try:
        infer()
    except RuntimeError as error:  # e.g. oneDNN has no bfloat16 LSTM on a CPU without AVX-512 BF16 or AMX
        print(f"note: no '{name}' row: PyTorch cannot run it here ({(str(error) or type(error).__name__).splitlines()[0][:120]})")
        return None
    return System(name, train, infer, precision="bfloat16" if bf16 else "float32")


def matmul_ceiling() -> Callable[[], float]:
    """A timed 2048^3 f32 matmul in JAX; returns a function giving GFLOP/s of one run."""
    size = 2048
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()

    def measure():
        start = time.perf_counter()
        matmul(a).block_until_ready()
        return 2 * size**3 / (time.perf_counter() - start) / 1e9

    return measure


def matmul_precision() -> dict:
    """What each framework's float32 matmuls may round to. On NVIDIA GPUs since Ampere, JAX's default (None) lets
    XLA use TF32 tensor cores, PyTorch's plain matmuls stay float32 unless ``allow_tf32`` is set, and its cuDNN calls
    (the LSTM among them) may use TF32 while ``cudnn.allow_tf32`` is True, its default. On CPUs all are float32."""
    precision = {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision}
    try:
        import torch
    except ImportError:
        return precision
    precision["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    precision["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return precision


def time_calls(fn: Callable[[], None], count: int) -> list[float]:
    """Wall times of ``count`` calls, with Python's cyclic garbage collector paused as ``timeit`` pauses it.

    Otherwise a collection of the whole heap (every object JAX, Flax and PyTorch have created) lands in
    whichever system's step happens to trigger it.
    """
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    finally:
        if collecting:
            gc.enable()


def build_systems(shape: Shape, on_gpu: bool, bf16: bool = False, scan_loops: bool = False) -> list[System]:
    systems = [
        lstm_jax_system(shape),
        *([lstm_jax_system(shape, jnp.bfloat16)] if bf16 else []),
        *([lstm_jax_system(shape, kernel=False)] if scan_loops else []),
        flax_system(shape),
    ]
    peers = (
        cudnn_jax_system(shape) if on_gpu else None,
        torch_system(shape, on_gpu=on_gpu),
        torch_system(shape, bf16=True, on_gpu=on_gpu) if bf16 else None,
    )
    for peer in peers:
        if peer is not None:
            systems.append(peer)
    return systems


def bench_shape(
    shape: Shape, *, steps: int, rounds: int, warmup: int, on_gpu: bool, ceiling, bf16: bool = False, scan_loops=False
) -> dict:
    systems = build_systems(shape, on_gpu, bf16, scan_loops)
    for system in systems:
        for _ in range(warmup):
            system.train()
            system.infer()
    train_times = {s.name: [] for s in systems}
    infer_times = {s.name: [] for s in systems}
    ceilings = []
    for _ in range(rounds):
        ceilings += [ceiling() for _ in range(3)]
        for system in systems:
            train_times[system.name] += time_calls(system.train, steps)
            infer_times[system.name] += time_calls(system.infer, steps)
    ceiling_gflops = float(np.median(ceilings))
    rows = []
    for system in systems:
        train_s = float(np.median(train_times[system.name]))
        infer_s = float(np.median(infer_times[system.name]))
        rows.append({
            "system": system.name,
            "train_ms": 1e3 * train_s,
            "train_tokens_per_s": shape.batch * shape.steps / train_s,
            "train_gflops": shape.train_flops() / train_s / 1e9,
            "infer_ms": 1e3 * infer_s,
            "infer_tokens_per_s": shape.batch * shape.steps / infer_s,
            "train_spread_ms": 1e3 * float(np.subtract(*np.percentile(train_times[system.name], [75, 25]))),
        })  # fmt: skip
    ours = rows[0]
    for row, system in zip(rows, systems, strict=True):
        row["precision"] = system.precision
    best = {}  # per precision: the fastest peers; rows of a precision without peers compare with float32's
    for precision in {system.precision for system in systems}:
        peers = [row for row, system in zip(rows, systems, strict=True) if system.peer and system.precision == precision]
        if peers:
            best[precision] = (min(peers, key=lambda r: r["train_ms"]), min(peers, key=lambda r: r["infer_ms"]))
    for row in rows:
        best_train, best_infer = best.get(row["precision"], best["float32"])
        row["best_peer"] = best_train["system"]
        row["train_vs_best_peer"] = best_train["train_ms"] / row["train_ms"]
        row["infer_vs_best_peer"] = best_infer["infer_ms"] / row["infer_ms"]
        row["train_fraction_of_ceiling"] = row["train_gflops"] / ceiling_gflops
    best_train, best_infer = best["float32"]
    return {
        "shape": str(shape),
        "ceiling_gflops": ceiling_gflops,
        "best_train_peer": best_train["system"],
        "speedup_train": best_train["train_ms"] / ours["train_ms"],
        "speedup_infer": best_infer["infer_ms"] / ours["infer_ms"],
        "rows": rows,
    }


def sst2_epoch(path: str, scan_loops: bool = False, flags: tuple[str, ...] = ()) -> dict:
    """Training throughput of one SST-2 epoch through the real pipeline and the default classifier (its preset applied).

    With ``scan_loops``, the same epoch also runs through a second train step traced with the ``lax.scan`` loops
    instead of the CPU kernel, from the same start, interleaved with the first in blocks of 64 steps so that the
    machine's drift hits both alike. ``flags`` are further flags of the sentiment experiment.
    """
    import tempfile

    from experiments import sentiment
    from lstm_jax import data as lj_data
    from lstm_jax.model import init_classifier
    from lstm_jax.optim import make_optimizer
    from lstm_jax.train import classifier_loss, init_train_state, make_train_step

    with tempfile.TemporaryDirectory() as workdir:
        configs, _ = sentiment.parse_train_args(["--dataset", path, "--workdir", workdir, *flags])
        data_config, model_config, optim_config, loop_config = (
            configs[name] for name in ("DataConfig", "ModelConfig", "OptimConfig", "LoopConfig")
        )
        splits, tokenizer, encoded, buckets = sentiment.load_data(data_config, Path(workdir), seed=0)
    tokens, labels = encoded["train"]
    batches = lj_data.epoch_batches(tokens, labels, batch_size=data_config.batch_size, buckets=buckets, seed=0, epoch=0)
    optimizer = make_optimizer(optim_config, loop_config.epochs * len(batches), ensemble=model_config.ensemble)
    params = init_classifier(jax.random.key(0), model_config, tokenizer.get_vocab_size(), splits.num_classes)

    def runner(trace_context, timing):
        """A train step from ``params``, compiled for every bucket (inside ``trace_context``) before any timing;
        it returns a function that runs a block of batches and adds its time to ``timing["seconds"]``."""
        step = make_train_step(
            lambda p, batch, key: classifier_loss(p, model_config, batch, key), optimizer, ema_decay=optim_config.ema_decay
        )
        own_params = jax.tree.map(jnp.copy, params)  # the step donates its state's buffers
        state = [init_train_state(own_params, optimizer, 0, ema=optim_config.ema_decay > 0)]

        def run(block):
            start = time.perf_counter()
            for batch in block:
                state[0], metrics = step(state[0], batch)
            jax.block_until_ready(metrics)
            return time.perf_counter() - start

        with trace_context:
            timing["compile_seconds"] = run([next(b for b in batches if b.tokens_BT.shape[1] == n) for n in lengths])

        def timed(block):
            timing["seconds"] += run(block)

        return timed

    lengths = sorted({b.tokens_BT.shape[1] for b in batches})
    timings = {"kernel": {"seconds": 0.0}, **({"scan_loops": {"seconds": 0.0}} if scan_loops else {})}
    contexts = {"kernel": contextlib.nullcontext(), "scan_loops": lj.native.disabled()}
    runs = [runner(contexts[name], timing) for name, timing in timings.items()]
    for first in range(0, len(batches), 64):
        for run in runs:
            run(batches[first : first + 64])
    real_tokens = int(sum(int(b.lengths_B.sum()) for b in batches))
    padded_tokens = int(sum(b.tokens_BT.size for b in batches))
    seconds, compile_s = timings["kernel"]["seconds"], timings["kernel"]["compile_seconds"]
    result = {
        "steps": len(batches), "seconds": seconds, "compile_seconds": compile_s,
        "real_tokens_per_s": real_tokens / seconds, "padded_tokens_per_s": padded_tokens / seconds,
        "padding_fraction": 1 - real_tokens / padded_tokens,
    }  # fmt: skip
    if scan_loops:
        result["scan_loops_seconds"] = timings["scan_loops"]["seconds"]
        result["scan_loops_compile_seconds"] = timings["scan_loops"]["compile_seconds"]
    return result


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_description() -> str:
    device = jax.devices()[0]
    if device.platform == "gpu":
        return device.device_kind
    return f"{platform.processor() or platform.machine()} CPU, {usable_cores()} cores"


def load_warning(load_average: list[float], cores: int) -> str | None:
    """A warning when other work kept the cores busy while timing. The benchmark's own threads add about ``cores``
    to the load average, so the threshold is 1.5 x ``cores``. Under load PyTorch's CPU threads slow down far more
    than XLA's (33-105x against 2.6-4x at a load of 6-9 on 2 cores, H = 256; ``RESULTS.md``, loaded table), so the
    ratios stop meaning much."""
    busiest = max(load_average)
    if busiest <= 1.5 * cores:
        return None
    return (f"warning: load average up to {busiest:.1f} on {cores} cores while timing; ratios against PyTorch are "
            "distorted under load, rerun on an idle machine")  # fmt: skip


def print_table(result: dict) -> None:
    load = "/".join(f"{x:.1f}" for x in result["load_average"])
    print(
        f"\nshape B,T,E,H = {result['shape']}   matmul ceiling {result['ceiling_gflops']:.0f} GFLOP/s   load average {load}"
    )
    header = f"{'system':32s} {'train ms':>9s} {'tok/s':>9s} {'vs best':>8s} {'GFLOP/s':>8s} {'%ceil':>6s} {'infer ms':>9s} {'tok/s':>9s} {'vs best':>8s}"
    print(header)
    print("-" * len(header))
    warning = load_warning(result["load_average"], usable_cores())
    for row in result["rows"]:
        print(
            f"{row['system']:32s} {row['train_ms']:9.2f} {row['train_tokens_per_s']:9.0f} {row['train_vs_best_peer']:7.2f}x "
            f"{row['train_gflops']:8.1f} {100 * row['train_fraction_of_ceiling']:5.0f}% {row['infer_ms']:9.2f} "
            f"{row['infer_tokens_per_s']:9.0f} {row['infer_vs_best_peer']:7.2f}x"
        )
    if warning:
        print(warning)


def markdown(report: dict) -> str:
    """The report as the markdown section that ``benchmarks/RESULTS.md`` keeps per machine."""
    heading = f"## {report['machine']} ({report['backend']})"
    when = f"{report['date']}, commit `{report['commit']}`, jax {report['jax']}."
    if report.get("glibc_tunables"):
        when += f" Every system ran with `GLIBC_TUNABLES={report['glibc_tunables']}`."
    ceiling = "float32's"
    if report["backend"] == "gpu":  # where float32 matmuls may run on TF32 tensor cores
        settings = ", ".join(f"`{name}={value}`" for name, value in report.get("matmul_precision", {}).items())
        when += f" Float32 matmul settings: {settings}."
        ceiling = "a float32 2048³ matmul at JAX's default precision"
    lines = [heading, "", when + " Ratios are against the fastest peer of the same precision in the same run (> 1: "
             f"lstm_jax is faster); the matmul ceiling is {ceiling}.", ""]
    lines += ["| B,T,E,H | system | train ms | train tok/s | vs best peer | GFLOP/s (% of matmul ceiling) | infer tok/s | vs best peer | load avg |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in report["results"]:
        load = "/".join(f"{x:.1f}" for x in result["load_average"])
        for row in result["rows"]:
            lines.append(
                f"| {result['shape']} | {row['system']} | {row['train_ms']:.1f} | {row['train_tokens_per_s']:.0f} | "
                f"{row['train_vs_best_peer']:.2f}x | {row['train_gflops']:.1f} ({100 * row['train_fraction_of_ceiling']:.0f} %) | "
                f"{row['infer_tokens_per_s']:.0f} | {row['infer_vs_best_peer']:.2f}x | {load} |"
            )
    warnings = {load_warning(result["load_average"], report.get("cores", 1)) for result in report["results"]} - {None}
    lines += ["", *sorted(warnings)] if warnings else []
    if "sst2_epoch" in report:
        e = report["sst2_epoch"]
        epoch = (
            f"One SST-2 epoch through the real pipeline (default classifier with the dataset's preset, E=300, H=256): "
            f"{e['steps']} steps in {e['seconds']:.0f} s plus {e['compile_seconds']:.0f} s compiling, "
            f"{e['real_tokens_per_s']:.0f} real tokens/s ({100 * e['padding_fraction']:.0f} % padding)."
        )
        if "scan_loops_seconds" in e:
            epoch += (
                f" The same epoch with the lax.scan loops instead of the CPU kernel, interleaved with it: "
                f"{e['scan_loops_seconds']:.0f} s ({e['scan_loops_seconds'] / e['seconds']:.2f}x the kernel's time)."
            )
        lines += ["", epoch]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", action="append", help="B,T,E,H (repeatable); default: the shapes for this backend")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per system per round (the median is over all rounds)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the systems")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system after compiling")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time lstm_jax with bfloat16 compute and float32 master weights, and PyTorch under "
                        "bfloat16 autocast (default: on GPU, and on CPU where lstm_jax's kernel multiplies in bfloat16)")
    parser.add_argument("--scan-loops", action=argparse.BooleanOptionalAction, default=None,
                        help="also time lstm_jax with its lax.scan loops instead of the CPU kernel of lstm_jax.native "
                        "(default: on CPU where the kernel builds)")
    parser.add_argument(
        "--sst2", help="also time one epoch of the sentiment experiment on this dataset (path or Hub id)"
    )
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="restart first with glibc's malloc keeping freed memory, as experiments.sentiment does "
                        "(experiments/allocator.py); it applies to every system in the process")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("steps", "rounds", "warmup"):  # a warm-up of 0 would time JAX's compile
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.keep_freed_memory:
        if argv is not None:
            parser.error("--keep-freed-memory restarts the process: pass it on the command line")
        rerun_keeping_freed_memory()
        if not has_malloc_tunables(os.environ):  # no restart: not glibc, or opted out
            print("note: --keep-freed-memory needs glibc and no LSTM_JAX_KEEP_FREED_MEMORY=0; default malloc here")
    on_gpu = jax.default_backend() == "gpu"
    shapes = [Shape.parse(s) for s in (args.shape or (GPU_SHAPES if on_gpu else CPU_SHAPES))]
    ceiling = matmul_ceiling()
    report = {"machine": machine_description(), "backend": jax.default_backend(), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "cores": usable_cores(),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "matmul_precision": matmul_precision(),
              "results": []}  # fmt: skip
    print(f"{report['machine']}  jax {jax.__version__}  commit {report['commit']}"
          + (f"  GLIBC_TUNABLES={report['glibc_tunables']}" if report["glibc_tunables"] else ""))  # fmt: skip
    scan_loops = (not on_gpu and lj.native.enabled()) if args.scan_loops is None else args.scan_loops
    for shape in shapes:
        load_before = os.getloadavg()[0]
        options = {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "on_gpu": on_gpu,
                   "bf16": (on_gpu or lj.native.bf16_supported()) if args.bf16 is None else args.bf16,
                   "scan_loops": scan_loops}
        result = bench_shape(shape, ceiling=ceiling, **options)
        result["load_average"] = [
            load_before,
            os.getloadavg()[0],
        ]  # other work on a shared machine skews absolute times
        print_table(result)
        report["results"].append(result)
        if args.json:  # after every shape, so that a long run leaves partial results
            Path(args.json).write_text(json.dumps(report, indent=2))
    if args.sst2:
        report["sst2_epoch"] = sst2_epoch(args.sst2, scan_loops=scan_loops)
        e = report["sst2_epoch"]
        print(f"\nSST-2 epoch: {e['steps']} steps in {e['seconds']:.1f} s (+{e['compile_seconds']:.1f} s compile), "
              f"{e['real_tokens_per_s']:.0f} real tokens/s, {100 * e['padding_fraction']:.0f}% padding")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("\n" + markdown(report))


if __name__ == "__main__":
    main()
