"""`cmc-kit` command line (also `python -m cmc_kit`).

Each subcommand is a thin shim over a library function; heavy modules are imported lazily so
`cmc-kit --help` and `cmc-kit validate` start fast. Errors a user can fix are printed as one line,
`cmc-kit COMMAND: error: ...`, with exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path

from cmc_kit import runs
from cmc_kit.arguments import build_parser, kaggle_commands
from cmc_kit.config import default_paths, parse_duration, quiet_tensorflow_by_default
from cmc_kit.fileio import check_folder_path
from cmc_kit.startup import import_tensorflow_quietly

# Commands that import TensorFlow (through views, models or training).
_TENSORFLOW_COMMANDS = {"prepare", "train", "embed", "explore", "evaluate", "export", "finetune",
                        "demo"}


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow_by_default()  # before TensorFlow is imported
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, [args.command, getattr(args, "subcommand", None)]))  # kaggle push
    try:
        with warnings.catch_warnings():
            # Warnings read like the errors: `cmc-kit train: warning: ...`, not a source line.
            warnings.showwarning = functools.partial(_show_warning, name)
            return _dispatch(args)
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for the errors we raise on purpose
        from cmc_kit.errors import CmcKitError
        if isinstance(err, CmcKitError):
            message = " ".join(str(err).split("\n"))
            print(f"cmc-kit {name}: error: {message}", file=sys.stderr)
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


# -- commands -----------------------------------------------------------------------------------

def _dispatch(args: argparse.Namespace) -> int:
    check = _ARGUMENT_CHECKS.get(args.command)
    if check is not None:  # checks that need no data: a wrong path fails before TensorFlow loads
        check(args)
    if args.command in _TENSORFLOW_COMMANDS or (
            args.command == "info" and (Path(args.run) / runs.CONFIG_FILE).is_file()):
        import_tensorflow_quietly()
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


def _check_export(args: argparse.Namespace) -> None:
    from cmc_kit.errors import CheckpointError

    check_folder_path(args.out, "--out (the export folder)", CheckpointError)


def _check_finetune(args: argparse.Namespace) -> None:
    from cmc_kit import finetune

    finetune.parse_labels(args.labels)
    finetune.resolve_output(args.out, args.run)


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


def _kaggle(args: argparse.Namespace) -> int:
    return kaggle_commands().run(args)


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
    # On several machines (TF_CONFIG) the chief alone locks the run and brings in a previous
    # run's config.json; the others wait for it inside `train`.
    chief = training.cluster.writes_run_directory(training.cluster.cluster_from_environment())
    with runs.RunLock(run) if chief else contextlib.nullcontext():  # before anything touches RUN
        if chief:  # first: a previous run's config.json is the saved one
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
            if key == "damaged_checkpoints":
                for path, problem in value.items():
                    print(f"{'damaged':>18}: {path}: {problem}")
            elif key != "config":
                print(f"{key:>18}: {value}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from cmc_kit import embed

    out = runs.output_path(
        args.out if args.out is not None
        else Path(args.run) / runs.EMBEDDINGS_DIR / runs.EMBEDDINGS_TABLE,
        run=args.run, what="--out", default_name=runs.EMBEDDINGS_TABLE,
        suffixes=(".parquet", ".csv"), kind="an embeddings table",
        looks_like_ours=embed.is_embeddings_table, force=args.force)
    table = embed.embed_run(args.run, args.data, split=args.split, source=args.source,
                            view=args.view, network=args.network, checkpoint=args.checkpoint)
    embed.save_table(table, out)
    print(f"Wrote {len(table)} embeddings to {out}")
    return 0


def _explore(args: argparse.Namespace) -> int:
    from cmc_kit import explore

    page = dict(run=args.run, suffixes=(".html", ".htm"), kind="a page",
                looks_like_ours=explore.is_cmc_kit_page, force=args.force)
    out = runs.output_path(args.out, what="--out", default_name=runs.EXPLORER_FILE, **page)
    epochs_out = (None if args.over_epochs is None else
                  runs.output_path(args.over_epochs, what="--over-epochs",
                                   default_name=runs.EPOCHS_PAGE_FILE, **page))
    print(f"Wrote {explore.export_html(args.run, args.data, out, split=args.split)}")
    if epochs_out is not None:
        print(f"Wrote {explore.write_epochs_html(args.run, epochs_out)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cmc_kit import evaluate

    # Before the probes, which take minutes.
    out = evaluate.resolve_output(args.out, args.run[0], force=args.force)
    options = dict(out=out, features=args.features, per_target=args.per_target, grid=args.grid)
    if len(args.run) == 1:
        table = evaluate.evaluate_run(args.run[0], args.data, **options)
    else:
        table = evaluate.evaluate_runs(args.run, args.data, **options)
    print(evaluate.format_table(table))
    if out is not None:
        print(f"Wrote {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cmc_kit import export

    written = export.export_run(args.run, args.out, checkpoint=args.checkpoint, part=args.part,
                                data=args.data)
    print("\n".join(f"Wrote {written[key]}" for key in ("keras", "saved_model", "card")))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from cmc_kit import finetune

    table = finetune.finetune_run(args.run, args.data, labels=args.labels, epochs=args.epochs,
                                  checkpoint=args.checkpoint, out=args.out, seed=args.seed)
    print(f"{finetune.format_table(table)}\nWrote {table.attrs['out']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cmc_kit import demo

    demo.run_demo(out=args.out or default_paths()["runs"] / "demo", data=args.data,
                  epochs=args.epochs, n=args.n)
    return 0


_ARGUMENT_CHECKS = {"synth": _check_synth, "prepare": _check_prepare, "train": _check_train,
                    "export": _check_export, "finetune": _check_finetune, "demo": _check_demo}
_COMMANDS = {"synth": _synth, "validate": _validate, "download": _download, "kaggle": _kaggle,
             "prepare": _prepare, "train": _train, "info": _info, "embed": _embed,
             "explore": _explore, "evaluate": _evaluate, "export": _export,
             "finetune": _finetune, "demo": _demo}


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
