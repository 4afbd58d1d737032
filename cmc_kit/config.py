"""Run configuration: frozen dataclasses, named presets, JSON round trip, dotted overrides;
and the environment: Kaggle or not, default paths, TensorFlow's log level.

Only this module and `kaggle.py` look at the environment; everything else takes its settings as
arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmc_kit.errors import ConfigError
from cmc_kit.fileio import atomic_write_text

ALL_VIEWS = ("terrain", "segmentation", "height", "overview")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker", "tpu")
TRUNK_NAMES = (
    "resnet34",
    "resnet18",
    "original",
    "regnetx-200mf",
    "regnetx-400mf",
    "regnetx-800mf",
    "regnetx-1.6gf",
    "regnetx-3.2gf",
)


@dataclass(frozen=True)
class DataConfig:
    crop_size: int = 256              # 256 as in the original; 64 for CPU runs
    batch_size: int = 5               # global batch (split across replicas)
    validation_fraction: float = 0.1  # held out by sample id, never trained on
    split_seed: int = 0
    augment: bool = False             # aligned flips / 90-degree rotations of the crops
    cache: str = ""                   # path of a `cmc-kit prepare` cache; "" reads the PNGs
    allow_changed_data: bool = False  # resume although the dataset's images changed size

    def __post_init__(self):
        _check(self.crop_size >= 8, "data.crop_size", self.crop_size, "an integer >= 8")
        _check(self.batch_size >= 2, "data.batch_size", self.batch_size, "an integer >= 2")
        _check(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction",
               self.validation_fraction, "a fraction in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    views: tuple[str, ...] = ALL_VIEWS
    trunk: str = "resnet34"           # see TRUNK_NAMES; regnetx-* use grouped convs
    width: float = 1.0                # channel multiplier of the trunk
    head: str = "mlp"                 # "mlp" or "attention"
    embedding_dim: int = 128
    shared_trunk: bool = True         # one trunk for all views (seed Update 1) or one per view
    share_overview_stem: bool = True  # overview reuses the terrain stem, as in the original
    attention_heads: int = 3
    attention_dim: int = 64
    branch_gain: float = 1.0          # residual branches: shortcut + gain * branch at init
    learnable_gain: bool = False      # the gain is a trainable scalar per block (0 + this: ReZero)

    def __post_init__(self):
        views = tuple(self.views)
        object.__setattr__(self, "views", views)
        unknown = [v for v in views if v not in ALL_VIEWS]
        _check(not unknown and len(views) >= 2 and len(set(views)) == len(views),
               "model.views", views, f"two or more distinct names from {ALL_VIEWS}")
        _check(self.trunk in TRUNK_NAMES, "model.trunk", self.trunk, f"one of {TRUNK_NAMES}")
        _check(self.head in ("mlp", "attention"), "model.head", self.head, "'mlp' or 'attention'")
        _check(_positive(self.width), "model.width", self.width, "a positive number")
        _check(self.embedding_dim >= 2, "model.embedding_dim", self.embedding_dim, ">= 2")
        _check(self.attention_heads >= 1, "model.attention_heads", self.attention_heads,
               "an integer >= 1")
        _check(self.attention_dim >= 1, "model.attention_dim", self.attention_dim,
               "an integer >= 1")
        _check(math.isfinite(self.branch_gain), "model.branch_gain", self.branch_gain,
               "a finite number (0 with model.learnable_gain=true is ReZero)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    learning_rate: float = 1e-4       # Adam, as the original
    beta_1: float = 0.9
    clipnorm: float = 100.0
    lr_schedule: str = "constant"     # "constant" or "cosine" (after warmup)
    warmup_steps: int = 0
    momentum: float = 0.99            # EMA of the key encoder
    momentum_schedule: str = "constant"  # "constant" or "cosine" (ramps momentum to 1)
    temperature: float = 0.07
    loss: str = "infonce"             # "infonce" (MoCo) or "nce" (the original's CMC NCE)
    pairs: str = "original"           # "original", "full", "core:<view>" or "a-b,c-d,..."
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    queue_multiplier: int = 10        # queue size K = multiplier x global batch
    positive: str = "momentum"        # positive key from "momentum" (MoCo) or "online" (original)
    seed: int = 0                     # data order, crops and initialisation
    checkpoint_every_steps: int = 0   # 0: only at epoch end
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 20     # consecutive skipped steps before stopping
    mixed_precision: str = "off"      # "off", "auto", "mixed_float16", "mixed_bfloat16"
    jit_compile: bool = True          # XLA, used only with a GPU/TPU (on CPU it slows grouped convs ~9x)
    deterministic: bool = False       # tf.config.experimental.enable_op_determinism
    log_every_steps: int = 0          # per-step rows in log_steps.csv; 0 = off
    eval_subset: int = 64             # fixed held-out samples embedded every epoch
    knn_every_epoch: bool = True      # cheap online kNN accuracy on the eval subset
    strategy: str = "auto"            # "auto", "default", "mirrored", "multi-worker", "tpu"
    # Multi-worker only: seconds a collective (all-reduce, all-gather) waits for the other
    # workers before the step fails with a message instead of hanging; 0 waits forever. A dead
    # worker is noticed sooner (TensorFlow's heartbeats, ~10 s); this bounds a stuck one. Allow
    # for the chief's epoch-end work (held-out embeddings), which the others wait for.
    collective_timeout: float = 1800.0

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(_positive(self.learning_rate), "train.learning_rate", self.learning_rate,
               "a positive number")
        _check(0.0 <= self.beta_1 < 1.0, "train.beta_1", self.beta_1, "a value in [0, 1)")
        _check(_positive(self.clipnorm), "train.clipnorm", self.clipnorm, "a positive number")
        _check(self.inter_weight >= 0 and self.intra_weight >= 0
               and _positive(self.inter_weight + self.intra_weight),
               "train.inter_weight/intra_weight",
               (self.inter_weight, self.intra_weight), "non-negative, not both zero")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, ">= 1")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
               self.max_nonfinite_steps, ">= 1")
        for name in ("warmup_steps", "checkpoint_every_steps", "log_every_steps", "eval_subset"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        _check(_positive(self.temperature), "train.temperature", self.temperature,
               "a positive number")
        _check(0.0 <= self.momentum <= 1.0, "train.momentum", self.momentum, "a value in [0, 1]")
        _check(self.loss in ("infonce", "nce"), "train.loss", self.loss, "'infonce' or 'nce'")
        _check(self.positive in ("momentum", "online"), "train.positive", self.positive,
               "'momentum' or 'online'")
        _check(self.queue_multiplier >= 1, "train.queue_multiplier", self.queue_multiplier, ">= 1")
        _check(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule", self.lr_schedule,
               "'constant' or 'cosine'")
        _check(self.momentum_schedule in ("constant", "cosine"), "train.momentum_schedule",
               self.momentum_schedule, "'constant' or 'cosine'")
        _check(self.mixed_precision in ("off", "auto", "mixed_float16", "mixed_bfloat16"),
               "train.mixed_precision", self.mixed_precision,
               "'off', 'auto', 'mixed_float16' or 'mixed_bfloat16'")
        _check(self.strategy in STRATEGIES, "train.strategy", self.strategy,
               "'auto', 'default', 'mirrored', 'multi-worker' or 'tpu'")
        _check(self.collective_timeout >= 0, "train.collective_timeout", self.collective_timeout,
               "seconds >= 0 (0: no timeout)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"]["views"] = list(self.model.views)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict):
            raise ConfigError(f"Settings must be an object of sections ({', '.join(names)}). "
                              f"Received: {type(raw).__name__} {str(raw)[:60]}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory
            if not isinstance(raw.get(f.name, {}), dict):
                raise ConfigError(f"Settings section '{f.name}' must be an object of "
                                  f"{f.name}.* settings. Received: {raw[f.name]!r:.60}")
            values = dict(raw.get(f.name, {}))
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(
                    f"Unknown setting(s) {', '.join(f'{f.name}.{k}' for k in unknown)}. "
                    f"Valid keys: {', '.join(valid_keys())}")
            types = typing.get_type_hints(section_cls)
            for key, value in values.items():
                values[key] = _check_type(f"{f.name}.{key}", value, types[key])
            sections[f.name] = section_cls(**values)
        return cls(**sections)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 text
            raise ConfigError(f"Cannot read run config {path}: {err}. "
                              "Delete it or start the run with --fresh.") from err
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}. Fix the file or start the run with --fresh.") from None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    # -- overrides -------------------------------------------------------------------------
    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> "Config":
        """Returns a copy with `section.key` settings replaced.

        `overrides` is a dict of dotted names to values, or a list of "key=value" strings.
        A string value is read as the setting's type: a number (`model.width=0.25`), a boolean
        (`data.augment=true`; also yes/no, on/off, 1/0), a string (`train.pairs=full`, JSON quotes
        optional) or a list of names, either as a JSON list (`model.views=["terrain","height"]`,
        quotes optional) or comma-separated (`model.views=terrain,height`). Names: `valid_keys()`.
        """
        if not overrides:
            return self
        if isinstance(overrides, (list, tuple)):
            overrides = dict(parse_assignment(item) for item in overrides)
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in raw or key not in raw[section]:
                raise ConfigError(f"Unknown setting '{dotted}'. Valid keys: {', '.join(valid_keys())}")
            raw[section][key] = _coerce(dotted, value, _field_type(section, key))
        return Config.from_dict(raw)

    def resume_differences(self, other: "Config") -> list[str]:
        """Settings of `other` (a saved run's) that this config changes but a resume cannot:
        the model (the weights' shapes), the batch size, queue multiplier, view pairs and seed
        (the queue and the data order) and the split's fraction and seed (split.json is fixed
        when the run is created). Every other setting is applied on resume."""
        diffs = []
        for section, key in self._fixed_settings():
            mine, theirs = getattr(getattr(self, section), key), getattr(getattr(other, section), key)
            if _normalise(mine) != _normalise(theirs):
                diffs.append(f"{section}.{key}: saved {theirs!r}, requested {mine!r}")
        return diffs

    @staticmethod
    def _fixed_settings() -> list[tuple[str, str]]:
        model = [("model", f.name) for f in dataclasses.fields(ModelConfig)]
        return model + [(s, k) for s, k in (key.split(".") for key in FIXED_ON_RESUME)]


# Besides every model.* setting, these cannot change once a run exists (see resume_differences).
FIXED_ON_RESUME = ("data.batch_size", "data.validation_fraction", "data.split_seed",
                   "train.queue_multiplier", "train.pairs", "train.seed")


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def parse_assignment(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like key=value, e.g. model.width=0.5")
    key, _, value = item.partition("=")
    return key.strip(), value.strip()


def valid_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Config):
        keys += [f"{f.name}.{sf.name}" for sf in dataclasses.fields(f.default_factory)]
    return keys


def _field_type(section: str, key: str):
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    hints = typing.get_type_hints(section_cls)
    return hints[key]


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}


def _coerce(dotted: str, value: Any, kind) -> Any:
    if not isinstance(value, str):
        return list(value) if isinstance(value, tuple) else value
    text = value.strip()
    expected = {bool: "true or false (also yes/no, on/off, 1/0)", int: "an integer",
                float: "a number", str: "a string"}.get(
        kind, 'a list of names, as a JSON list (["terrain","height"]) or comma-separated '
              "(terrain,height)")
    try:
        if kind is bool:
            return BOOL_WORDS[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return _unquote(text)
        # tuple[str, ...]: '["terrain","height"]' (JSON), "[terrain,height]" or "terrain,height"
        if text.startswith("["):
            try:
                names = json.loads(text)
            except ValueError:
                if not text.endswith("]"):
                    raise
                names = [part.strip().strip("'\"") for part in text[1:-1].split(",")]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError
            return [n.strip() for n in names if n.strip()]
        return [_unquote(part.strip()) for part in text.split(",") if part.strip()]
    except (KeyError, ValueError):  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"Setting '{dotted}' expects {expected}. Received: {text!r}") from None


def _unquote(text: str) -> str:
    """'"full"' -> 'full' (a JSON string); anything else unchanged."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            loaded = json.loads(text)
        except ValueError:
            return text
        if isinstance(loaded, str):
            return loaded
    return text


def _check_type(name: str, value: Any, kind) -> Any:
    """JSON values -> the field's type (ints accepted for floats, lists for tuples)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {bool: bool, int: int, float: float, str: str}.get(kind)
    if expected is not None:
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"Setting '{name}' must be {words[expected]}. Received: {value!r}")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"Setting '{name}' must be a list of names. Received: {value!r}")


def parse_duration(text: str | float | int | None, setting: str = "--time-limit") -> float | None:
    """'11.5h', '90m', '600s' or plain seconds -> seconds (None stays None)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        units = {"s": 1, "m": 60, "h": 3600}
        cleaned = str(text).strip().lower()
        try:
            seconds = (float(cleaned[:-1]) * units[cleaned[-1]] if cleaned and cleaned[-1] in units
                       else float(cleaned))
        except ValueError:
            seconds = -1.0
    if not _positive(seconds):
        raise ConfigError(f"{setting} expects a positive duration like 11.5h, 90m or 600s (leave "
                          f"it out for no limit). Received: {text!r}")
    return seconds


def _positive(value: float) -> bool:
    """A positive finite number (inf and NaN are not settings anyone means)."""
    return math.isfinite(value) and value > 0


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"Setting '{name}' must be {expected}. Received: {value!r}")


