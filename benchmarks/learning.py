"""Does it learn? A preset trained with several seeds on one dataset, probed against baselines.

Usage: python benchmarks/learning.py [--data DIR] [--preset cpu-demo] [--seeds 3]
       [--epochs E] [--features stages] [--grid 4] [--supervised] [--set key=value ...]
       [--out DIR] [--smoke]

For each seed: `cmc-kit train` the preset (train.seed = the seed; the split stays the same, so
every seed is scored on the same held-out samples), then `evaluate` the trained encoder, the
network it started from (its seed's initial weights, same feature source), raw pixels (8x8x3)
and the crop's mean colour, on every crop of a grid that tiles each sample (`--grid`; 4x4 on the
demo's set; the bootstrap and the probes' folds keep a sample's crops together). Printed per probe: mean +- sd over the seeds for every source, the margin
of trained over the best baseline, and per seed the contrastive accuracy at the end of epoch 2
(chance = 1 / batch) and the training wall time. Default data: the demo's synthetic set (400
samples of 256 px, generator seed 0), made under the output folder; `--data` takes any folder
in the Kaggle layout (e.g. one `benchmarks/real_terrain.py` built). `--smoke`: 2 seeds of a
tiny model for 2 epochs, to check the script runs.

`--supervised` adds a reference that is not a baseline: per seed, the same starting network
trained for as many epochs on the training split's segmentation labels (`finetune`'s
random_init arm at labels 1, under RUN/finetune/), probed with the same feature source. It says
how much of what the labels themselves can teach in that budget the self-supervised run learned
("share of supervised gain" = (trained - random init) / (supervised - random init)).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cmc_kit import data as data_module  # noqa: E402
from cmc_kit import embed, evaluate, runs, training  # noqa: E402
from cmc_kit.config import preset  # noqa: E402
from cmc_kit.demo import DEMO_IMAGE_SIZE, ensure_synthetic  # noqa: E402

SMOKE_SETTINGS = {"data.crop_size": 32, "data.batch_size": 8, "model.trunk": "resnet18",
                  "model.width": 0.125,
                  "model.embedding_dim": 16, "train.epochs": 2, "train.queue_multiplier": 2,
                  "train.eval_subset": 8, "data.validation_fraction": 0.25}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (default: the demo's synthetic set, made if absent)")
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--features", default="stages",
                        help="feature source (cmc_kit.features.SOURCES)")
    parser.add_argument("--grid", type=int, default=None,
                        help="score GRID x GRID crops per sample (evaluate --grid); default: as "
                             "many as tile the images, at most 4 (4 for the demo's 256 px images "
                             "with 64 px crops); 1: centre crops only")
    parser.add_argument("--supervised", action="store_true",
                        help="also probe the starting network trained on the segmentation labels "
                             "for as many epochs (a reference, not a baseline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def train_seeds(data: Path, out: Path, config, seeds: int) -> list[dict]:
    """Trains one run per seed (resuming any already there); wall time, the run's training
    time (its log's epoch seconds, also for a run trained before) and epoch-2 accuracy."""
    rows = []
    for seed in range(seeds):
        run = out / f"seed{seed}"
        started = time.monotonic()
        training.train(data, run, config.with_overrides({"train.seed": seed}), verbose=0,
                       callbacks=[embed.EpochEmbeddings()])
        log = pd.read_csv(run / runs.LOG_FILE)
        second = log[log["epoch"] == 2]
        rows.append({"seed": seed, "run": run, "seconds": time.monotonic() - started,
                     # the run's own time in training epochs, over every session that trained it
                     "train_seconds": float(log["seconds"].sum()),
                     "epoch2_accuracy": float(second["accuracy"].iloc[0]) if len(second) else np.nan,
                     "final_loss": float(log["loss"].iloc[-1]),
                     "final_spread": float(log["embedding_spread"].iloc[-1])})
    return rows


SUPERVISED = "supervised"


def supervised_encoder(run: Path, dataset, *, epochs: int):
    """The run's starting network trained for `epochs` passes on the segmentation labels of
    every training sample (finetune's random_init arm at labels 1: same crops and batch size;
    resumed or skipped like any arm), as an encoder of the run's architecture."""
    from cmc_kit import finetune

    arm = finetune.finetune_run(run, dataset=dataset, labels=(1.0,), arms=("random_init",),
                                epochs=epochs, out=Path(run) / runs.FINETUNE_DIR /
                                "supervised_reference.csv", progress=False)
    return finetune.load_arm_encoder(runs.load_run(run), arm["folder"].iloc[0])


def evaluate_seeds(per_seed: list[dict], dataset, *, features: str, grid: int,
                   supervised_epochs: int | None) -> pd.DataFrame:
    """Every run evaluated (with its supervised reference when `supervised_epochs`), then the
    mean, sd and t-interval over runs per probe and source (`evaluate.summarise_over_runs`)."""
    tables = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # each run's rough note: the header says
        for row in per_seed:
            references = ({SUPERVISED: supervised_encoder(row["run"], dataset,
                                                          epochs=supervised_epochs)}
                          if supervised_epochs else None)
            tables.append(evaluate.evaluate_run(row["run"], dataset=dataset, features=features,
                                                grid=grid, references=references))
    summary = evaluate.summarise_over_runs(tables)
    summary.attrs.update({key: tables[0].attrs[key] for key in ("train_samples", "test_samples")})
    return summary


# A regression probe no source fits better than this predicts nothing (a strongly regularised
# ridge gives R^2 ~ +-1e-5, not exactly 0, when it falls back to the training mean).
NO_SIGNAL_R2 = 0.01


def verdict(by_source: pd.DataFrame, metric: str) -> str:
    """Which source wins a probe: "trained" when the trained encoder beats every baseline, the
    best baseline's name when it does not, "no signal" when no source does better than
    predicting the training mean (R^2 below NO_SIGNAL_R2 for all: nothing to beat)."""
    values = by_source["value"].drop(SUPERVISED, errors="ignore")  # a reference, not a rival
    if metric == "r2" and (values < NO_SIGNAL_R2).all():
        return "no signal"
    best = best_baseline(values)
    return "trained" if values["trained"] > values[best] else best


def best_baseline(values: pd.Series) -> str:
    """The baseline (of those present) with the highest value."""
    return max((s for s in evaluate.BASELINES if s in values.index), key=values.get)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per probe: mean +- sd of every source, trained minus the best baseline and the verdict."""
    rows = []
    for (task, probe, metric), group in table.groupby(["task", "probe", "metric"], sort=False):
        by_source = group.set_index("source")
        row = {"task": task, "probe": probe, "metric": metric}
        for source in ("trained",) + evaluate.BASELINES + (SUPERVISED,):
            if source in by_source.index:
                row[source] = f"{by_source.at[source, 'value']:.3f} +- {by_source.at[source, 'sd']:.3f}"
        values = by_source["value"]
        margin = values["trained"] - values[best_baseline(values)]
        row["trained - best baseline"] = f"{margin:+.3f}"
        row["winner"] = verdict(by_source, metric)
        if SUPERVISED in values.index:
            row["share of supervised gain"] = supervised_share(values, row["winner"])
        rows.append(row)
    return pd.DataFrame(rows)


def supervised_share(values: pd.Series, winner: str) -> str:
    """(trained - random init) / (supervised - random init) as a percentage; "-" where the
    probe has no signal or supervision did not beat random init (no gain to share)."""
    gain = values[SUPERVISED] - values["random_init"]
    if winner == "no signal" or gain <= 0:
        return "-"
    return f"{100 * (values['trained'] - values['random_init']) / gain:.0f}%"


def verdict_line(summary: pd.DataFrame) -> str:
    """One line: on how many probes with any signal the trained encoder beats every baseline."""
    scored = summary[summary["winner"] != "no signal"]
    lost = scored[scored["winner"] != "trained"]
    line = (f"trained beats every baseline on {len(scored) - len(lost)} of {len(scored)} probes "
            f"with signal")
    if len(lost):
        line += "; not on " + ", ".join(f"{t} {p} ({w})" for t, p, w in
                                        zip(lost["task"], lost["probe"], lost["winner"]))
    silent = summary[summary["winner"] == "no signal"]
    if len(silent):
        line += "; no source predicts " + ", ".join(silent["task"])
    return line


def below_random_init(table: pd.DataFrame, summary: pd.DataFrame, seeds: int) -> list[str]:
    """Per seed, the probes with signal on which that seed's trained encoder does not beat its
    own random-init network ("-" when it beats it on all)."""
    scored = set(zip(summary.loc[summary["winner"] != "no signal", "task"],
                     summary.loc[summary["winner"] != "no signal", "probe"]))
    values = {(row.task, row.probe, row.source): row["values"] for _, row in table.iterrows()}
    below = []
    for seed in range(seeds):
        lost = [f"{task} {probe}" for task, probe in sorted(scored)
                if values[(task, probe, "trained")][seed] <= values[(task, probe, "random_init")][seed]]
        below.append(", ".join(lost) or "-")
    return below


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = dict(SMOKE_SETTINGS) if args.smoke else {}
    seeds = 2 if args.smoke else args.seeds
    if seeds < 2:
        print(f"learning.py: --seeds must be 2 or more (a mean +- sd over seeds). Received: "
              f"{seeds}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        if args.data is None:  # the demo's set; a small one for the smoke run
            n, size = (60, 64) if args.smoke else (400, DEMO_IMAGE_SIZE)
            data = ensure_synthetic(out / "synthetic", n, size)
        else:
            data = args.data
        config = preset(args.preset).with_overrides(overrides).with_overrides(args.overrides)
        if args.epochs is not None:
            config = config.with_overrides({"train.epochs": args.epochs})
        print(f"{args.preset} on {data}, seeds 0..{seeds - 1}, {config.train.epochs} epochs, "
              f"features {args.features}"
              + (", with a supervised reference" if args.supervised else "") + ", settings: "
              f"{args.overrides or 'the preset'}")
        per_seed = train_seeds(Path(data), out, config, seeds)
        dataset = data_module.Dataset.find(data)
        if args.grid is None:
            args.grid = evaluate.tiling_grid(dataset.catalog, config.data.crop_size)
        table = evaluate_seeds(per_seed, dataset, features=args.features, grid=args.grid,
                               supervised_epochs=config.train.epochs if args.supervised else None)
        print(f"\nHeld-out probes, mean +- sd over {seeds} seeds "
              f"({table.attrs['train_samples']} train / {table.attrs['test_samples']} held-out "
              f"samples, {args.grid}x{args.grid} crops each):")
        summary = summary_table(table)
        print(summary.to_string(index=False))
        print(verdict_line(summary))
        for row, lost in zip(per_seed, below_random_init(table, summary, seeds)):
            row["not above random init"] = lost
        print("\nper seed:")
        print(pd.DataFrame(per_seed).drop(columns="run").to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
        chance = 1 / config.data.batch_size
        print(f"(epoch-2 contrastive accuracy: chance = 1/batch = {chance:.3f}; seconds: this "
              f"call's wall time per seed, train_seconds: the run's epochs, "
              f"{np.mean([r['train_seconds'] for r in per_seed]):.0f} s per seed on average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
