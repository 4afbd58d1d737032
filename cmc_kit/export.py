"""Export: a run's learned encoder as a standalone Keras model, a SavedModel and a model card.

    DIR/terrain_trunk.keras   --part trunk (default): terrain stem + trunk, float32 [-1, 1] in,
                              feature map out; `keras.saving.load_model` after `import cmc_kit`
    DIR/encoder.keras         --part encoder: every view's stem, the trunk and the heads
    DIR/saved_model/          TensorFlow SavedModel, signature `serve`: uint8 terrain in ->
                              embedding out, the normalisation inside; needs no cmc_kit
    DIR/MODEL_CARD.md         data, settings, epochs/steps, evaluation, preprocessing, limits
    DIR/model_card.json       the same facts for programs

Both models are checked after writing: reloaded, and run on a fixed input against the run's own
encoder (the .keras file must match exactly; the SavedModel runs as a graph, which may round
differently, within 1e-4 of the output's scale). The differences go into the card.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from cmc_kit import layout, runs, synth
from cmc_kit.config import PRESETS, Config, preset
from cmc_kit.errors import CheckpointError, ConfigError, ExportError
from cmc_kit.fileio import atomic_path, atomic_write_text, check_folder_path

PARTS = ("trunk", "encoder")
KERAS_FILES = {"trunk": "terrain_trunk.keras", "encoder": "encoder.keras"}
SAVED_MODEL_DIR = "saved_model"
CARD_FILE = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
SERVING_ENDPOINT = "serve"
VIEW = "terrain"  # the view the SavedModel serves and the trunk part starts from
SAVED_MODEL_TOLERANCE = 1e-4  # relative to the output's largest magnitude


def check_part(part: str) -> str:
    if part not in PARTS:
        raise ConfigError(f"--part (part=) must be one of {', '.join(PARTS)}: 'trunk' is the "
                          "terrain stem + trunk, 'encoder' every view's stem, the trunk and the "
                          f"heads. Received: {part!r}")
    return part


def terrain_trunk_model(encoder):
    """A functional Keras model sharing `encoder`'s terrain stem and trunk layers.

    float32 terrain `[B, H, W, 3]` in [-1, 1] -> trunk feature map `[B, ceil(H/s), ceil(W/s), F]`
    (s = `models.input_stride(trunk)`); `model.get_layer("trunk")` is the trunk, so
    `cmc_kit.models.stage_model(model.get_layer("trunk"))` gives its stages.
    """
    import keras

    inputs = keras.Input(shape=(None, None, 3), name=VIEW)                 # [B, H, W, 3]
    stem = encoder.stem(VIEW)(inputs)                                      # [B, H/2, W/2, C0]
    features = encoder.trunk(VIEW)(stem)                                   # [B, h, w, F]
    return keras.Model(inputs, features, name="terrain_trunk")


def export_run(run: str | os.PathLike, out: str | os.PathLike, *,
               checkpoint: str | os.PathLike | None = None, part: str = "trunk",
               data: str | os.PathLike | None = None) -> dict:
    """Writes the part of `run`'s online encoder, its SavedModel and the model card into `out`.

    Args:
        checkpoint: a checkpoint of the run (`ckpt-3`, `3` or a path); None is the latest.
        part: "trunk" (terrain stem + trunk) or "encoder" (the whole CMC encoder).
        data: the dataset folder the run was trained on, named in the card (optional).
    Returns:
        {"keras": path, "saved_model": path, "card": path, "card_json": path, "checks": {...}}
    """
    check_part(part)
    check_folder_path(out, "--out (the export folder)", CheckpointError)
    handle = runs.load_run(run, checkpoint=runs.resolve_checkpoint(run, checkpoint))
    if VIEW not in handle.config.model.views:
        raise CheckpointError(f"{run} was trained on the views {', '.join(handle.config.model.views)}"
                              f" without '{VIEW}', which the exported model and its SavedModel "
                              "serve. Export a run whose model.views includes terrain.")
    from cmc_kit import layers

    out = Path(out)
    encoder = handle.encoder("online")
    model = terrain_trunk_model(encoder) if part == "trunk" else encoder
    keras_path = out / KERAS_FILES[part]
    with atomic_path(keras_path) as tmp:
        model.save(tmp)
    # Plain MirrorPad in the graph, not the XLA-compiled pad: the SavedModel then runs wherever
    # TensorFlow does, XLA or not (the two pads are bit-identical).
    with layers.xla_padding(False):
        saved_model_path = _write_saved_model(encoder, part, out / SAVED_MODEL_DIR)
    checks = verify_export(handle, encoder, keras_path, saved_model_path, part)
    card = model_card(handle, part, checks, data=data)
    card_path = atomic_write_text(out / CARD_FILE, card_markdown(card))
    card_json = atomic_write_text(out / CARD_JSON, json.dumps(card, indent=2, default=str) + "\n")
    return {"keras": keras_path, "saved_model": saved_model_path, "card": card_path,
            "card_json": card_json, "checks": checks}


# -- the SavedModel ------------------------------------------------------------------------------

def serving_outputs(encoder, part: str, images):
    """What `serve` returns for uint8 terrain `images` [B, H, W, 3] (also the reference the
    checks compare against): {"embedding": [B, D], "feature_map": [B, h, w, F]}.

    part "trunk": embedding = the feature map's spatial mean (F values, what `cmc-kit embed` and
    the probes use); part "encoder": the terrain head's (unnormalised) contrastive embedding.
    """
    from keras import ops

    from cmc_kit import views

    x = views.normalise_terrain(images)                                   # [B, H, W, 3] in [-1, 1]
    feature_map = encoder.trunk(VIEW)(encoder.stem(VIEW)(x))              # [B, h, w, F]
    if part == "trunk":
        embedding = ops.mean(feature_map, axis=(1, 2))                   # [B, F]
    else:
        embedding = encoder.head(VIEW)(feature_map)                       # [B, E]
    return {"embedding": ops.cast(embedding, "float32"),
            "feature_map": ops.cast(feature_map, "float32")}


def _write_saved_model(encoder, part: str, path: Path) -> Path:
    """A SavedModel with one endpoint, `serve(terrain: uint8 [B, H, W, 3])`, written beside
    `path` and renamed onto it (an old export is replaced only by a complete new one)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint(
        SERVING_ENDPOINT, lambda terrain: serving_outputs(encoder, part, terrain),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=VIEW)])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive.write_out(str(tmp), verbose=False)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# -- checks ----------------------------------------------------------------------------------

