"""The main job on the built-in synthetic dataset: synth -> train -> evaluate -> explore."""

from __future__ import annotations

from pathlib import Path

from cmc_kit.config import default_paths, preset

# 256 px synthetic images: a 64 px crop then covers 1/16 of a sample (the Kaggle set is 512 px
# with 256 crops, the same ratio at four times the cost).
DEMO_IMAGE_SIZE = 256


def ensure_synthetic(data: Path, n: int, size: int = DEMO_IMAGE_SIZE, seed: int = 0) -> Path:
    from cmc_kit import synth

    if (data / "metadata.csv").exists() and any(data.rglob("*_t.png")):
        print(f"Using the synthetic dataset in {data}")
        return data
    print(f"Generating {n} synthetic samples of {size}x{size} in {data} ...")
    return synth.generate(data, n=n, size=size, seed=seed, progress=True)


def run_demo(out: Path | str = "runs/demo", data: Path | str | None = None,
             epochs: int | None = None, n: int = 160) -> dict:
    from cmc_kit import training

    out = Path(out)
    data = Path(data) if data is not None else default_paths()["data"] / "synthetic"
    ensure_synthetic(data, n)

    config = training.resolve_config(out, preset_name=None if (out / "config.json").exists()
                                     else "cpu-demo", epochs=epochs, overrides=None, fresh=False)
    result = training.train(data, out, config)
    outputs = {"run": out, "log": out / "log.csv", "checkpoint": result.checkpoint}

    try:
        from cmc_kit import evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None:
        table = evaluate.evaluate_run(out, data, out=out / "evaluation.csv")
        print(evaluate.format_table(table))
        outputs["evaluation"] = out / "evaluation.csv"

    try:
        from cmc_kit import explore
    except ImportError:
        explore = None
    if explore is not None:
        outputs.update(explore.demo_outputs(out, data))

    print("\nWhere everything is:")
    for name, path in outputs.items():
        print(f"  {name:>12}: {path}")
    return outputs


__all__ = ["run_demo", "ensure_synthetic", "preset"]
