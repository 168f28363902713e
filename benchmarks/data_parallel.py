"""Step time of the sentiment classifier's training step on a 1-device and an N-device mesh.

    python -m benchmarks.data_parallel                 # CPU: forces 4 host devices
    python -m benchmarks.data_parallel --devices 8     # on a machine with 8 accelerators

On CPU the N "devices" are forced host devices (``--xla_force_host_platform_device_count``)
that share the same cores, so N devices cannot be faster than one here. The number
shows the cost of partitioning the step (the gradient all-reduce and the extra
programs), not a speed-up.
"""

import argparse
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4, help="devices of the larger mesh (forced on CPU)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="sequence length of the batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per mesh per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("run this as its own process: the device count is fixed when JAX starts")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import jax
    import numpy as np

    from lstm_jax import parallel
    from lstm_jax.data import Batch
    from lstm_jax.model import ModelConfig, init_classifier
    from lstm_jax.optim import OptimConfig, make_optimizer
    from lstm_jax.train import classifier_loss, init_train_state, make_train_step

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"{len(jax.devices())} devices visible, {args.devices} asked for")
    config, optimizer = ModelConfig(), make_optimizer(OptimConfig(), 1000)
    rng = np.random.default_rng(0)
    batch = Batch(
        rng.integers(2, 20000, (args.batch, args.steps)).astype(np.int32),
        np.full(args.batch, args.steps, np.int32),
        rng.integers(0, 2, args.batch).astype(np.int32),
        np.ones(args.batch, np.float32),
    )

    def prepared(mesh):
        state = init_train_state(init_classifier(jax.random.key(0), config, 20000, 2), optimizer, 0, ema=True)
        shardings = parallel.state_sharding(state, mesh)
        step = make_train_step(
            lambda p, b, k: classifier_loss(p, config, b, k), optimizer, ema_decay=0.999,
            state_sharding=shardings, batch_sharding=parallel.batch_sharding(mesh),
        )  # fmt: skip
        holder = {"state": jax.device_put(state, shardings)}
        placed = parallel.put_batch(batch, mesh)

        def run():
            holder["state"], metrics = step(holder["state"], placed)
            jax.block_until_ready(metrics["loss"])

        run()
        return run

    meshes = {
        1: parallel.make_mesh("", jax.devices()[:1]),
        args.devices: parallel.make_mesh("", jax.devices()[: args.devices]),
    }
    runs = {n: prepared(mesh) for n, mesh in meshes.items()}
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for n, run in runs.items():
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times[n].append(time.perf_counter() - start)
    device = jax.devices()[0]
    print(
        f"{device.platform} ({device.device_kind}), batch {args.batch} x {args.steps} tokens, default classifier, load average {os.getloadavg()[0]:.1f}"
    )
    base = float(np.median(times[1]))
    for n, ts in times.items():
        median = float(np.median(ts))
        print(f"mesh data={n}: {1e3 * median:8.1f} ms/step  ({base / median:.2f}x the 1-device step)")


if __name__ == "__main__":
    main()
