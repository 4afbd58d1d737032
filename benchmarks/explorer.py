"""How long UMAP and the standalone explorer page take for a Kaggle-sized table, and how big it is.

5,000 random 128-d embeddings in Gaussian clusters, with synthetic 64 px thumbnails (smooth noise
terrain, height and segmentation, encoded like real ones). Prints seconds for UMAP, seconds to
write the page and its size in MB (target: under ~25 MB).
Run: `.venv/bin/python benchmarks/explorer.py` (`--n 1000` for a quicker look).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmc_kit import CLASS_NAMES, PALETTE, embed, explore  # noqa: E402


def clustered_embeddings(count: int, dim: int, clusters: int, rng) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, clusters, size=count)
    centres = rng.normal(size=(clusters, dim)) * 4
    return (centres[labels] + rng.normal(size=(count, dim))).astype(np.float32), labels


def smooth_noise(size: int, rng, octaves: int = 3) -> np.ndarray:
    """Sum of upsampled random grids in [0, 1]: terrain-like, compresses like real maps."""
    from PIL import Image

    field = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.random((cells, cells)).astype(np.float32)
        field += np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)) \
            / 2 ** octave
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def synthetic_thumbnails(ids, size: int, rng) -> dict:
    thumbs = {}
    for sample_id in ids:
        elevation = smooth_noise(size, rng)
        classes = np.digitize(elevation, [0.2, 0.35, 0.5, 0.6, 0.7, 0.85]).astype(np.intp)
        terrain = (PALETTE[classes] * (0.7 + 0.3 * smooth_noise(size, rng))[..., None])
        images = explore.thumbnail_images(terrain.astype(np.uint8),
                                          (elevation * 60000).astype(np.uint16),
                                          PALETTE[classes], size=size,
                                          detail_size=size * 3 // 4)  # as the page does
        thumbs[sample_id] = explore.encode_thumbnails(images)
    return thumbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--thumb", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    embeddings, labels = clustered_embeddings(args.n, args.dim, clusters=7, rng=rng)
    ids = [f"{i + 1:04d}" for i in range(args.n)]
    table = embed.embeddings_frame(ids, embeddings)
    fractions = rng.dirichlet(np.ones(7) * 0.5, size=args.n)
    for k, column in enumerate(embed.FRACTION_COLUMNS):
        table[column] = fractions[:, k].astype(np.float32)
    table["dominant_class_id"] = fractions.argmax(1)
    table["dominant_class"] = np.asarray(CLASS_NAMES, dtype=object)[fractions.argmax(1)]
    table["height_mean"] = rng.uniform(0, 65535, args.n).astype(np.float32)
    table["height_std"] = rng.uniform(0, 5000, args.n).astype(np.float32)
    table["cluster"] = labels

    started = time.perf_counter()
    thumbs = synthetic_thumbnails(ids, args.thumb, rng)
    thumbs_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        layout = embed.umap_layout(embeddings, cache_dir=tmp)
        umap_seconds = time.perf_counter() - started
        started = time.perf_counter()
        embed.umap_layout(embeddings, cache_dir=tmp)
        cached_seconds = time.perf_counter() - started

        started = time.perf_counter()
        page = explore.write_explorer_html(table, layout, Path(tmp) / "explorer.html",
                                           thumbnails=thumbs, title="benchmark", thumb=args.thumb)
        page_seconds = time.perf_counter() - started
        page_mb = page.stat().st_size / 1e6

        started = time.perf_counter()
        explore.mosaic(layout, Path(tmp) / "mosaic.png", thumbnails=thumbs, ids=ids, thumb=args.thumb)
        mosaic_seconds = time.perf_counter() - started

    thumb_kb = np.mean([sum(len(v) for v in t.values()) for t in thumbs.values()]) / 1e3
    print(f"explorer benchmark: {args.n} points x {args.dim}-d, {args.thumb}px thumbnails, "
          f"{os.cpu_count()} CPU(s)")
    print(f"  make thumbnails      {thumbs_seconds:7.2f} s  "
          f"({thumb_kb:.1f} kB per sample, 3 images)")
    print(f"  UMAP (2D, cosine)    {umap_seconds:7.2f} s  (includes numba JIT on a cold start)")
    print(f"  UMAP again (cached)  {cached_seconds:7.3f} s")
    print(f"  write page           {page_seconds:7.2f} s")
    print(f"  page size            {page_mb:7.2f} MB  (target < 25 MB)")
    print(f"  mosaic 2048 px       {mosaic_seconds:7.2f} s")


if __name__ == "__main__":
    main()
