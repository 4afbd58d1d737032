"""Seconds of `evaluate.probe_sources` with the sources one at a time vs in parallel threads.

Usage: python benchmarks/probe_speed.py [--samples 315 85] [--grid 4] [--workers 2] [--rounds 2]
The features have the shapes `make demo` probes (by default 315 training and 85 held-out
samples, 16 crops each; `stages` features of the cpu-demo trunk, 240 wide, for the trained and
the random-init network; raw pixels 192; mean colour 3) and a class signal of different
strength per source. (Real features keep the logistic solver longer: the probes of one grid-4
demo evaluation take about 50 s one source at a time on 2 cores.) Each round times
one pass with one worker and one with `--workers`, alternating, so both see the same machine
load. Prints both times per round, the best of each, their ratio and the largest difference
between the two passes' rows (float rounding only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from cmc_kit import evaluate
from cmc_kit.palette import CLASS_NAMES

# name: (width, class signal): roughly the demo's sources, strongest first.
SOURCES = {"trained": (240, 1.6), "random_init": (240, 1.4), "raw_pixels": (192, 0.6),
           "mean_colour": (3, 1.0)}


def demo_like(train_samples: int, test_samples: int, crops: int, seed: int = 0):
    """Features {source: (train_x, test_x)} and the two label tables (with sample ids)."""
    rng = np.random.default_rng(seed)
    samples = train_samples + test_samples
    rows = samples * crops
    fractions = rng.dirichlet(np.full(len(CLASS_NAMES), 0.3), size=rows)      # [N, 7]
    labels = fractions.argmax(axis=1)
    table = pd.DataFrame({f"fraction_{n}": fractions[:, i] for i, n in enumerate(CLASS_NAMES)})
    table["dominant_class_id"] = labels
    table["height_mean"] = fractions @ rng.normal(size=len(CLASS_NAMES)) + rng.normal(size=rows)
    table["id"] = [f"{i // crops:05d}" for i in range(rows)]
    table["window"] = np.arange(rows) % crops
    split = train_samples * crops
    features = {}
    for name, (width, signal) in SOURCES.items():
        x = signal * fractions @ rng.normal(size=(len(CLASS_NAMES), width))
        x = (x + rng.normal(size=(rows, width))).astype(np.float32)             # [N, width]
        features[name] = (x[:split], x[split:])
    return features, table.iloc[:split], table.iloc[split:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs=2, default=[315, 85],
                        metavar=("TRAIN", "HELD_OUT"))
    parser.add_argument("--grid", type=int, default=4, help="crops per sample: grid x grid")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    features, train_table, test_table = demo_like(*args.samples, args.grid ** 2)
    print(f"{len(features)} sources, {len(train_table)} training / {len(test_table)} held-out "
          f"crops; 1 worker vs {args.workers}")
    times = {1: [], args.workers: []}
    results = {}
    for round_ in range(args.rounds):
        for workers in times:
            start = time.perf_counter()
            results[workers] = evaluate.probe_sources(features, train_table, test_table,
                                                      workers=workers)
            times[workers].append(time.perf_counter() - start)
        print(f"round {round_ + 1}: " + ", ".join(f"{w} worker(s) {t[-1]:.1f} s"
                                                  for w, t in times.items()))
    numbers = ["value", "low", "high"]
    difference = float((pd.DataFrame(results[1])[numbers]
                        - pd.DataFrame(results[args.workers])[numbers]).abs().to_numpy().max())
    best = {w: min(t) for w, t in times.items()}
    print(f"best: 1 worker {best[1]:.1f} s, {args.workers} workers {best[args.workers]:.1f} s, "
          f"speedup {best[1] / best[args.workers]:.2f}x; largest difference between their "
          f"rows: {difference:.1e} (BLAS rounding)")


if __name__ == "__main__":
    main()
