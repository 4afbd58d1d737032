"""What each `cmc-kit` command takes: its arguments and help texts (`build_parser`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def kaggle_commands():
    """The `kaggle bundle|push` group: its own table and one function per subcommand."""
    from cmc_kit.kaggle import commands

    return commands


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
CHECKPOINT_HELP = "N, ckpt-N or RUN/checkpoints/ckpt-N (default: the latest)"


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out file that is not this command's own earlier "
                        "output (the run's training files are never replaced)")


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
    p.add_argument("--dest", type=Path, default=None, help="folder to download into (default: "
                   "kagglehub's cache if installed, else data/terrain, on Kaggle under /kaggle/working)")
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
    _add_force(p)


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
    _add_force(p)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, action="append",
                   help=RUN_HELP + "; repeat it for several runs of one recipe (e.g. seeds): the "
                        "table then gives their mean and a 95%% interval over them")
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--out", type=Path, default=None,
                   help="CSV file for the table; an existing folder gets evaluation.csv inside "
                        "(checked before the probes run; default: print only)")
    p.add_argument("--features", default="stages",
                   help=FEATURES_HELP + "; the random-init baseline uses the same (default: "
                                        "stages)")
    p.add_argument("--per-target", action="store_true",
                   help="also one row per class fraction")
    p.add_argument("--grid", type=int, default=1,
                   help="score GRID x GRID crops of every held-out and training sample (a tiling "
                        "of the image) instead of its centre crop: firmer figures from few "
                        "samples, GRID^2 times the embedding work; intervals still resample "
                        "whole samples (default: 1, the centre crop)")
    _add_force(p)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder for the .keras model, "
                   "saved_model/, MODEL_CARD.md and model_card.json (an older export is replaced)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--part", default="trunk", choices=["trunk", "encoder"], help="trunk: the "
                   "terrain stem + trunk (default); encoder: every view's stem, trunk and head")
    p.add_argument("--data", type=Path, default=None, help="the run's dataset, for the card")


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help=RUN_HELP)
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP + "; the run's split is used")
    p.add_argument("--labels", default="0.01,0.1,1.0", help="fractions in (0, 1] of the training "
                   "split that keep their labels (default 0.01,0.1,1.0)")
    p.add_argument("--epochs", type=int, default=10, help="steps of every arm, in passes' worth "
                   "of the whole training split (default 10)")
    p.add_argument("--checkpoint", default=None, help="pretrained weights; " + CHECKPOINT_HELP)
    p.add_argument("--seed", type=int, default=0, help="labelled subsets, data order and decoder "
                   "initialisation (default 0); other seeds show the spread between runs")
    p.add_argument("--out", type=Path, default=None, help="CSV file for the table; a folder gets "
                   "label_efficiency.csv (default: RUN/finetune/label_efficiency.csv)")


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
    "kaggle": ("to Kaggle: `kaggle bundle OUT` (a wheel dataset), `kaggle push` (the notebooks)",
               lambda p: kaggle_commands().add_arguments(p)),
    "prepare": ("build the fast training cache from the PNGs", _prepare_arguments),
    "train": ("train (resumes automatically when RUN holds a checkpoint)", _train_arguments),
    "info": ("epoch, step, queue fill, config and latest checkpoint of a run", _info_arguments),
    "embed": ("embeddings table of a run's held-out split", _embed_arguments),
    "explore": ("UMAP + standalone interactive explorer page", _explore_arguments),
    "evaluate": ("kNN / linear-probe table vs baselines", _evaluate_arguments),
    "export": ("the encoder as .keras + SavedModel + model card", _export_arguments),
    "finetune": ("segmentation fine-tune vs random init: the label-efficiency table",
                 _finetune_arguments),
    "demo": ("synth -> train -> evaluate -> explore on the synthetic set", _demo_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmc-kit", description="`cmc-kit` command line "
                                                                  "(also `python -m cmc_kit`).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments) in _PARSERS.items():
        extra = (dict(epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
                 if name == "train" else {})
        add_arguments(sub.add_parser(name, help=text, **extra))
    return parser
