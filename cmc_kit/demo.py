"""The main job on the built-in synthetic dataset: synth -> train -> evaluate -> explore."""

from __future__ import annotations

from pathlib import Path

from cmc_kit.config import default_paths, preset
from cmc_kit.errors import CmcKitError

# 256 px synthetic images: a 64 px crop then covers 1/16 of a sample (the Kaggle set is 512 px
# with 256 crops, the same ratio at four times the cost).
DEMO_IMAGE_SIZE = 256


def ensure_synthetic(data: Path, n: int, size: int = DEMO_IMAGE_SIZE, seed: int = 0) -> Path:
    from cmc_kit import synth

    if (data / "metadata.csv").exists() and any(data.rglob("*_t.png")):
        print(f"Using the synthetic dataset in {data}")
        return data
    if data.is_dir() and next(data.rglob("*_t.png"), None) is not None:
        from cmc_kit.errors import DataError

        raise DataError(f"{data} already holds a dataset that is not a cmc_kit synthetic set (no "
                        "metadata.csv); synthetic samples would mix with its files. Generate the "
                        "synthetic set in another folder (e.g. data/synthetic), or use this one "
                        "as it is.")
    print(f"Generating {n} synthetic samples of {size}x{size} in {data} ...")
    return synth.generate(data, n=n, size=size, seed=seed, progress=True)


def run_demo(out: Path | str = "runs/demo", data: Path | str | None = None,
             epochs: int | None = None, n: int = 400) -> dict:
    from cmc_kit import training

    out = Path(out)
    data = Path(data) if data is not None else default_paths()["data"] / "synthetic"
    ensure_synthetic(data, n)

    config = training.resolve_config(out, preset_name=None if (out / "config.json").exists()
                                     else "cpu-demo", epochs=epochs, overrides=None, fresh=False)
    result = training.train(data, out, config)
    outputs = {"run": out, "log": out / "log.csv", "checkpoint": result.checkpoint}

    from cmc_kit import evaluate

    table = evaluate.evaluate_run(out, data, out=out / "evaluation.csv")
    print(evaluate.format_table(table))
    outputs["evaluation"] = out / "evaluation.csv"

    outputs.update(write_explorer_outputs(out, data))

    print("\nWhere everything is:")
    for name, path in outputs.items():
        print(f"  {name:>12}: {path}")
    return outputs


def write_explorer_outputs(run: Path, data: Path) -> dict:
    """One embedding pass over every sample -> table, UMAP, standalone page and mosaic; the
    animated page of the per-epoch embeddings when the trainer wrote them."""
    from cmc_kit import data as data_module
    from cmc_kit import embed, explore

    table = embed.embed_run(run, data, split="all", progress=False)
    table_path = embed.save_table(table, run / "embeddings" / "embeddings.parquet")
    layout = embed.umap_layout(embed.embedding_matrix(table), cache_dir=run / "umap_cache")
    catalog = data_module.discover(data)
    page = explore.write_explorer_html(table, layout, run / "explorer.html", catalog=catalog,
                                       title=f"{run.name}: trunk / terrain, epoch "
                                             f"{table.attrs.get('epoch')}", progress=False)
    picture = explore.mosaic(layout, run / "mosaic.png", catalog=catalog, ids=list(table["id"]))
    outputs = {"embeddings": table_path, "explorer": page, "mosaic": picture}
    if explore.epoch_tables(run):  # the held-out subset after each epoch, animated
        try:
            outputs["over epochs"] = explore.write_epochs_html(run)
        except CmcKitError as err:  # the other outputs stand without it
            print(f"No embedding-over-epochs page: {err}")
    return outputs


__all__ = ["run_demo", "ensure_synthetic", "preset"]
