"""One training step of the same LSTM classifier in every system, timed side by side.

The model: embedding (V=20000), one LSTM layer, a linear head on the last hidden
state, cross-entropy and Adam. Every system gets the same shapes and full-length
sequences. Systems: lstm_jax, Flax linen ``nn.RNN(nn.OptimizedLSTMCell)``, PyTorch
``nn.LSTM`` (when torch is installed: ``pip install -e ".[bench]"``) and, on GPU,
``jax.experimental.rnn.lstm`` (cuDNN).

Rounds interleave the systems, so that drift on a shared machine hits all of them
alike; each number is the median over every timed step of every round, shown with
its interquartile range and the range of the rounds' ratios. A large f32 matmul,
timed in the same rounds, gives the GFLOP/s ceiling. Every system gets its fastest
Adam (PyTorch's fused one where its build has it for the device), and the CPU time
that other processes took during each system's timed blocks is measured from
``/proc/stat`` and reported beside it.

    python -m benchmarks.train_step                      # default shapes for this backend
    python -m benchmarks.train_step --shape 64,128,128,256 --json out.json
    python -m benchmarks.train_step --sst2 ../shared/data/sst2   # also one real SST-2 epoch
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
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
from lstm_jax.parallel import usable_cores, usable_cpus

VOCAB = 20_000
NUM_CLASSES = 2
CPU_SHAPES = ("64,128,128,256", "16,512,128,256", "128,64,300,512")
GPU_SHAPES = CPU_SHAPES + ("256,256,256,512", "128,64,300,1024")
MIN_TIMED_STEPS = 20  # per system: fewer, and a median says little
INTERFERENCE_LIMIT = 0.10  # of a core, taken by other processes while a system was timed
JAX_ADAM = "optax.adam, inside the jitted step"
SST2_MEASURES = "SST-2 epoch, train steps over real batches (tokenisation and bucketing excluded)"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    steps: int
    embed: int
    hidden: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``B,T,E,H`` as four integers > 0; anything else raises ``argparse.ArgumentTypeError`` (a usage error)."""
        try:
            shape = cls(*(int(part) for part in text.split(",")))
        except (TypeError, ValueError):
            shape = None
        if shape is None or min(dataclasses.astuple(shape)) < 1:
            raise argparse.ArgumentTypeError(f"B,T,E,H takes four integers > 0, e.g. 64,128,128,256; got {text!r}")
        return shape

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
    optimizer: str = JAX_ADAM


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
    precision = jnp.dtype(compute_dtype).name
    name = "lstm_jax" if compute_dtype == jnp.float32 else f"lstm_jax {precision}"
    params, logits = lstm_jax_params(shape), lstm_jax_logits(compute_dtype)
    system = _jax_system(name if kernel else f"{name} (lax.scan loops)", params, logits, shape)
    system = system._replace(peer=False, precision=precision)
    if not kernel:
        system = system._replace(train=_without_kernel(system.train), infer=_without_kernel(system.infer))
    return system


def lstm_jax_params(shape: Shape) -> dict:
    k_embed, k_rnn, k_out = jax.random.split(jax.random.key(0), 3)
    return {
        "embed": jax.random.normal(k_embed, (VOCAB, shape.embed)) * 0.1,
        "rnn": lj.init_rnn(k_rnn, lj.LSTM, shape.embed, shape.hidden),
        "out": jax.random.normal(k_out, (shape.hidden, NUM_CLASSES)) * shape.hidden**-0.5,
        "out_bias": jnp.zeros((NUM_CLASSES,)),
    }


def lstm_jax_logits(compute_dtype=jnp.float32):
    """``(params, tokens_BT) -> logits_BC`` of lstm_jax's classifier, its arithmetic in ``compute_dtype``."""

    def logits(params, tokens_BT):
        x_TBE = params["embed"][tokens_BT.T].astype(compute_dtype)  # gathered straight into time-major: no transpose
        rnn_params, out = cast_floating((params["rnn"], params["out"]), compute_dtype)
        _, (carry,) = lj.rnn(lj.LSTM, rnn_params, x_TBE, time_major=True)
        return (carry.h @ out).astype(jnp.float32) + params["out_bias"]

    return logits


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
        "out_bias": jnp.zeros((NUM_CLASSES,)),
    }
    lengths = jnp.full((shape.batch,), shape.steps, jnp.int32)
    zeros = jnp.zeros((1, shape.batch, shape.hidden))

    def logits(params, tokens_BT):
        x_BTE = params["embed"][tokens_BT]
        _, h_n, _ = jrnn.lstm(x_BTE, zeros, zeros, params["rnn"], lengths, shape.embed, shape.hidden, 1, 0.0, False)
        return h_n[0] @ params["out"] + params["out_bias"]

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
    model = torch_classifier(shape, device)
    optimizer, adam = torch_adam(model.parameters(), device)
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
        print(f"note: no '{name}' row: PyTorch cannot run it here ({_first_line(error)})")
        return None
    return System(name, train, infer, precision="bfloat16" if bf16 else "float32", optimizer=adam)


