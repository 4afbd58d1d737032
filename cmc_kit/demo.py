"""The main job on the built-in synthetic dataset: synth -> train -> evaluate -> explore."""

from __future__ import annotations

from pathlib import Path

from cmc_kit.config import default_paths
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
    from cmc_kit import data as data_module
    from cmc_kit import embed, evaluate, runs, training

    out = Path(out)
    data = Path(data) if data is not None else default_paths()["data"] / "synthetic"
    ensure_synthetic(data, n)

    config = runs.resolve_config(out, preset_name=None if (out / runs.CONFIG_FILE).exists()
                                 else "cpu-demo", epochs=epochs)
    result = training.train(data, out, config, callbacks=[embed.EpochEmbeddings()])
    outputs = {"run": out, "log": out / runs.LOG_FILE, "checkpoint": result.checkpoint}

    dataset = data_module.Dataset.find(data)  # once, for the evaluation and the explorer
    # The probes score the 4x4 crops of 64 px that tile each 256 px image, not only its centre:
    # 85 held-out images give 1,360 scored crops (the intervals still resample whole images).
    grid = evaluate.tiling_grid(dataset.catalog, config.data.crop_size)
    table = evaluate.evaluate_run(out, dataset=dataset, out=out / runs.EVALUATION_FILE, grid=grid)
    print(evaluate.format_table(table))
    outputs["evaluation"] = out / runs.EVALUATION_FILE

    outputs.update(write_explorer_outputs(out, dataset))

    print("\nWhere everything is:")
    for name, path in outputs.items():
        print(f"  {name:>12}: {path}")
    return outputs


def write_explorer_outputs(run: Path, dataset) -> dict:
    """One embedding pass over every sample of a `data.Dataset` -> table, UMAP, standalone page
    and mosaic; the animated page of the per-epoch embeddings when the trainer wrote them."""
    from cmc_kit import embed, explore, runs

    table = embed.embed_run(run, dataset=dataset, split="all", progress=False)
    table_path = embed.save_table(table, run / runs.EMBEDDINGS_DIR / runs.EMBEDDINGS_TABLE)
    layout = embed.umap_layout(embed.embedding_matrix(table), cache_dir=run / runs.UMAP_CACHE_DIR)
    page = explore.write_explorer_html(table, layout, run / runs.EXPLORER_FILE,
                                       catalog=dataset.catalog,
                                       title=f"{run.name}: trunk / terrain, epoch "
                                             f"{table.attrs.get('epoch')}", progress=False)
    picture = explore.mosaic(layout, run / runs.MOSAIC_FILE, catalog=dataset.catalog,
                             ids=list(table["id"]))
    outputs = {"embeddings": table_path, "explorer": page, "mosaic": picture}
    if explore.epoch_tables(run):  # the held-out subset after each epoch, animated
        try:
            outputs["over epochs"] = explore.write_epochs_html(run)
        except CmcKitError as err:  # the other outputs stand without it
            print(f"No embedding-over-epochs page: {err}")
    return outputs


__all__ = ["run_demo", "ensure_synthetic", "write_explorer_outputs"]
