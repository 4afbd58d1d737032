"""Times `cmc_kit.synth.generate` (default: 64 samples of 512x512) into a temporary folder.

Usage: python benchmarks/synth_speed.py [--n 64] [--size 512] [--workers W]
Prints seconds, samples/s and the size of the written files. Target: under 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cmc_kit import synth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: synth's choice)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        synth.generate(tmp, n=args.n, size=args.size, seed=0, progress=False, workers=args.workers)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start  # robust to other load on the machine
        megabytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 1e6
    print(f"synth.generate n={args.n} size={args.size} workers={args.workers or 'default'}: "
          f"{seconds:.2f} s wall, {cpu_seconds:.2f} s CPU, {args.n / seconds:.2f} samples/s, "
          f"{megabytes:.1f} MB written")


if __name__ == "__main__":
    main()
