"""Samples/s of `views.make_dataset` from the PNGs vs from the `cache.prepare_cache` shards.

Usage: python benchmarks/data_pipeline.py [--n 64] [--size 512] [--crops 256 64] [--rounds 3]
Writes a synthetic dataset (cmc_kit.synth) and its cache into a temporary folder, then times
training epochs of all four views from both sources, alternating PNG and cache in each round so
both see the same machine load. Prints the median samples/s and the cache/PNG ratio per crop size
(target: the cache at least 3x faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from cmc_kit import cache as shard_cache
from cmc_kit import data, synth, views


def epoch_rate(catalog: pd.DataFrame, *, crop: int, batch: int, epoch: int, cache) -> float:
    """Samples/s of one full training epoch (all views, no model)."""
    dataset = views.make_dataset(catalog, views=views.VIEW_SPECS, crop_size=crop, batch_size=batch,
                                 training=True, seed=0, epoch=epoch, cache=cache)
    start, samples = time.perf_counter(), 0
    for item in dataset:
        samples += int(item["terrain"].shape[0])
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="samples in the synthetic dataset")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--crops", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per source and crop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synth.generate(root, n=args.n, size=args.size, seed=0, progress=False)
        catalog = data.discover(root)
        start = time.perf_counter()
        cache = shard_cache.prepare_cache(catalog, Path(tmp) / "cache", progress=False)
        prepare_seconds = time.perf_counter() - start
        png_mb = sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6
        cache_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6
        print(f"{len(catalog)} samples of {args.size}x{args.size}: PNGs {png_mb:.1f} MB, "
              f"cache {cache_mb:.1f} MB, prepare {prepare_seconds:.1f} s "
              f"({len(catalog) / prepare_seconds:.1f} samples/s)")

        for crop in args.crops:
            rates = {"png": [], "cache": []}
            for source in ("png", "cache"):  # warm-up epoch: traces functions, fills page cache
                epoch_rate(catalog, crop=crop, batch=args.batch, epoch=0,
                           cache=cache if source == "cache" else None)
            for epoch in range(1, args.rounds + 1):
                for source in ("png", "cache"):
                    rates[source].append(epoch_rate(catalog, crop=crop, batch=args.batch, epoch=epoch,
                                                    cache=cache if source == "cache" else None))
            png, cached = statistics.median(rates["png"]), statistics.median(rates["cache"])
            print(f"crop {crop:>3}: PNG {png:7.1f} samples/s | cache {cached:7.1f} samples/s | "
                  f"cache/PNG {cached / png:.1f}x  (all four views, batch {args.batch}, "
                  f"median of {args.rounds} epochs)")


if __name__ == "__main__":
    main()
