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

from cmc_kit import runs
from cmc_kit.config import (default_paths, parse_duration, quiet_tensorflow_by_default,
                            tensorflow_log_level)
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


RUN_HELP = "run directory (config, checkpoints, logs), as written by `cmc-kit train`"
DATA_HELP = "dataset folder holding <id>_t.png, <id>_h.png, <id>_i2.png (any depth)"
FEATURES_HELP = ("features: trunk (last stage, mean-pooled), stages (every stage, mean and std "
                 "per channel), stage<N> (stage N alone, e.g. stage1) or head")


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="folder to write (OUT/_dataset/*.png, OUT/metadata.csv)")
    p.add_argument("--n", type=int, default=128, help="number of samples, >= 1 (default 128)")
    p.add_argument("--size", type=int, default=512,
                   help="image side in pixels, >= 16 (default 512)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; sample i depends only on (seed, i) (default 0)")


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help=DATA_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", type=Path, default=None, help="folder to download into "
                   "(default: data/ beside the runs, /kaggle/working/data on Kaggle)")
    p.add_argument("--force", action="store_true", help="download again even if already complete")


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help=DATA_HELP)
    p.add_argument("cache", type=Path, help="cache folder to write; train with "
                   "--set data.cache=CACHE")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--run", type=Path, required=True,
                   help="run directory: created if new, resumed if it holds a checkpoint")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="discard RUN's checkpoints and start over (ignores an attached Kaggle "
                        "output)")
    p.add_argument("--time-limit", type=str, default=None,
                   help="checkpoint and stop cleanly before this much wall time, e.g. 11.5h, 90m")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a previous run directory (e.g. an attached Kaggle notebook output) to "
                        "continue")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    p.add_argument("--json", action="store_true", help="print everything, config included, as JSON")


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP + "; the run's split is used")
    p.add_argument("--out", type=Path, default=None,
                   help=".parquet or .csv file to write; an existing folder gets "
                        "embeddings.parquet inside (default: RUN/embeddings/embeddings.parquet)")
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"],
                   help="which samples of the run's split to embed (default: validation)")
    p.add_argument("--source", default="trunk", help=FEATURES_HELP + " (default: trunk)")
    p.add_argument("--view", default="terrain",
                   help="input view to embed: terrain, segmentation, height or overview; it must "
                        "be one of the run's model.views (default: terrain)")
    p.add_argument("--network", default="online", choices=["online", "momentum"],
                   help="online network or its momentum (EMA) twin (default: online)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint, e.g. RUN/checkpoints/ckpt-3 or ckpt-3 (default: latest)")


def _explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--out", type=Path, required=True,
                   help="HTML page to write; an existing folder gets explorer.html inside")
    p.add_argument("--split", default="all", choices=["validation", "train", "all"],
                   help="which samples of the run's split to show (default: all)")
    p.add_argument("--over-epochs", type=Path, default=None, metavar="HTML",
                   help="also write an animated page of the held-out subset's UMAP after each "
                        "epoch (from RUN/embeddings/epoch_NNN.parquet)")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, action="append",
                   help=RUN_HELP + "; repeat it for several runs of one recipe (e.g. seeds): the "
                        "table then gives their mean and a 95%% interval over them")
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--out", type=Path, default=None,
                   help="CSV file for the table; an existing folder gets evaluation.csv inside "
                        "(checked before the probes run; default: print only)")
    p.add_argument("--features", default="trunk",
                   help=FEATURES_HELP + "; the random-init baseline uses the same (default: trunk)")
    p.add_argument("--per-target", action="store_true",
                   help="also one row per class fraction")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/demo in the repository, or "
                        "/kaggle/working/runs/demo)")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset (default: data/synthetic beside the runs; generated if absent)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs to reach")
    p.add_argument("--n", type=int, default=400, help="synthetic samples to generate if absent")


