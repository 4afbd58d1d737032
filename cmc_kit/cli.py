"""`cmc-kit` command line (also `python -m cmc_kit`).

Each subcommand is a thin shim over a library function; heavy modules are imported lazily so
`cmc-kit --help` and `cmc-kit validate` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmc_kit.config import default_paths, parse_duration


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="named settings: cpu-demo, kaggle-t4, original (default: cpu-demo "
                             "for a new run, the saved config when resuming)")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs to reach")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting by dotted name, e.g. model.width=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmc-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic terrain dataset in the Kaggle layout")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=128, help="number of samples (default 128)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("validate", help="report usable / incomplete / unreadable samples")
    p.add_argument("data", type=Path)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("download", help="get the Kaggle Terrain Map dataset (or find it on Kaggle)")
    p.add_argument("--dest", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="download again even if already complete")

    p = sub.add_parser("prepare", help="build the fast training cache from the PNGs")
    p.add_argument("data", type=Path)
    p.add_argument("cache", type=Path)

    p = sub.add_parser("train", help="train (resumes automatically when RUN holds a checkpoint)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="discard RUN's checkpoints and start over (ignores an attached Kaggle output)")
    p.add_argument("--time-limit", type=str, default=None,
                   help="checkpoint and stop cleanly before this much wall time, e.g. 11.5h, 90m")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a previous run directory (e.g. an attached Kaggle notebook output) to continue")

    p = sub.add_parser("info", help="epoch, step, queue fill, config and latest checkpoint of a run")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("embed", help="embeddings table of a run's held-out split")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"])
    p.add_argument("--source", default="trunk", choices=["trunk", "head"])
    p.add_argument("--view", default="terrain")
    p.add_argument("--network", default="online", choices=["online", "momentum"])
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: latest)")

    p = sub.add_parser("explore", help="UMAP + standalone interactive explorer page")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="all", choices=["validation", "train", "all"])
    p.add_argument("--over-epochs", type=Path, default=None, metavar="HTML",
                   help="also write an animated page of the held-out subset's UMAP after each "
                        "epoch (from RUN/embeddings/epoch_NNN.parquet)")

    p = sub.add_parser("evaluate", help="kNN / linear-probe table vs baselines")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)

    p = sub.add_parser("demo", help="synth -> train -> evaluate -> explore on the synthetic set")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/demo in the repository, or /kaggle/working/runs/demo)")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset (default: data/synthetic beside the runs; generated if absent)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n", type=int, default=400, help="synthetic samples to generate if absent")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for the errors we raise on purpose
        from cmc_kit.errors import CmcKitError
        from cmc_kit.config import ConfigError
        if isinstance(err, (CmcKitError, ConfigError)):
            print(f"cmc-kit {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from cmc_kit import synth
        root = synth.generate(args.out, n=args.n, size=args.size, seed=args.seed)
        print(f"Wrote {args.n} synthetic samples to {root}")
        return 0

    if args.command == "validate":
        from cmc_kit import data
        report = data.validate(args.data, progress=not args.json)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        return 0 if report.num_usable > 0 else 1

    if args.command == "download":
        from cmc_kit import data
        root = data.download(dest=args.dest, force=args.force)
        print(root)
        return 0

    if args.command == "prepare":
        from cmc_kit import views
        views.prepare_cache(args.data, args.cache)
        return 0

    if args.command == "train":
        from cmc_kit import training
        training.train_from_cli(
            data=args.data, run=args.run, preset_name=args.preset, epochs=args.epochs,
            overrides=args.overrides, fresh=args.fresh,
            time_limit=parse_duration(args.time_limit), resume_from=args.resume_from)
        return 0

    if args.command == "info":
        from cmc_kit import training
        info = training.run_info(args.run)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            for key, value in info.items():
                if key != "config":
                    print(f"{key:>18}: {value}")
        return 0

    if args.command == "embed":
        from cmc_kit import embed
        table = embed.embed_run(args.run, args.data, split=args.split, source=args.source,
                                view=args.view, network=args.network, checkpoint=args.checkpoint)
        out = args.out or Path(args.run) / "embeddings" / "embeddings.parquet"
        embed.save_table(table, out)
        print(f"Wrote {len(table)} embeddings to {out}")
        return 0

    if args.command == "explore":
        from cmc_kit import explore
        out = explore.export_html(args.run, args.data, args.out, split=args.split)
        print(f"Wrote {out}")
        if args.over_epochs is not None:
            print(f"Wrote {explore.write_epochs_html(args.run, args.over_epochs)}")
        return 0

    if args.command == "evaluate":
        from cmc_kit import evaluate
        table = evaluate.evaluate_run(args.run, args.data, out=args.out)
        print(evaluate.format_table(table))
        return 0

    if args.command == "demo":
        from cmc_kit import demo
        demo.run_demo(out=args.out or default_paths()["runs"] / "demo", data=args.data,
                      epochs=args.epochs, n=args.n)
        return 0

    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