def torch_classifier(shape: Shape, device: str = "cpu"):
    import torch

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

    return Classifier().to(device)


def torch_adam(parameters, device: str):
    """PyTorch's fastest Adam for ``device`` (the maths of ``optax.adam(1e-3)``) and its description: the fused
    kernel where this torch has one for the device (its CPU default loops over the parameters one by one), else
    ``foreach``, with a note."""
    import torch

    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=1e-3, fused=True), "torch.optim.Adam(fused=True)"
    except (RuntimeError, ValueError) as error:
        print(f"note: PyTorch has no fused Adam on {device} here ({_first_line(error)}); using foreach=True")
        return torch.optim.Adam(parameters, lr=1e-3, foreach=True), "torch.optim.Adam(foreach=True)"


def _first_line(error: Exception) -> str:
    return (str(error) or type(error).__name__).splitlines()[0][:120]


def matmul_ceiling(on_gpu: bool) -> tuple[Callable[[], float], dict]:
    """A function giving the GFLOP/s of a large f32 matmul in JAX, and its setup. Each measurement runs ``calls``
    back-to-back calls and blocks once at the end, so that dispatch (tens of microseconds: most of a GPU's time at
    2048³) overlaps the arithmetic; on a GPU the matmul is 8192³, on a CPU 2048³ (about 0.1 s a call already)."""
    size, calls = (8192, 10) if on_gpu else (2048, 2)
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()

    def measure():
        start = time.perf_counter()
        jax.block_until_ready([matmul(a) for _ in range(calls)])
        return calls * 2 * size**3 / (time.perf_counter() - start) / 1e9

    return measure, {"size": size, "calls_per_measurement": calls, "measurements_per_round": 3, "dtype": "float32"}


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


class CpuSample(NamedTuple):
    wall: float
    own: float  # CPU seconds of this process, every thread of it
    busy: float | None  # busy seconds of the cores this process may run on; None without /proc/stat