# -- presets ------------------------------------------------------------------------------

def _preset_cpu_demo() -> Config:
    # Small enough for an epoch over ~100 synthetic samples in well under a minute on 2 cores.
    # 15 epochs over 300 samples is ~2.5 min on 2 cores; momentum 0.9 collapsed in the same
    # budget (held-out probes below random init), 0.99 beat random init on every probe.
    # ReZero residual branches (shortcut + a * branch, a trainable from 0): without them Adam's
    # first sign-like steps blew up a direction shared by every sample through the 16 blocks for
    # some seeds (seed 1: embedding norm x50 and spread /8 within 12 steps, ~6 epochs near
    # chance), and training made the multi-stage features worse than random init
    # (benchmarks/README.md, "Learning"). A cosine decay from 2e-3 measured the same as this
    # constant 1e-3 on 691 held-out tuning samples (kNN +0.6 points, within the seeds' spread).
    return Config(
        data=DataConfig(crop_size=64, batch_size=16, validation_fraction=0.25),
        model=ModelConfig(trunk="resnet34", width=0.125, embedding_dim=64, branch_gain=0.0,
                          learnable_gain=True),
        train=TrainConfig(epochs=15, learning_rate=1e-3, queue_multiplier=4, momentum=0.99,
                          eval_subset=32),
    )


