"""Do two independent scans in one jitted program run on two cores at once?

A probe for benchmarks/NOTES.md section 6. If XLA's CPU runtime ran independent
``while`` loops concurrently, a batch split into two halves (or the two directions
of a bidirectional layer) would use both cores. Each recurrence here has the shape
of the benchmark's first CPU shape: one ``[x_t, h] @ W`` GEMM of (B x 384) @ (384 x 1024)
a step, then a ``tanh``.

    python -m benchmarks.concurrent_scans            # prints ms per call and CPU time / wall time

Concurrency would show as "two scans" taking about as long as "one half".
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

EMBED, HIDDEN = 128, 256


def recurrence(x_TBE: jax.Array, w_KG: jax.Array) -> jax.Array:
    def step(h_BH, x_BE):
        h_BH = jnp.tanh((jnp.concatenate([x_BE, h_BH], -1) @ w_KG)[:, :HIDDEN])
        return h_BH, h_BH

    return jax.lax.scan(step, jnp.zeros((x_TBE.shape[1], HIDDEN), x_TBE.dtype), x_TBE)[1]


def time_call(fn, x, repeats: int) -> tuple[float, float]:
    """(wall ms per call, process CPU seconds per wall second)."""
    fn(x).block_until_ready()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn(x).block_until_ready()
    wall = time.perf_counter() - wall
    return 1e3 * wall / repeats, (time.process_time() - cpu) / wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrent_scans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    w_KG = jnp.asarray(rng.normal(0, 0.05, (EMBED + HIDDEN, 4 * HIDDEN)), jnp.float32)
    x_TBE = jnp.asarray(rng.normal(size=(args.steps, args.batch, EMBED)), jnp.float32)
    half = args.batch // 2
    programs = {
        f"one scan, B={args.batch}": jax.jit(lambda x: recurrence(x, w_KG)),
        f"one half, B={half}": jax.jit(lambda x: recurrence(x[:, :half], w_KG)),
        f"two scans, B={half}+{args.batch - half}": jax.jit(
            lambda x: jnp.concatenate([recurrence(x[:, :half], w_KG), recurrence(x[:, half:], w_KG)], 1)
        ),
    }
    for round_index in range(2):
        for name, fn in programs.items():
            ms, cores = time_call(fn, x_TBE, args.repeats)
            print(f"round {round_index}  {name:24s} {ms:8.2f} ms   CPU/wall {cores:.2f}")


if __name__ == "__main__":
    main()