def busy_cpu_seconds(stat_text: str, cpus: set[int], ticks_per_second: int) -> float:
    """Seconds that ``cpus`` spent busy since boot (user, nice, system, irq, softirq and steal), from ``/proc/stat``."""
    busy = 0
    for line in stat_text.splitlines():
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in (fields + ["0"] * 8)[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / ticks_per_second


def cpu_sample() -> CpuSample:
    try:
        busy = busy_cpu_seconds(Path("/proc/stat").read_text(), usable_cpus(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):  # not Linux: no /proc/stat, or no sysconf
        busy = None
    return CpuSample(time.perf_counter(), time.process_time(), busy)


def others_seconds(before: CpuSample, after: CpuSample) -> float | None:
    """CPU seconds that other processes took on this process's cores between two samples."""
    if before.busy is None or after.busy is None:
        return None
    return (after.busy - before.busy) - (after.own - before.own)


def time_block(fn: Callable[[], None], count: int) -> tuple[list[float], float, float | None]:
    """``time_calls``, with the block's wall time and the CPU seconds other processes took during it."""
    before = cpu_sample()
    times = time_calls(fn, count)
    after = cpu_sample()
    return times, after.wall - before.wall, others_seconds(before, after)


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
    timed = {s.name: {"train": [], "infer": [], "wall": 0.0, "others": 0.0} for s in systems}
    ceilings = []
    for _ in range(rounds):
        ceilings.append([ceiling() for _ in range(3)])
        for system in systems:
            for kind in ("train", "infer"):
                times, wall, others = time_block(getattr(system, kind), steps)
                block = timed[system.name]
                block[kind].append(times)
                block["wall"] += wall
                block["others"] = None if others is None or block["others"] is None else block["others"] + others
    ceiling_gflops = float(np.median(ceilings))
    rows = [_row(shape, system, timed[system.name], ceiling_gflops) for system in systems]
    _compare_with_best_peers(rows, systems)
    best_train, best_infer = _best_peers(rows, systems)["float32"]
    ours = rows[0]
    return {
        "shape": str(shape),
        "ceiling_gflops": ceiling_gflops,
        "ceiling_round_gflops": ceilings,
        "lstm_jax_kernel_threads": lj.native.thread_count(shape.hidden),
        "best_train_peer": best_train["system"],
        "speedup_train": best_train["train_ms"] / ours["train_ms"],
        "speedup_infer": best_infer["infer_ms"] / ours["infer_ms"],
        "interference": _interference(rows),
        "rows": rows,
    }


def _row(shape: Shape, system: System, timed: dict, ceiling_gflops: float) -> dict:
    """One system's numbers: medians over every step of every round, each round's median, and the raw times."""
    tokens = shape.batch * shape.steps
    train = np.concatenate(timed["train"])
    infer = np.concatenate(timed["infer"])
    train_s, infer_s = float(np.median(train)), float(np.median(infer))
    iqr_ms = lambda times: 1e3 * float(np.subtract(*np.percentile(times, [75, 25])))
    return {
        "system": system.name, "precision": system.precision, "optimizer": system.optimizer,
        "train_ms": 1e3 * train_s, "train_tokens_per_s": tokens / train_s,
        "train_gflops": shape.train_flops() / train_s / 1e9,
        "train_fraction_of_ceiling": shape.train_flops() / train_s / 1e9 / ceiling_gflops,
        "infer_ms": 1e3 * infer_s, "infer_tokens_per_s": tokens / infer_s,
        "train_spread_ms": iqr_ms(train), "infer_spread_ms": iqr_ms(infer),
        "train_round_medians_ms": [1e3 * float(np.median(times)) for times in timed["train"]],
        "infer_round_medians_ms": [1e3 * float(np.median(times)) for times in timed["infer"]],
        "train_times_ms": [1e3 * t for t in train.tolist()], "infer_times_ms": [1e3 * t for t in infer.tolist()],
        "other_processes_cores": None if timed["others"] is None else max(0.0, timed["others"] / timed["wall"]),
    }  # fmt: skip


def _best_peers(rows: list[dict], systems: list[System]) -> dict:
    """Per precision that has peers: the rows of its fastest peers in training and in inference."""
    best = {}
    for precision in {system.precision for system in systems}:
        peers = [row for row, system in zip(rows, systems, strict=True) if system.peer and system.precision == precision]
        if peers:
            best[precision] = (min(peers, key=lambda r: r["train_ms"]), min(peers, key=lambda r: r["infer_ms"]))
    return best


def _compare_with_best_peers(rows: list[dict], systems: list[System]) -> None:
    """Each row's ratios against the fastest peer of its precision, or of float32 where its precision has no peer
    (``best_peer_precision`` then says so), with the range of the same ratio round by round."""
    best = _best_peers(rows, systems)
    for row in rows:
        row["best_peer_precision"] = row["precision"] if row["precision"] in best else "float32"
        best_train, best_infer = best[row["best_peer_precision"]]
        row["best_peer"] = best_train["system"]
        row["train_vs_best_peer"] = best_train["train_ms"] / row["train_ms"]
        row["infer_vs_best_peer"] = best_infer["infer_ms"] / row["infer_ms"]
        for kind, peer in (("train", best_train), ("infer", best_infer)):
            ratios = np.divide(peer[f"{kind}_round_medians_ms"], row[f"{kind}_round_medians_ms"])
            row[f"{kind}_vs_best_peer_round_range"] = [float(ratios.min()), float(ratios.max())]


def _interference(rows: list[dict]) -> dict:
    """How much of a core other processes took while each system was timed, and whether that distorts the ratios."""
    cores = {row["system"]: row["other_processes_cores"] for row in rows}
    if None in cores.values():
        return {"measured": False, "note": "no /proc/stat here: other processes' CPU time was not measured"}
    worst = max(cores, key=cores.get)
    return {"measured": True, "per_system_cores": cores, "max_cores": cores[worst], "max_system": worst,
            "limit_cores": INTERFERENCE_LIMIT, "exceeded": cores[worst] > INTERFERENCE_LIMIT}  # fmt: skip


def sst2_epoch(path: str, scan_loops: bool = False, flags: tuple[str, ...] = ()) -> dict:
    """Train-step throughput over one SST-2 epoch's real batches, with the default classifier (its preset applied).

    The batches are built first (tokenisation and bucketing are not timed); every step ends with the host reading
    the loss, as the training loop does.

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
    batches = lj_data.epoch_batches(tokens, labels, batch_size=data_config.batch_size, buckets=buckets["train"], seed=0, epoch=0)
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
                float(metrics["loss"])  # the training loop's per-step sync
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
        "measures": SST2_MEASURES, "host_sync": "float(loss) after every step",
        "cell": model_config.cell, "embed_dim": model_config.embed_dim, "hidden_size": model_config.hidden_size,
        "bidirectional": model_config.bidirectional, "num_layers": model_config.num_layers,
        "steps": len(batches), "seconds": seconds, "compile_seconds": compile_s,
        "real_tokens_per_s": real_tokens / seconds, "padded_tokens_per_s": padded_tokens / seconds,
        "padding_fraction": 1 - real_tokens / padded_tokens,
    }  # fmt: skip
    if scan_loops:
        result["scan_loops_seconds"] = timings["scan_loops"]["seconds"]
        result["scan_loops_compile_seconds"] = timings["scan_loops"]["compile_seconds"]
    return result


REPOSITORY = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def versions() -> dict:
    found = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def thread_counts() -> dict:
    """The thread settings every system ran with (lstm_jax's kernel's, per shape, are in each result)."""
    threads = {"usable_cores": usable_cores(), "os_cpu_count": os.cpu_count()}
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LSTM_JAX_NUM_THREADS", "XLA_FLAGS")
    threads["environment"] = {name: os.environ[name] for name in names if name in os.environ}
    try:
        import torch
    except ImportError:
        return threads
    threads["torch_intra_op"] = torch.get_num_threads()
    threads["torch_inter_op"] = torch.get_num_interop_threads()
    return threads


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


def interference_warning(result: dict) -> str | None:
    """A warning when other processes took more than ``INTERFERENCE_LIMIT`` of a core while a system was timed:
    on a shared CPU they slow PyTorch's step far more than JAX's (10x against 3.5x), so the ratios stop meaning much."""
    interference = result["interference"]
    if not interference["measured"] or not interference["exceeded"]:
        return None
    return (f"warning: at {result['shape']} other processes used {100 * interference['max_cores']:.0f} % of a core "
            f"while '{interference['max_system']}' was timed (limit {100 * INTERFERENCE_LIMIT:.0f} %); ratios are "
            "distorted, rerun on an idle machine")  # fmt: skip


def too_few_steps_warning(steps: int, rounds: int) -> str | None:
    if steps * rounds >= MIN_TIMED_STEPS:
        return None
    return (f"warning: only {steps} steps x {rounds} rounds = {steps * rounds} timed steps per system (fewer than "
            f"{MIN_TIMED_STEPS}): the medians are rough")  # fmt: skip


def ratio_text(row: dict, kind: str, with_rounds: bool = False) -> str:
    """``kind``'s ratio against the best peer, with the rounds' range, and the peer's precision where it differs."""
    text = f"{row[f'{kind}_vs_best_peer']:.2f}x"
    if with_rounds:
        low, high = row[f"{kind}_vs_best_peer_round_range"]
        text += f" ({low:.2f}-{high:.2f})"
    if row["best_peer_precision"] != row["precision"]:
        text += f" vs {row['best_peer_precision']}"
    return text


def others_text(row: dict) -> str:
    cores = row["other_processes_cores"]
    return "n/a" if cores is None else f"{100 * cores:.0f} %"


def print_table(result: dict) -> None:
    load = "/".join(f"{x:.1f}" for x in result["load_average"])
    ceilings = "/".join(f"{float(np.median(c)):.0f}" for c in result["ceiling_round_gflops"])
    print(f"\nshape B,T,E,H = {result['shape']}   matmul ceiling {result['ceiling_gflops']:.0f} GFLOP/s "
          f"(rounds {ceilings})   load average {load}")  # fmt: skip
    header = (f"{'system':32s} {'train ms':>9s} {'IQR':>7s} {'tok/s':>9s} {'vs best (rounds)':>24s} {'GFLOP/s':>8s} "
              f"{'%ceil':>6s} {'infer ms':>9s} {'tok/s':>9s} {'vs best':>16s} {'others':>7s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        print(
            f"{row['system']:32s} {row['train_ms']:9.2f} {row['train_spread_ms']:7.2f} {row['train_tokens_per_s']:9.0f} "
            f"{ratio_text(row, 'train', with_rounds=True):>24s} {row['train_gflops']:8.1f} "
            f"{100 * row['train_fraction_of_ceiling']:5.0f}% {row['infer_ms']:9.2f} {row['infer_tokens_per_s']:9.0f} "
            f"{ratio_text(row, 'infer'):>16s} {others_text(row):>7s}"
        )
    interference = result["interference"]
    if interference["measured"]:
        print(f"other processes used up to {100 * interference['max_cores']:.0f} % of a core while a system was timed "
              f"(column 'others'; the limit is {100 * INTERFERENCE_LIMIT:.0f} %)")  # fmt: skip
    else:
        print(f"note: {interference['note']}")
    for warning in (interference_warning(result), load_warning(result["load_average"], usable_cores())):
        if warning:
            print(warning)


def markdown(report: dict) -> str:
    """The report as the markdown section that ``benchmarks/RESULTS.md`` keeps per machine."""
    heading = f"## {report['machine']} ({report['backend']})"
    dirty = " with uncommitted changes" if report.get("git_dirty") else ""
    settings = report["settings"]
    when = (f"{report['date']}, commit `{report['commit']}`{dirty}, jax {report['jax']}"
            + (f", torch {report['versions']['torch']}" if report["versions"].get("torch") else "")
            + f". Each number is the median of {settings['steps']} steps x {settings['rounds']} interleaved rounds "
            f"after {settings['warmup']} warm-up step{'s' if settings['warmup'] != 1 else ''}.")  # fmt: skip
    if report.get("glibc_tunables"):
        when += f" Every system ran with `GLIBC_TUNABLES={report['glibc_tunables']}`."
    optimizers = sorted({(row["optimizer"], row["system"]) for r in report["results"] for row in r["rows"]})
    adams = "; ".join(f"{name} for {', '.join(s for o, s in optimizers if o == name)}"
                      for name in dict.fromkeys(o for o, _ in optimizers))  # fmt: skip
    when += f" Adam: {adams}."
    setup = report["matmul_ceiling"]
    ceiling = f"float32's ({setup['size']}³, {setup['calls_per_measurement']} back-to-back calls per measurement)"
    if report["backend"] == "gpu":  # where float32 matmuls may run on TF32 tensor cores
        precision = ", ".join(f"`{name}={value}`" for name, value in report.get("matmul_precision", {}).items())
        when += f" Float32 matmul settings: {precision}."
        ceiling = (f"a float32 {setup['size']}³ matmul at JAX's default precision "
                   f"({setup['calls_per_measurement']} back-to-back calls per measurement)")  # fmt: skip
    lines = [heading, "", when + " Ratios are against the fastest peer of the same precision in the same run (> 1: "
             "lstm_jax is faster), in brackets the lowest and highest of the same ratio round by round; a ratio "
             "marked 'vs float32' is a row without a peer of its own precision, against the fastest float32 peer. "
             "Train ms is the median with its interquartile range. 'Others' is the CPU that other processes took on "
             f"this process's cores while the row was timed; the matmul ceiling is {ceiling}.", ""]
    lines += ["| B,T,E,H | system | train ms (IQR) | train tok/s | vs best peer (rounds) | GFLOP/s (% of matmul ceiling) | infer tok/s | vs best peer | others (% of a core) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in report["results"]:
        for row in result["rows"]:
            lines.append(
                f"| {result['shape']} | {row['system']} | {row['train_ms']:.1f} ({row['train_spread_ms']:.1f}) | "
                f"{row['train_tokens_per_s']:.0f} | {ratio_text(row, 'train', with_rounds=True)} | "
                f"{row['train_gflops']:.1f} ({100 * row['train_fraction_of_ceiling']:.0f} %) | "
                f"{row['infer_tokens_per_s']:.0f} | {ratio_text(row, 'infer')} | {others_text(row)} |"
            )
    warnings = [*report.get("warnings", [])]
    for result in report["results"]:
        warnings += [interference_warning(result), load_warning(result["load_average"], report.get("cores", 1))]
    warnings = [w for w in dict.fromkeys(warnings) if w]
    lines += ["", *warnings] if warnings else []
    if "sst2_epoch" in report:
        lines += ["", sst2_text(report["sst2_epoch"])]
    return "\n".join(lines) + "\n"


def sst2_text(e: dict) -> str:
    model = (f"{e['cell']} E={e['embed_dim']}, H={e['hidden_size']}, {e['num_layers']} layer(s)"
             + (", bidirectional" if e["bidirectional"] else ""))  # fmt: skip
    text = (
        f"{e['measures']}, the default classifier with the dataset's preset ({model}), the host reading the loss "
        f"after every step as the training loop does: {e['steps']} steps in {e['seconds']:.1f} s plus "
        f"{e['compile_seconds']:.0f} s compiling, {e['real_tokens_per_s']:.0f} real tokens/s "
        f"({100 * e['padding_fraction']:.0f} % padding)."
    )
    if "scan_loops_seconds" in e:
        text += (
            f" The same steps with the lax.scan loops instead of the CPU kernel, interleaved with them: "
            f"{e['scan_loops_seconds']:.1f} s ({e['scan_loops_seconds'] / e['seconds']:.2f}x the kernel's time)."
        )
    return text


def writable_json_path(text: str) -> Path:
    """``--json``'s file, checked before any timing: its folder must exist and be writable."""
    path = Path(text)
    folder = path.resolve().parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a folder")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {folder} is not a writable folder")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", action="append", type=Shape.parse,
                        help="B,T,E,H, four integers > 0 (repeatable); default: the shapes for this backend")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per system per round (the median is over all rounds)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the systems")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system after compiling")
    parser.add_argument("--json", type=writable_json_path, help="write every number to this file")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time lstm_jax with bfloat16 compute and float32 master weights, and PyTorch under "
                        "bfloat16 autocast (default: on GPU, and on CPU where lstm_jax's kernel multiplies in bfloat16)")
    parser.add_argument("--scan-loops", action=argparse.BooleanOptionalAction, default=None,
                        help="also time lstm_jax with its lax.scan loops instead of the CPU kernel of lstm_jax.native "
                        "(default: on CPU where the kernel builds)")
    parser.add_argument(
        "--sst2", help="also time the train steps of one epoch of the sentiment experiment on this dataset (path or Hub id)"
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
    shapes = args.shape or [Shape.parse(s) for s in (GPU_SHAPES if on_gpu else CPU_SHAPES)]
    ceiling, ceiling_setup = matmul_ceiling(on_gpu)
    warnings = [w for w in (too_few_steps_warning(args.steps, args.rounds),) if w]
    settings = {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                "timed_steps_per_system": args.steps * args.rounds, "order": "systems interleaved within each round",
                "warmup_note": "after compiling, every system runs --warmup untimed train and infer steps"}
    report = {"machine": machine_description(), "backend": jax.default_backend(), "commit": git_commit(),
              "git_dirty": git_dirty(), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "versions": versions(), "cores": usable_cores(), "threads": thread_counts(), "settings": settings,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "matmul_precision": matmul_precision(),
              "matmul_ceiling": ceiling_setup, "warnings": warnings, "results": []}  # fmt: skip
    print(f"{report['machine']}  jax {jax.__version__}  commit {report['commit']}"
          + (" (uncommitted changes)" if report["git_dirty"] else "")
          + (f"  GLIBC_TUNABLES={report['glibc_tunables']}" if report["glibc_tunables"] else ""))  # fmt: skip
    for warning in warnings:
        print(warning)
    scan_loops = (not on_gpu and lj.native.enabled()) if args.scan_loops is None else args.scan_loops
    for shape in shapes:
        load_before = os.getloadavg()[0]
        options = {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "on_gpu": on_gpu,
                   "bf16": (on_gpu or lj.native.bf16_supported()) if args.bf16 is None else args.bf16,
                   "scan_loops": scan_loops}
        result = bench_shape(shape, ceiling=ceiling, **options)
        result["load_average"] = [load_before, os.getloadavg()[0]]  # other work on a shared machine skews times
        print_table(result)
        report["results"].append(result)
        if args.json:  # after every shape, so that a long run leaves partial results
            args.json.write_text(json.dumps(report, indent=2))
    if args.sst2:
        report["sst2_epoch"] = sst2_epoch(args.sst2, scan_loops=scan_loops)
        print("\n" + sst2_text(report["sst2_epoch"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("\n" + markdown(report))


if __name__ == "__main__":
    main()
