"""Multi-worker scaling: 2 local worker processes vs 1, at the same global batch.

Usage: python benchmarks/multi_worker.py [--preset cpu-demo] [--set key=value ...]
       [--steps 40] [--warmup 3] [--rounds 2] [--smoke]

Both read a `prepare` cache of synthetic samples. One worker: a single process (the default
strategy) with every core (TF_NUM_INTRAOP_THREADS = the machine's cores). Two workers: two
processes on this machine, MultiWorkerMirroredStrategy over 127.0.0.1 (free ports picked at
run time), the cores split between them, each with half of every global batch. Each process
times `Trainer.train_step` (the compiled step plus a read of its loss) after warm-up steps;
the chief's median is the two workers' step time (every step waits for both). The two set-ups
alternate for `--rounds` rounds and the best round of each counts (on a shared machine, load
only ever adds time). Printed:

  speedup             one worker's step time / two workers' step time
  scaling efficiency  speedup / 2 (1.0: two workers take half the time per global batch)
  overhead per step   two workers' step time - one worker's / 2: the collectives (gradient
                      all-reduce, key all-gather, loss reductions) and everything else a
                      perfect split would not cost

On one machine the two workers share its cores and memory bandwidth, so this measures the
collective overhead of the multi-worker path more than what real machines would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(args) -> None:
    """One process of a measurement: trains `args.steps` timed steps, writes its timings."""
    from cmc_kit import data, training
    from cmc_kit.config import preset
    from cmc_kit.training import cluster

    # First, before anything runs in TensorFlow (a multi-worker strategy must be).
    strategy = training.select_strategy("auto", collective_timeout=600)
    config = preset(args.preset).with_overrides(args.set or [])
    catalog = data.discover(args.data)
    run_dir = Path(tempfile.mkdtemp(prefix="cmc-kit-bench-"))
    trainer = training.Trainer(config, run_dir, catalog, verbose=0, strategy=strategy)
    trainer.fill_queues()
    seconds, epoch = [], 0
    while len(seconds) < args.warmup + args.steps:  # same steps on every worker
        batches = cluster.distribute_batches(strategy, trainer.dataset(epoch),
                                             trainer.global_batch, trainer.workers)
        for batch in batches:
            started = time.perf_counter()
            float(trainer.train_step(batch)["loss"].numpy())  # waits for the step
            seconds.append(time.perf_counter() - started)
            if len(seconds) == args.warmup + args.steps:
                break
        epoch += 1
    timed = seconds[args.warmup:]
    Path(args.worker).write_text(json.dumps({
        "median_s": statistics.median(timed), "mean_s": statistics.mean(timed),
        "replicas": trainer.replicas, "global_batch": trainer.global_batch,
        "worker": trainer.workers.index, "workers": trainer.workers.count}))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args, data: Path, out: Path, workers: int, threads: int) -> list[dict]:
    """`workers` processes of `measure` (a cluster on 127.0.0.1 if more than one)."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes, reports = [], [out / f"w{workers}-{i}.json" for i in range(workers)]
    for index in range(workers):
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS=str(max(2, threads)))
        env.pop("TF_CONFIG", None)
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                           "task": {"type": "worker", "index": index}})
        command = [sys.executable, __file__, "--worker", str(reports[index]), "--data", str(data),
                   "--preset", args.preset, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *(["--set", *args.set] if args.set else [])]
        processes.append(subprocess.Popen(command, env=env))
    try:
        for process in processes:
            if process.wait(timeout=args.timeout) != 0:
                raise SystemExit(f"a worker of the {workers}-worker run failed "
                                 f"(exit {process.returncode})")
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the {workers}-worker run took longer than {args.timeout} s") from None
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
    return [json.loads(path.read_text()) for path in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps: checks it runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args)
        return
    if args.smoke:
        args.steps, args.warmup, args.rounds = 3, 1, 1
        args.set = (args.set or []) + ["data.crop_size=32", "model.views=terrain,height",
                                       "data.batch_size=8", "model.trunk=resnet18"]
    from cmc_kit import synth
    from cmc_kit.cache import prepare_cache
    from cmc_kit.config import preset

    config = preset(args.preset).with_overrides(args.set or [])
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="cmc-kit-multi-worker-") as tmp:
        out = Path(tmp)
        # Enough samples for the timed steps in one epoch, at 2x the crop (a random window).
        samples = config.data.batch_size * (args.steps + args.warmup + 2)
        data = synth.generate(out / "data", n=samples, size=2 * config.data.crop_size, seed=0,
                              progress=False)
        # From the `prepare` cache, as README "Several machines" advises: each worker decodes
        # every global batch, and PNG decoding would compete with the step for the cores.
        cache_dir = prepare_cache(data, out / "cache", progress=False)
        args.set = (args.set or []) + [f"data.cache={cache_dir}"]
        started = time.monotonic()
        rounds = {1: [], 2: []}
        for _ in range(args.rounds):  # alternating: both set-ups see the same machine load
            rounds[1].append(launch(args, data, out, workers=1, threads=cores)[0])
            rounds[2].append(next(report for report in
                                  launch(args, data, out, workers=2, threads=max(1, cores // 2))
                                  if report["worker"] == 0))
        wall = time.monotonic() - started
    one, chief = (min(rounds[n], key=lambda report: report["median_s"]) for n in (1, 2))
    t1, t2 = one["median_s"], chief["median_s"]
    speedup = t1 / t2
    settings = " ".join([args.preset, *(a for a in args.set if not a.startswith("data.cache="))])
    print(f"preset {settings}, from the prepare cache: global batch {one['global_batch']}, "
          f"{args.steps} timed steps after {args.warmup}, best of {args.rounds} round(s), "
          f"{cores} cores ({wall:.0f} s in all)")
    print(f"{'':34}{'ms/step':>10}{'samples/s':>12}   every round, ms/step")
    for name, report, n in (("one worker (1 process)", one, 1),
                            ("two workers (2 processes)", chief, 2)):
        every = ", ".join(f"{1000 * r['median_s']:.1f}" for r in rounds[n])
        print(f"{name:34}{1000 * report['median_s']:>10.1f}"
              f"{report['global_batch'] / report['median_s']:>12.1f}   {every}")
    print(f"speedup (one / two)               {speedup:.2f}")
    print(f"scaling efficiency (speedup / 2)  {speedup / 2:.2f}")
    print(f"overhead per step                 {1000 * (t2 - t1 / 2):.1f} ms "
          f"(two workers' step - one worker's / 2)")


if __name__ == "__main__":
    main()
