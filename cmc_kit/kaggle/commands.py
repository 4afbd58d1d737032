"""`cmc-kit kaggle bundle|push`: the subcommand group's arguments and one function per
subcommand, in the same table form as cmc_kit/cli.py (which hands `kaggle` over to this module)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _bundle_arguments(p: argparse.ArgumentParser) -> None:
    from cmc_kit.kaggle.bundle import KAGGLE_PLATFORM, KAGGLE_PYTHON, WHEELS_SLUG

    p.add_argument("out", type=Path, help="folder to write, new or a previous bundle: cmc_kit's "
                   "wheel, the dependency wheels and dataset-metadata.json (all of it becomes "
                   "the Kaggle dataset)")
    p.add_argument("--user", default=None, help="your kaggle.com user name, the dataset's owner "
                   "(default: KAGGLE_USERNAME, else kaggle.json's)")
    p.add_argument("--slug", default=WHEELS_SLUG, help=f"the dataset's slug (default {WHEELS_SLUG})")
    p.add_argument("--python-version", default=KAGGLE_PYTHON, help="the Python of Kaggle's "
                   f"notebooks the dependency wheels are for (default {KAGGLE_PYTHON})")
    p.add_argument("--platform", default=KAGGLE_PLATFORM, help="the platform tag of Kaggle's "
                   f"notebooks; older manylinux tags are included (default {KAGGLE_PLATFORM})")
    p.add_argument("--source", type=Path, default=None, help="the cmc_kit checkout to build "
                   "(default: the one this cmc-kit runs from)")
    p.add_argument("--no-build-isolation", action="store_true", help="build the wheel with this "
                   "environment's setuptools (>= 77) instead of fetching one")


def _push_arguments(p: argparse.ArgumentParser) -> None:
    from cmc_kit.kaggle.kernels import ACCELERATORS

    p.add_argument("--dry-run", type=Path, default=None, metavar="DIR", help="only write the "
                   "kernel folders into DIR, one per notebook, each ready for `kaggle kernels "
                   "push -p DIR/NN_name`")
    p.add_argument("--accelerator", choices=list(ACCELERATORS), default="gpu-t4x2",
                   help="for 02 and later; 01 runs on the CPU (default gpu-t4x2)")
    p.add_argument("--internet", action="store_true", help="turn the kernels' Internet on "
                   "(needed only for a CMC_KIT_SOURCE install; the wheel dataset works offline)")
    p.add_argument("--user", default=None, help="your kaggle.com user name, the kernels' owner "
                   "(default: KAGGLE_USERNAME, kaggle.json's, or the API's)")
    p.add_argument("--wheels-dataset", default=None, metavar="OWNER/SLUG", help="the wheel "
                   "dataset of `cmc-kit kaggle bundle` to attach (default: USER/cmc-kit-wheels)")
    p.add_argument("--only", default=None, metavar="NN[,NN]", help="push only these notebooks, "
                   "e.g. 03,04 (to run them once 02's version has finished)")
    p.add_argument("--notebooks", type=Path, default=None, help="folder of the NN_name.ipynb "
                   "notebooks (default: the checkout's notebooks/)")


# subcommand -> (help, arguments); in the order `cmc-kit kaggle --help` lists them.
_PARSERS = {
    "bundle": ("the wheel dataset that installs cmc_kit in a Kaggle notebook, Internet off",
               _bundle_arguments),
    "push": ("the notebooks as Kaggle kernels, pushed in order (or written with --dry-run)",
             _push_arguments),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands under `cmc-kit kaggle`; the chosen one lands in `args.subcommand`."""
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND",
                                help="bundle (the wheel dataset) or push (the notebooks)")
    for name, (text, add_subcommand_arguments) in _PARSERS.items():
        add_subcommand_arguments(sub.add_parser(name, help=text, description=text))


def run(args: argparse.Namespace) -> int:
    return _COMMANDS[args.subcommand](args)


def _bundle(args: argparse.Namespace) -> int:
    from cmc_kit.kaggle.bundle import build_bundle
    from cmc_kit.kaggle.credentials import require_username

    bundle = build_bundle(args.out, user=require_username(args.user), slug=args.slug,
                          source=args.source, python_version=args.python_version,
                          platform=args.platform, build_isolation=not args.no_build_isolation)
    print(f"Wrote the wheel dataset {bundle.dataset_id} to {bundle.folder}:")
    for wheel in bundle.wheels:
        print(f"  {wheel}")
    create, version = bundle.next_commands()
    print(f"Next, upload it: {create}\n(later updates: {version}), then `cmc-kit kaggle push`.")
    return 0


def _push(args: argparse.Namespace) -> int:
    from cmc_kit.kaggle.kernels import push_notebooks

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    result = push_notebooks(user=args.user, dry_run=args.dry_run, notebooks_dir=args.notebooks,
                            only=only, accelerator=args.accelerator, internet=args.internet,
                            wheels_dataset=args.wheels_dataset)
    if args.dry_run is not None:
        for kernel in result:
            print(f"{kernel.folder}  ({kernel.id})")
        print(f"Push one with `kaggle kernels push -p {result[0].folder}`, or all of them in "
              "order with `cmc-kit kaggle push`.")
    return 0


_COMMANDS = {"bundle": _bundle, "push": _push}