def probe_images(crop_size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed uint8 terrain batch [count, crop, crop, 3] for comparing models."""
    return np.random.default_rng(seed).integers(0, 256, (count, crop_size, crop_size, 3),
                                                dtype=np.uint8)


def verify_export(handle, encoder, keras_path: Path, saved_model_path: Path, part: str) -> dict:
    """Reloads both files and compares them with the run's encoder on `probe_images`.

    Raises ExportError when the .keras model differs at all or the SavedModel by more than
    SAVED_MODEL_TOLERANCE of the output's scale. Returns the largest differences.
    """
    import keras
    import tensorflow as tf

    from cmc_kit import views

    images = probe_images(handle.config.data.crop_size)
    reference = {k: np.asarray(v) for k, v in serving_outputs(encoder, part, images).items()}
    loaded = keras.saving.load_model(keras_path)
    x = views.normalise_terrain(images)
    if part == "trunk":
        keras_output = np.asarray(loaded(x))
        keras_reference = reference["feature_map"]
    else:
        keras_output = np.asarray(loaded.embed(x, VIEW))
        keras_reference = reference["embedding"]
    keras_difference = float(np.max(np.abs(keras_output - keras_reference)))
    if keras_difference != 0.0:
        raise ExportError(f"{keras_path} reloaded gives outputs that differ from the run's "
                          f"encoder by up to {keras_difference:.3g}. Please report this; the "
                          "file is not a faithful copy.")
    served = tf.saved_model.load(str(saved_model_path)).signatures[SERVING_ENDPOINT](
        **{VIEW: tf.constant(images)})
    checks = {"probe_input": f"uint8 [{', '.join(map(str, images.shape))}], seeded uniform 0..255",
              "keras_max_abs_difference": keras_difference}
    for name, value in reference.items():
        difference = float(np.max(np.abs(served[name].numpy() - value)))
        scale = max(1.0, float(np.max(np.abs(value))))
        if difference > SAVED_MODEL_TOLERANCE * scale:
            raise ExportError(f"{saved_model_path} serves a '{name}' that differs from the "
                              f"run's encoder by {difference:.3g} (scale {scale:.3g}). Please "
                              "report this; the SavedModel is not a faithful copy.")
        checks[f"saved_model_{name}_max_abs_difference"] = difference
    return checks


# -- the model card --------------------------------------------------------------------------

def closest_preset(config: Config) -> tuple[str, list[str]]:
    """The preset `config` differs least from, and the differing settings as `key=value`."""
    def flat(c: Config) -> dict:
        return {f"{section}.{key}": value for section, values in c.to_dict().items()
                for key, value in values.items()}

    mine = flat(config)
    best = None
    for name in PRESETS:
        theirs = flat(preset(name))
        diffs = [f"{key}={_show(value)}" for key, value in mine.items() if theirs[key] != value]
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    return best


def _show(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _training_summary(handle) -> dict:
    config = handle.config
    split = handle.split_ids()
    name, overrides = closest_preset(config)
    summary = {"run": str(handle.run_dir), "checkpoint": str(handle.checkpoint_path),
               "epoch": handle.epoch, "epochs_configured": config.train.epochs,
               "step": handle.step, "train_samples": len(split["train"]),
               "held_out_samples": len(split["validation"]), "preset": name,
               "overrides": overrides, "config": config.to_dict()}
    log_path = handle.run_dir / runs.LOG_FILE
    if log_path.is_file():
        import pandas as pd

        log = pd.read_csv(log_path)
        log = log[log["epoch"] <= handle.epoch]
        if len(log):
            summary["loss_first_epoch"] = float(log["loss"].iloc[0])
            summary["loss_last_epoch"] = float(log["loss"].iloc[-1])
    return summary


def _data_summary(data: str | os.PathLike | None) -> str:
    if data is None:
        return ("the dataset the run was trained on (its sample ids are in RUN/split.json; pass "
                "--data to name it here)")
    from cmc_kit.kaggle import KAGGLE_DATASET

    csv = layout.find_metadata_csv(data)
    if csv is not None and set(synth.PARAMETERS) <= set(layout.read_metadata(csv).columns):
        return f"the cmc_kit synthetic terrain set in {data} (metadata.csv: {csv})"
    return f"{data} (Kaggle layout; the Terrain Map dataset is {KAGGLE_DATASET})"


# Columns of the fine-tune table worth a card (the CSV also has per-class IoU and folders).
CARD_FINETUNE_COLUMNS = ("labels", "labelled_samples", "arm", "steps", "pixel_accuracy",
                         "mean_iou", "mean_iou_std")


def _tables(run_dir: Path) -> dict:
    """Tables the run holds: the probes (RUN/evaluation.csv) and the fine-tune (if present)."""
    import pandas as pd

    from cmc_kit import finetune

    found = {}
    candidates = {"evaluation": (run_dir / runs.EVALUATION_FILE, None),
                  "label_efficiency": (run_dir / runs.FINETUNE_DIR / finetune.TABLE_FILE,
                                       CARD_FINETUNE_COLUMNS)}
    for name, (path, columns) in candidates.items():
        if path.is_file():
            table = pd.read_csv(path)
            if columns is not None:
                table = table[[c for c in columns if c in table.columns]]
            found[name] = {"path": str(path), "rows": table.to_dict("records")}
    return found


def preprocessing(config: Config, part: str) -> dict:
    """What goes in: ranges, sizes, channel order, for the .keras model and the SavedModel."""
    from cmc_kit import models

    stride = models.input_stride(config.model.trunk)
    facts = {
        "layout": "channels last: [batch, height, width, channels]",
        "terrain": "RGB in the order R, G, B, as decoded from <id>_t.png",
        "keras_input": ("float32 in [-1, 1]: x = rgb_uint8 / 127.5 - 1" if part == "trunk" else
                        "a dict {view: float32 [B, H, W, C]}, one entry per view (see views)"),
        "saved_model_input": "uint8 terrain [B, H, W, 3] in 0..255 (normalised inside)",
        "crop_size": config.data.crop_size,
        "size": (f"trained on {config.data.crop_size}x{config.data.crop_size} crops; any H, W "
                 f"works (fully convolutional), multiples of {stride} keep the feature grid "
                 f"aligned: the feature map is [B, ceil(H/{stride}), ceil(W/{stride}), F]"),
        "total_stride": stride,
    }
    if part == "encoder":
        facts["views"] = {
            "terrain": "float32 [B, H, W, 3]: rgb / 127.5 - 1",
            "height": "float32 [B, H, W, 1]: uint16 height / 32767.5 - 1",
            "segmentation": "float32 one-hot [B, H, W, 7] of the palette classes "
                            "(cmc_kit.PALETTE, nearest colour)",
            "overview": "float32 [B, S, S, 3]: the whole terrain image resized (bilinear, "
                        "antialiased) to the crop size S, then rgb / 127.5 - 1",
        }
        facts["views"] = {v: facts["views"][v] for v in config.model.views}
    return facts


def model_card(handle, part: str, checks: dict, *, data=None) -> dict:
    """The card's facts (written as model_card.json; `card_markdown` renders them)."""
    from cmc_kit import __version__, models

    config = handle.config
    channels = models.trunk_stage_channels(config.model.trunk, config.model.width)[-1]
    outputs = {
        "keras": (f"float32 feature map [B, h, w, {channels}] (mean-pool it for a {channels}-d "
                  "embedding)" if part == "trunk" else
                  f"a dict {{view: float32 [B, {config.model.embedding_dim}]}}: each view's "
                  "unnormalised contrastive embedding"),
        "saved_model": {
            "embedding": (f"float32 [B, {channels}]: the feature map's spatial mean"
                          if part == "trunk" else
                          f"float32 [B, {config.model.embedding_dim}]: the terrain head's "
                          "unnormalised embedding (L2-normalise it for cosine similarity)"),
            "feature_map": f"float32 [B, h, w, {channels}]: the trunk's last feature map"},
    }
    return {"cmc_kit_version": __version__, "part": part, "files": {
                "keras": KERAS_FILES[part], "saved_model": SAVED_MODEL_DIR,
                "serving_signature": SERVING_ENDPOINT},
            "architecture": {"trunk": config.model.trunk, "width": config.model.width,
                             "feature_channels": channels, "views": list(config.model.views),
                             "head": config.model.head,
                             "embedding_dim": config.model.embedding_dim},
            "preprocessing": preprocessing(config, part), "outputs": outputs,
            "training": _training_summary(handle), "data": _data_summary(data),
            "tables": _tables(handle.run_dir), "checks": checks}


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    columns = list(rows[0])

    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


KAGGLE_UPLOAD = """\
kaggle models init -p DIR            # writes DIR/model-metadata.json: set ownerSlug, slug, title
kaggle models create -p DIR          # the model page (once)
kaggle models instances init -p DIR  # writes DIR/model-instance-metadata.json: set ownerSlug,
                                     #   modelSlug, instanceSlug, framework "keras", licenseName
kaggle models instances create -p DIR -r zip   # -r zip: saved_model/ is a folder, which the
                                               #   default (-r skip) would leave out"""


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md from the facts of `model_card`."""
    training, files, arch = card["training"], card["files"], card["architecture"]
    what = ("the terrain stem and the trunk" if card["part"] == "trunk" else
            "the whole encoder: every view's stem, the shared trunk and the heads")
    parts = [
        f"# Terrain encoder: cmc_kit run `{Path(training['run']).name}`",
        "",
        f"A self-supervised encoder (Contrastive Multiview Coding with Momentum Contrast, "
        f"cmc_kit {card['cmc_kit_version']}): {what}, from checkpoint "
        f"`{Path(training['checkpoint']).name}` (epoch {training['epoch']}, step "
        f"{training['step']}) of `{training['run']}`.",
        "",
        "## Files",
        "",
        "| file | what | load with |",
        "|---|---|---|",
        f"| `{files['keras']}` | {what} ({arch['trunk']} at width {arch['width']}) | "
        "`keras.saving.load_model` after `import cmc_kit` |",
        f"| `{files['saved_model']}/` | TensorFlow SavedModel, signature "
        f"`{files['serving_signature']}`: uint8 terrain in, embedding out | "
        "`tf.saved_model.load` (no cmc_kit needed) |",
        "",
    ]
    parts += _usage_lines(card)
    parts += ["## Input and preprocessing", ""]
    parts += [f"- **{key.replace('_', ' ')}**: {value}"
              for key, value in card["preprocessing"].items() if key != "views"]
    parts += [f"- view **{view}**: {text}"
              for view, text in card["preprocessing"].get("views", {}).items()]
    parts += ["", "## Outputs", "", f"- `.keras`: {card['outputs']['keras']}"]
    parts += [f"- SavedModel `{name}`: {text}"
              for name, text in card["outputs"]["saved_model"].items()]
    parts += _training_lines(card)
    parts += _card_tables(card["tables"])
    parts += _use_and_limits_lines(card)
    return "\n".join(parts)


def _usage_lines(card: dict) -> list[str]:
    files = card["files"]
    lines = ["```python", "import keras",
             "import cmc_kit  # after keras: registers cmc_kit's layers (or: import cmc_kit.models)",
             "", f'model = keras.saving.load_model("{files["keras"]}")']
    if card["part"] == "trunk":
        lines += ["x = rgb_uint8.astype('float32') / 127.5 - 1.0   # [B, H, W, 3]",
                  "feature_map = model(x)                          # [B, h, w, F]",
                  "stages = cmc_kit.models.stage_model(model.get_layer('trunk'))  # for U-Nets"]
    lines += ["```", "", "```python", "import tensorflow as tf",
              f'serve = tf.saved_model.load("{files["saved_model"]}").signatures'
              f'["{files["serving_signature"]}"]',
              "out = serve(terrain=tf.constant(rgb_uint8))  # uint8 [B, H, W, 3]",
              'out["embedding"], out["feature_map"]', "```", ""]
    return lines


def _training_lines(card: dict) -> list[str]:
    training, arch = card["training"], card["architecture"]
    overrides = ", ".join(training["overrides"]) or "none"
    loss = ""
    if "loss_first_epoch" in training:
        loss = (f" The total contrastive loss went from {training['loss_first_epoch']:.2f} "
                f"(epoch 1) to {training['loss_last_epoch']:.2f} (epoch {training['epoch']}).")
    return [
        "", "## Training", "",
        f"- **Data**: {card['data']}; {training['train_samples']} training samples, "
        f"{training['held_out_samples']} held out (never trained on).",
        f"- **Settings**: preset `{training['preset']}`, overrides: {overrides}. Views "
        f"{', '.join(arch['views'])}; {arch['head']} heads, {arch['embedding_dim']}-d embedding.",
        f"- **Length**: epoch {training['epoch']} of {training['epochs_configured']}, step "
        f"{training['step']}.{loss}",
    ]


def _use_and_limits_lines(card: dict) -> list[str]:
    training, checks = card["training"], card["checks"]
    measured = "; ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in checks.items()
                         if k != "probe_input")
    return [
        "", "## Intended use", "",
        "A feature extractor and initialisation for imagery like its training data: embeddings "
        "for retrieval, clustering and maps of a collection (UMAP), and a backbone for "
        "segmentation or regression heads (`cmc-kit finetune` measures that).",
        "", "## Limits", "",
        f"- Learned from {training['train_samples']} samples of one dataset; on other imagery "
        "(other sensors, scales, seasons) the features may not transfer. A model trained on the "
        "synthetic set knows nothing about real terrain.",
        "- The embedding is unnormalised and has no units: compare with cosine similarity, "
        "never read values as heights or classes.",
        "- The numbers above are one run's measurements on its held-out samples, not guarantees.",
        "- Not for decisions about real places (navigation, hazards, land rights).",
        "", "## Checks", "",
        f"Reloaded after writing and compared with the run's encoder on {checks['probe_input']}: "
        f"{measured}.",
        "", "## Publish on Kaggle Models (not automated)", "",
        "With the Kaggle CLI and your credentials, from the folder holding this card (DIR):",
        "", "```bash", KAGGLE_UPLOAD, "```", "",
    ]


def _card_tables(tables: dict) -> list[str]:
    titles = {"evaluation": "Evaluation: probes on the held-out samples",
              "label_efficiency": "Label efficiency: segmentation fine-tune"}
    lines = []
    for name, table in tables.items():
        lines += ["", f"## {titles[name]}", "", f"From `{table['path']}`:", "",
                  _markdown_table(table["rows"])]
    return lines
