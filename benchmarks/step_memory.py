"""Memory of one train step at a preset's shapes, per replica batch, to size GPU batches.

Usage: python benchmarks/step_memory.py [--preset kaggle-t4] [--batches 4 8]
       [--precisions off mixed_bfloat16]

Each (batch, precision) runs in a fresh process on the CPU: it builds the Trainer (online and
momentum encoders, Adam, queues), then runs one train step, and reports the peak resident memory
before and after the step. The step's share (peak after - before) is what activations and
gradients take; it grows linearly with the batch, so two batches give a per-sample slope and a
line to extrapolate to the batch a GPU replica would get. This is an estimate of GPU memory,
not a GPU measurement: cuDNN workspaces, XLA fusion and the BFC allocator's fragmentation
differ, and float16 activations take about what bfloat16 ones take here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T4_USABLE_GB = 15.0  # a 16 GB T4 as TensorFlow sees it


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: kilobytes


def measure(preset_name: str, batch: int, precision: str) -> dict:
    """One step in this process: peak RSS before and after (GB) and the step's seconds."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cmc_kit import data, synth, training
    from cmc_kit.config import preset

    config = preset(preset_name).with_overrides({
        "data.batch_size": batch, "train.mixed_precision": precision,
        "train.queue_multiplier": 1, "train.eval_subset": 0})
    crop = config.data.crop_size
    with tempfile.TemporaryDirectory() as tmp:
        root = synth.generate(Path(tmp) / "data", n=2 * batch + 2, size=crop, seed=0,
                              progress=False)
        trainer = training.Trainer(config, Path(tmp) / "run", data.discover(root), verbose=0)
        batch_views = next(iter(trainer.dataset(epoch=0)))
        before = peak_rss_gb()
        started = time.monotonic()
        logs = trainer.train_step(batch_views)
        float(logs["loss"])
        seconds = time.monotonic() - started
    return {"batch": batch, "precision": trainer.precision, "before_gb": before,
            "after_gb": peak_rss_gb(), "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="kaggle-t4")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--precisions", nargs="+", default=["off", "mixed_bfloat16"],
                        help="train.mixed_precision values ('off' is float32)")
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.preset, int(args.one[0]), args.one[1])))
        return

    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            result = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--one", str(batch), precision],
                capture_output=True, text=True, check=False)
            if result.returncode:
                print(result.stderr[-3000:])
                raise SystemExit(f"batch {batch} {precision} failed")
            rows.append({**json.loads(result.stdout.strip().splitlines()[-1]), "setting": precision})
            row = rows[-1]
            print(f"{args.preset} batch {batch:3d} {row['precision']:15s} peak RSS before step "
                  f"{row['before_gb']:6.2f} GB, after {row['after_gb']:6.2f} GB "
                  f"(step {row['after_gb'] - row['before_gb']:5.2f} GB, {row['seconds']:.0f} s)",
                  flush=True)

    print(f"\nper-sample step memory and a linear fit (GB), extrapolated; a T4 has about "
          f"{T4_USABLE_GB:.0f} GB usable:")
    for precision in args.precisions:
        points = [r for r in rows if r["setting"] == precision]
        if len(points) < 2:
            continue
        (b0, m0), (b1, m1) = [(r["batch"], r["after_gb"]) for r in points[:2]]
        slope = (m1 - m0) / (b1 - b0)
        fixed = m0 - slope * b0
        estimates = ", ".join(f"batch {b}: {fixed + slope * b:5.1f}" for b in (16, 32))
        print(f"  {points[0]['precision']:15s} {slope:5.3f} GB/sample + {fixed:5.2f} GB -> "
              f"{estimates}")


if __name__ == "__main__":
    main()