# command -> (help, arguments); in the order `cmc-kit --help` lists them.
_PARSERS = {
    "synth": ("write a synthetic terrain dataset in the Kaggle layout", _synth_arguments),
    "validate": ("report usable / incomplete / unreadable samples", _validate_arguments),
    "download": ("get the Kaggle Terrain Map dataset (or find it on Kaggle)", _download_arguments),
    "prepare": ("build the fast training cache from the PNGs", _prepare_arguments),
    "train": ("train (resumes automatically when RUN holds a checkpoint)", _train_arguments),
    "info": ("epoch, step, queue fill, config and latest checkpoint of a run", _info_arguments),
    "embed": ("embeddings table of a run's held-out split", _embed_arguments),
    "explore": ("UMAP + standalone interactive explorer page", _explore_arguments),
    "evaluate": ("kNN / linear-probe table vs baselines", _evaluate_arguments),
    "demo": ("synth -> train -> evaluate -> explore on the synthetic set", _demo_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmc-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments) in _PARSERS.items():
        extra = (dict(epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
                 if name == "train" else {})
        add_arguments(sub.add_parser(name, help=text, **extra))
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow_by_default()  # before TensorFlow is imported
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
        if isinstance(err, CmcKitError):
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
        state = json.loads((run / runs.STATE_FILE).read_text())
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
    from cmc_kit.errors import ConfigError
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
    min_level = tensorflow_log_level()
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
    check = _ARGUMENT_CHECKS.get(args.command)
    if check is not None:  # checks that need no data: a wrong path fails before TensorFlow loads
        check(args)
    if args.command in _TENSORFLOW_COMMANDS or (
            args.command == "info" and (Path(args.run) / runs.CONFIG_FILE).is_file()):
        _import_tensorflow_quietly()
    return _COMMANDS[args.command](args)


def _check_synth(args: argparse.Namespace) -> None:
    from cmc_kit.errors import DataError

    _check_synth_args(args)
    check_folder_path(args.out, "The output folder", DataError)


def _check_prepare(args: argparse.Namespace) -> None:
    from cmc_kit.errors import DataError

    check_folder_path(args.cache, "The cache folder", DataError)


def _check_train(args: argparse.Namespace) -> None:
    from cmc_kit.errors import CheckpointError

    check_folder_path(args.run, "--run", CheckpointError)
    if args.resume_from is not None and args.resume_from.exists() and not args.resume_from.is_dir():
        raise CheckpointError(f"--resume-from {args.resume_from} is a file; give the previous "
                              "run's folder.")


def _check_demo(args: argparse.Namespace) -> None:
    from cmc_kit.errors import CheckpointError, DataError

    check_folder_path(args.out, "--out (the demo's run directory)", CheckpointError)
    check_folder_path(args.data, "--data", DataError)


def _synth(args: argparse.Namespace) -> int:
    from cmc_kit import synth

    root = synth.generate(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"Wrote {args.n} synthetic samples to {root}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from cmc_kit import data

    report = data.validate(args.data, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.num_usable > 0 else 1


def _download(args: argparse.Namespace) -> int:
    from cmc_kit import kaggle

    print(kaggle.download(dest=args.dest, force=args.force))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from cmc_kit import cache

    root = cache.prepare_cache(args.data, args.cache)
    print(_cache_summary(Path(root)))
    return 0


def train_from_cli(*, data, run, preset_name=None, epochs=None, overrides=None, fresh=False,
                   time_limit=None, resume_from=None):
    """`cmc-kit train`: settings from the saved run, --preset and --set, then `training.train`
    with the per-epoch held-out embeddings; prints where the run stands."""
    from cmc_kit import embed, training

    runs.refuse_fresh_with_resume_from(fresh, resume_from)
    # First: a previous run's config.json is the saved one. On several machines (TF_CONFIG)
    # the chief alone brings it in; the others wait for it inside `train`.
    if training.cluster.writes_run_directory(training.cluster.cluster_from_environment()):
        runs.bring_in_previous_run(run, resume_from, fresh=fresh)
    config = runs.resolve_config(run, preset_name=preset_name, epochs=epochs,
                                 overrides=overrides, fresh=fresh)
    result = training.train(data, run, config, fresh=fresh, time_limit=time_limit,
                            callbacks=[embed.EpochEmbeddings()])
    print(f"{result.status}: epoch {result.epoch}, step {result.step}; run directory {result.run}")
    return result


def _train(args: argparse.Namespace) -> int:
    train_from_cli(data=args.data, run=args.run, preset_name=args.preset, epochs=args.epochs,
                   overrides=args.overrides, fresh=args.fresh,
                   time_limit=parse_duration(args.time_limit), resume_from=args.resume_from)
    return 0


def _info(args: argparse.Namespace) -> int:
    info = runs.run_info(args.run)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if key != "config":
                print(f"{key:>18}: {value}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from cmc_kit import embed

    out = (output_file_path(args.out, "--out", runs.EMBEDDINGS_TABLE, (".parquet", ".csv"))
           if args.out is not None
           else Path(args.run) / runs.EMBEDDINGS_DIR / runs.EMBEDDINGS_TABLE)
    table = embed.embed_run(args.run, args.data, split=args.split, source=args.source,
                            view=args.view, network=args.network, checkpoint=args.checkpoint)
    embed.save_table(table, out)
    print(f"Wrote {len(table)} embeddings to {out}")
    return 0


def _explore(args: argparse.Namespace) -> int:
    from cmc_kit import explore

    out = output_file_path(args.out, "--out", runs.EXPLORER_FILE)
    epochs_out = (None if args.over_epochs is None else
                  output_file_path(args.over_epochs, "--over-epochs", runs.EPOCHS_PAGE_FILE))
    print(f"Wrote {explore.export_html(args.run, args.data, out, split=args.split)}")
    if epochs_out is not None:
        print(f"Wrote {explore.write_epochs_html(args.run, epochs_out)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cmc_kit import evaluate

    out = evaluate.resolve_output(args.out)  # before the probes: minutes of work
    options = dict(out=out, features=args.features, per_target=args.per_target)
    if len(args.run) == 1:
        table = evaluate.evaluate_run(args.run[0], args.data, **options)
    else:
        table = evaluate.evaluate_runs(args.run, args.data, **options)
    print(evaluate.format_table(table))
    if out is not None:
        print(f"Wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cmc_kit import demo

    demo.run_demo(out=args.out or default_paths()["runs"] / "demo", data=args.data,
                  epochs=args.epochs, n=args.n)
    return 0


_ARGUMENT_CHECKS = {"synth": _check_synth, "prepare": _check_prepare, "train": _check_train,
                    "demo": _check_demo}
_COMMANDS = {"synth": _synth, "validate": _validate, "download": _download, "prepare": _prepare,
             "train": _train, "info": _info, "embed": _embed, "explore": _explore,
             "evaluate": _evaluate, "demo": _demo}


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