def _preset_kaggle_t4() -> Config:
    # 256 crops, full-width ResNet-34, batch 32 in mixed precision, split across 2x T4 by
    # MirroredStrategy. Speed on a T4 is NOT measured (no GPU was available). Memory, estimated
    # from one step on the CPU (benchmarks/step_memory.py): ~6 GB per T4 at 16 per replica,
    # ~11 GB for 32 on one T4; float32 GPUs (P100) would need ~19.5 GB, so the notebooks give
    # them batch 16.
    return Config(
        data=DataConfig(crop_size=256, batch_size=32),
        model=ModelConfig(trunk="resnet34", width=1.0, embedding_dim=128),
        train=TrainConfig(epochs=20, learning_rate=3e-4, lr_schedule="cosine", warmup_steps=500,
                          mixed_precision="auto", jit_compile=True, checkpoint_every_steps=500,
                          eval_subset=256),
    )


def _preset_original() -> Config:
    # The seed's settings: batch 5, 256 crops, Adam 1e-4, NCE, positives from the online net.
    return Config(
        data=DataConfig(crop_size=256, batch_size=5),
        model=ModelConfig(trunk="resnet34", width=1.0, embedding_dim=128),
        train=TrainConfig(epochs=15, loss="nce", positive="online"),
    )


PRESETS = {
    "cpu-demo": _preset_cpu_demo,
    "kaggle-t4": _preset_kaggle_t4,
    "original": _preset_original,
    "seed": _preset_original,  # alias used in DESIGN.md
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset '{name}'. Choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# -- environment ----------------------------------------------------------------------------

def on_kaggle() -> bool:
    """True inside a Kaggle notebook (kernel env var, or the /kaggle/working mount)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or Path("/kaggle/working").is_dir()


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def xla_padding_setting() -> bool:
    """Whether symmetric padding may use XLA (`cmc_kit.layers.xla_padding_available`): True
    unless the environment variable CMC_KIT_XLA_PAD is 0, false, no or off."""
    return os.environ.get("CMC_KIT_XLA_PAD", "1").strip().lower() not in ("0", "false", "no", "off")


def repository_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_paths() -> dict[str, Path]:
    """Where data and runs live: /kaggle/working on Kaggle, the repository's data/ and runs/ locally."""
    if on_kaggle():
        working = Path("/kaggle/working")
        return {"data": working / "data", "runs": working / "runs", "input": Path("/kaggle/input")}
    root = repository_root()
    if not (root / "pyproject.toml").exists():  # installed as a package, not a checkout
        root = Path.cwd()
    return {"data": root / "data", "runs": root / "runs", "input": root / "data"}


def tpu_environment() -> dict[str, str]:
    """The TPU variables that are set: TPU_NAME (a TPU to use) and TPU_ACCELERATOR_TYPE (set on
    TPU VMs, e.g. Kaggle's and Colab's)."""
    return {name: os.environ[name] for name in ("TPU_NAME", "TPU_ACCELERATOR_TYPE")
            if os.environ.get(name)}


def tf_config_text() -> str | None:
    """TF_CONFIG as set (the cluster a multi-worker job runs on: Vertex AI, GKE, your own
    machines), None when unset or blank. `cmc_kit.training.cluster.parse_tf_config` checks it."""
    text = os.environ.get("TF_CONFIG", "")
    return text if text.strip() else None


def quiet_tensorflow_by_default() -> None:
    """TF_CPP_MIN_LOG_LEVEL=2 (warnings and errors only) unless the user set it (0 shows all).
    Takes effect for a TensorFlow imported afterwards."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tensorflow_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0
