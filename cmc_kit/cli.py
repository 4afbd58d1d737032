"""`cmc-kit` command line (also `python -m cmc_kit`).

Each subcommand is a thin shim over a library function; heavy modules are imported lazily so
`cmc-kit --help` and `cmc-kit validate` start fast. Errors a user can fix are printed as one line,
`cmc-kit COMMAND: error: ...`, with exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path

from cmc_kit.config import default_paths, parse_duration
from cmc_kit.fileio import check_folder_path, output_file_path

# Commands that import TensorFlow (through views, models or training).
_TENSORFLOW_COMMANDS = {"prepare", "train", "embed", "explore", "evaluate", "demo"}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="named settings: cpu-demo, kaggle-t4, original (default: cpu-demo "
                             "for a new run, the saved config when resuming)")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs to reach")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting by dotted name, e.g. model.width=0.5, "
                             "data.augment=true, model.views=terrain,height (or a JSON list); "
                             "repeatable. All names are listed at the end of this help")


def _settings_epilog() -> str:
    from cmc_kit.config import valid_keys

    sections: dict[str, list[str]] = {}
    for key in valid_keys():
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(name)
    lines = ["settings for --set SECTION.NAME=VALUE (defaults: the preset; see cmc_kit/config.py):"]
    for section, names in sections.items():
        text, line = "", f"  {section}: "
        for name in names:
            piece = name + ", "
            if len(line) + len(piece) > 92:
                text += line.rstrip() + "\n"
                line = " " * (len(section) + 4)
            line += piece
        lines.append(text + line.rstrip(", "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmc-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_help = "run directory (config, checkpoints, logs), as written by `cmc-kit train`"
    data_help = "dataset folder holding <id>_t.png, <id>_h.png, <id>_i2.png (any depth)"

    p = sub.add_parser("synth", help="write a synthetic terrain dataset in the Kaggle layout")
    p.add_argument("out", type=Path, help="folder to write (OUT/_dataset/*.png, OUT/metadata.csv)")
    p.add_argument("--n", type=int, default=128, help="number of samples, >= 1 (default 128)")
    p.add_argument("--size", type=int, default=512,
                   help="image side in pixels, >= 16 (default 512)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; sample i depends only on (seed, i) (default 0)")

    p = sub.add_parser("validate", help="report usable / incomplete / unreadable samples")
    p.add_argument("data", type=Path, help=data_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("download", help="get the Kaggle Terrain Map dataset (or find it on Kaggle)")
    p.add_argument("--dest", type=Path, default=None, help="folder to download into "
                   "(default: data/ beside the runs, /kaggle/working/data on Kaggle)")
    p.add_argument("--force", action="store_true", help="download again even if already complete")

    p = sub.add_parser("prepare", help="build the fast training cache from the PNGs")
    p.add_argument("data", type=Path, help=data_help)
    p.add_argument("cache", type=Path, help="cache folder to write; train with "
                   "--set data.cache=CACHE")

    p = sub.add_parser("train", help="train (resumes automatically when RUN holds a checkpoint)",
                       epilog=_settings_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--run", type=Path, required=True,
                   help="run directory: created if new, resumed if it holds a checkpoint")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="discard RUN's checkpoints and start over (ignores an attached Kaggle output)")
    p.add_argument("--time-limit", type=str, default=None,
                   help="checkpoint and stop cleanly before this much wall time, e.g. 11.5h, 90m")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a previous run directory (e.g. an attached Kaggle notebook output) to continue")

    p = sub.add_parser("info", help="epoch, step, queue fill, config and latest checkpoint of a run")
    p.add_argument("--run", type=Path, required=True, help=run_help)
    p.add_argument("--json", action="store_true", help="print everything, config included, as JSON")

    p = sub.add_parser("embed", help="embeddings table of a run's held-out split")
    p.add_argument("--run", type=Path, required=True, help=run_help)
    p.add_argument("--data", type=Path, required=True, help=data_help + "; the run's split is used")
    p.add_argument("--out", type=Path, default=None,
                   help=".parquet or .csv file to write; an existing folder gets "
                        "embeddings.parquet inside (default: RUN/embeddings/embeddings.parquet)")
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"],
                   help="which samples of the run's split to embed (default: validation)")
    p.add_argument("--source", default="trunk", choices=["trunk", "head"],
                   help="mean-pooled trunk features or the projection head (default: trunk)")
    p.add_argument("--view", default="terrain",
                   help="input view to embed: terrain, segmentation, height or overview; it must "
                        "be one of the run's model.views (default: terrain)")
    p.add_argument("--network", default="online", choices=["online", "momentum"],
                   help="online network or its momentum (EMA) twin (default: online)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint, e.g. RUN/checkpoints/ckpt-3 or ckpt-3 (default: latest)")

    p = sub.add_parser("explore", help="UMAP + standalone interactive explorer page")
    p.add_argument("--run", type=Path, required=True, help=run_help)
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--out", type=Path, required=True,
                   help="HTML page to write; an existing folder gets explorer.html inside")
    p.add_argument("--split", default="all", choices=["validation", "train", "all"],
                   help="which samples of the run's split to show (default: all)")
    p.add_argument("--over-epochs", type=Path, default=None, metavar="HTML",
                   help="also write an animated page of the held-out subset's UMAP after each "
                        "epoch (from RUN/embeddings/epoch_NNN.parquet)")

    p = sub.add_parser("evaluate", help="kNN / linear-probe table vs baselines")
    p.add_argument("--run", type=Path, required=True, help=run_help)
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--out", type=Path, default=None,
                   help="CSV file for the table; an existing folder gets evaluation.csv inside "
                        "(checked before the probes run; default: print only)")

    p = sub.add_parser("demo", help="synth -> train -> evaluate -> explore on the synthetic set")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/demo in the repository, or /kaggle/working/runs/demo)")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset (default: data/synthetic beside the runs; generated if absent)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs to reach")
    p.add_argument("--n", type=int, default=400, help="synthetic samples to generate if absent")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before TensorFlow is imported; a value the user set wins (0 shows everything).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # Warnings read like the errors: `cmc-kit train: warning: ...`, not a source line.
            warnings.showwarning = functools.partial(_show_warning, args.command)
            return _dispatch(args)
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for the errors we raise on purpose
        from cmc_kit.errors import CmcKitError
        from cmc_kit.config import ConfigError
        if isinstance(err, (CmcKitError, ConfigError)):
            message = " ".join(str(err).split("\n"))
            print(f"cmc-kit {args.command}: error: {message}", file=sys.stderr)
            return 2
        raise


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None):
    kind = "" if category is UserWarning else f"{category.__name__}: "
    print(f"cmc-kit {command}: warning: {kind}{message}", file=file or sys.stderr)


def _interrupted_message(args: argparse.Namespace) -> str:
    """For train: where the run stands (RUN/state.json, written at each checkpoint)."""
    if args.command != "train":
        return "Interrupted."
    run = Path(args.run)
    try:
        state = json.loads((run / "state.json").read_text())
        step, epoch, checkpoint = int(state["step"]), state.get("epoch"), state["latest_checkpoint"]
        if not checkpoint:
            raise ValueError("no checkpoint yet")
    except (OSError, ValueError, KeyError, TypeError):
        return (f"Interrupted before {run} held a checkpoint: nothing to resume from. Running the "
                "same command again starts training from the beginning.")
    where = f"step {step}"
    batch = state.get("batch_in_epoch") or 0
    if isinstance(epoch, int) and batch:
        where += f" ({epoch} epoch(s) done, {batch} batch(es) into epoch {epoch + 1})"
    elif isinstance(epoch, int):
        where += f" (end of epoch {epoch})"
    return (f"Interrupted. The latest checkpoint of {run}, {checkpoint}, holds {where}. Run the same "
            "command again to resume from it (steps after it are redone).")


# -- argument checks (before any work) ----------------------------------------------------------

def _check_synth_args(args: argparse.Namespace) -> None:
    from cmc_kit.config import ConfigError
    from cmc_kit.synth import MIN_SIZE

    if args.n < 1:
        raise ConfigError(f"--n must be a number of samples >= 1. Received: --n {args.n}")
    if args.size < MIN_SIZE:
        raise ConfigError(f"--size must be an image side of at least {MIN_SIZE} pixels, e.g. "
                          f"--size 64 (the real dataset: 512). Received: --size {args.size}")


# -- TensorFlow's start-up log ------------------------------------------------------------------

# absl/TF native log lines: "I0000 00:00:1795995048.781801   19421 port.cc:153] ..." and the
# older "2025-01-01 12:00:00.000000: I tensorflow/core/...". Letter -> TF_CPP_MIN_LOG_LEVEL.
_NATIVE_LOG = re.compile(r"^(?:(?P<a>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |"
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<b>[IWEF]) )")
_NATIVE_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def filter_native_log(text: str, min_level: int) -> str:
    """Drops native log lines below `min_level` (and their continuation lines)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _NATIVE_LOG.match(line)
        if match:
            dropping = _NATIVE_LEVELS[match.group("a") or match.group("b")] < min_level
        elif line.startswith(_ABSL_PREAMBLE):
            if min_level >= 1:
                continue  # this line only
        if not dropping:
            kept.append(line)
    return "".join(kept)


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its start-up log filtered by TF_CPP_MIN_LOG_LEVEL.

    TF 2.21 logs "oneDNN custom operations are on" (twice) through absl before its own log
    level is read, so TF_CPP_MIN_LOG_LEVEL alone does not silence it. Native stderr is caught
    during the import and replayed without the lines below the level; anything else (warnings,
    errors) still shows.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    if min_level <= 0:
        import tensorflow  # noqa: F401
        return
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded interpreter)
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = filter_native_log(caught.read().decode("utf-8", "replace"), min_level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


# -- commands -----------------------------------------------------------------------------------

def _dispatch(args: argparse.Namespace) -> int:
    from cmc_kit.errors import CheckpointError, DataError

    # Checks that need no data: a wrong path fails at once, before TensorFlow loads.
    if args.command == "synth":
        _check_synth_args(args)
        check_folder_path(args.out, "The output folder", DataError)
    elif args.command == "prepare":
        check_folder_path(args.cache, "The cache folder", DataError)
    elif args.command == "train":
        check_folder_path(args.run, "--run", CheckpointError)
        if args.resume_from is not None and args.resume_from.exists() and not args.resume_from.is_dir():
            raise CheckpointError(f"--resume-from {args.resume_from} is a file; give the previous "
                                  "run's folder.")
    elif args.command == "demo":
        check_folder_path(args.out, "--out (the demo's run directory)", CheckpointError)
        check_folder_path(args.data, "--data", DataError)

    if args.command in _TENSORFLOW_COMMANDS or (
            args.command == "info" and (Path(args.run) / "config.json").is_file()):
        _import_tensorflow_quietly()

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
        from cmc_kit import kaggle
        root = kaggle.download(dest=args.dest, force=args.force)
        print(root)
        return 0

    if args.command == "prepare":
        from cmc_kit import cache
        root = cache.prepare_cache(args.data, args.cache)
        print(_cache_summary(Path(root)))
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
        out = (output_file_path(args.out, "--out", "embeddings.parquet", (".parquet", ".csv"))
               if args.out is not None else Path(args.run) / "embeddings" / "embeddings.parquet")
        table = embed.embed_run(args.run, args.data, split=args.split, source=args.source,
                                view=args.view, network=args.network, checkpoint=args.checkpoint)
        embed.save_table(table, out)
        print(f"Wrote {len(table)} embeddings to {out}")
        return 0

    if args.command == "explore":
        from cmc_kit import explore
        out = output_file_path(args.out, "--out", "explorer.html")
        epochs_out = (None if args.over_epochs is None else
                      output_file_path(args.over_epochs, "--over-epochs", "embedding_over_epochs.html"))
        out = explore.export_html(args.run, args.data, out, split=args.split)
        print(f"Wrote {out}")
        if epochs_out is not None:
            print(f"Wrote {explore.write_epochs_html(args.run, epochs_out)}")
        return 0

    if args.command == "evaluate":
        from cmc_kit import evaluate
        out = evaluate.resolve_output(args.out)  # before the probes: minutes of work
        table = evaluate.evaluate_run(args.run, args.data, out=out)
        print(evaluate.format_table(table))
        if out is not None:
            print(f"Wrote {out}")
        return 0

    if args.command == "demo":
        from cmc_kit import demo
        demo.run_demo(out=args.out or default_paths()["runs"] / "demo", data=args.data,
                      epochs=args.epochs, n=args.n)
        return 0

    raise AssertionError(args.command)


def _cache_summary(root: Path) -> str:
    """One line about the cache `prepare` wrote, from its manifest.json."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        shards = manifest["shards"]
        samples = sum(len(s["ids"]) for s in shards)
        unreadable = sum(len(s.get("unreadable", [])) for s in shards)
        side = "x".join(str(v) for v in manifest.get("image_size", []))
    except (OSError, ValueError, KeyError, TypeError):
        return f"Wrote the cache to {root}. Train with --set data.cache={root}"
    skipped = f" ({unreadable} unreadable, skipped in training)" if unreadable else ""
    size = f" of {side} px" if side else ""
    return (f"Wrote {samples} samples{size} in {len(shards)} shard(s) to {root}{skipped}. "
            f"Train with --set data.cache={root}")


if __name__ == "__main__":
    raise SystemExit(main())
