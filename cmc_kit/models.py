"""Encoders: per-view stems -> shared (or per-view) trunk -> per-view heads, and the momentum twin.

    view x [B, H, W, C_view] --stem (5x5 s2)--> [B, H/2, W/2, C0] --trunk--> [B, h, w, F]
        --head (mlp | attention)--> float32 [B, embedding_dim]

Trunks are pre-activation residual networks of `NormalizedConv2D` (no BatchNorm), leaky ReLU
0.2 before every convolution. Each family has one list-driven builder; ResNet-34, the seed's
first trunk and the RegNetX sizes are data in `TRUNK_SPECS`.

Measured CPU cost (TF 2.21, 2 shared cores, forward+backward in a tf.function, median ms):
  RegNetX-200MF trunk, batch 8, trunk input 32x32: grouped 19.0 vs a dense trunk of equal
  FLOPs (widths 16/31/72/164, no groups) 12.0 (1.6x); input 64x64: 80.3 vs 72.6 (1.1x);
  RegNetX-800MF at width 0.5, 32x32: 12.4 vs 12.3 (1.0x). The seed's 5-6x gap is gone
  because NormalizedConv2D calls TF's native grouped conv (see layers.py). Under XLA
  (jit_compile=True) on CPU grouped convs are ~9x slower (326 vs 36 ms): jit only on GPU.
  Shared trunk on 4 stacked views (resnet34 at width 0.125, batch 16, crop 64): 108 ms
  vs 156 ms for four separate trunk calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import weakref

import keras
import tensorflow as tf
from keras import ops

from cmc_kit.config import TRUNK_NAMES, ModelConfig
from cmc_kit.layers import AttentionPooling2D, BranchGain, NormalizedConv2D
from cmc_kit.views import VIEW_SPECS

# Channels of each view's input tensor, from the view specs (the one place that defines them).
VIEW_CHANNELS = {name: spec.channels for name, spec in VIEW_SPECS.items()}
LEAKY_SLOPE = 0.2
STEM_KERNEL, STEM_STRIDE = 5, 2


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
    """One trunk as data: residual stages of `depths[i]` blocks with `widths[i]` output channels.

    family: "basic" (two 3x3 convs) or "bottleneck" (1x1 -> 3x3 -> 1x1).
    stem_width: channels the trunk expects at its input (the stems' output) at width 1.
    strides: stride of each stage's first block.
    bottleneck_ratio: output channels / inner channels of a bottleneck block.
    group_width: channels per group of the 3x3 conv (0: not grouped). Widths scaled by the
        width multiplier are rounded to multiples of it.
    """

    family: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    strides: tuple[int, ...]
    bottleneck_ratio: int = 1
    group_width: int = 0


def _regnetx(depths, widths, group_width):
    return TrunkSpec("bottleneck", depths, widths, stem_width=32, strides=(2, 2, 2, 2),
                     bottleneck_ratio=1, group_width=group_width)


TRUNK_SPECS = {
    # torchvision's ResNet-34 stages (its 7x7 stem and max-pool replaced by our 5x5 s2 stems).
    "resnet34": TrunkSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512), stem_width=64,
                          strides=(1, 2, 2, 2)),
    # ResNet-18's stages, the same stems: half the blocks, for quick runs (and the tests).
    "resnet18": TrunkSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), stem_width=64,
                          strides=(1, 2, 2, 2)),
    # The seed's first trunk: 5 stride-2 bottleneck stages. Its exact widths are not
    # published; these follow ResNet's doubling with a bottleneck ratio of 4.
    "original": TrunkSpec("bottleneck", (2, 2, 2, 2, 2), (64, 128, 256, 512, 1024),
                          stem_width=64, strides=(2, 2, 2, 2, 2), bottleneck_ratio=4),
    # Radosavovic et al. 2020, "Designing Network Design Spaces", table of RegNetX models.
    "regnetx-200mf": _regnetx((1, 1, 4, 7), (24, 56, 152, 368), 8),
    "regnetx-400mf": _regnetx((1, 2, 7, 12), (32, 64, 160, 384), 16),
    "regnetx-800mf": _regnetx((1, 3, 7, 5), (64, 128, 288, 672), 16),
    "regnetx-1.6gf": _regnetx((2, 4, 10, 2), (72, 168, 408, 912), 24),
    "regnetx-3.2gf": _regnetx((2, 6, 15, 2), (96, 192, 432, 1008), 48),
}
assert tuple(TRUNK_SPECS) == TRUNK_NAMES, "TRUNK_SPECS must list exactly config.TRUNK_NAMES"


# -- trunk geometry ---------------------------------------------------------------------------

def _trunk_spec(name: str) -> TrunkSpec:
    if name not in TRUNK_SPECS:
        raise ValueError(f"Unknown trunk '{name}'. Set model.trunk to one of {TRUNK_NAMES}. "
                         f"Received: name={name!r}")
    return TRUNK_SPECS[name]


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"The trunk width multiplier (model.width) must be a positive number. "
                         f"Received: width={width!r}")
    return float(width)


def _scaled(channels: int, width: float, divisor: int) -> int:
    """`channels * width` rounded to the nearest multiple of `divisor`, at least `divisor`."""
    return max(divisor, int(channels * width / divisor + 0.5) * divisor)


def _input_channels(spec: TrunkSpec, width: float) -> int:
    return spec.stem_width if width == 1.0 else _scaled(spec.stem_width, width, 8)


def _stage_widths(spec: TrunkSpec, width: float) -> list[int]:
    # Exact widths at 1.0; otherwise multiples of the group width (of 8 when not grouped).
    if width == 1.0:
        return list(spec.widths)
    return [_scaled(w, width, spec.group_width or 8) for w in spec.widths]


def trunk_input_channels(name: str, width: float = 1.0) -> int:
    """Channels the trunk `name` takes at its input (what every stem outputs)."""
    return _input_channels(_trunk_spec(name), _check_width(width))


def trunk_stage_channels(name: str, width: float = 1.0) -> list[int]:
    """Output channels of each stage of trunk `name` at `width`."""
    return _stage_widths(_trunk_spec(name), _check_width(width))


def trunk_stride(name: str) -> int:
    """Total stride of trunk `name` (input size / output size); the stems add another 2."""
    stride = 1
    for s in _trunk_spec(name).strides:
        stride *= s
    return stride


def input_stride(name: str) -> int:
    """Input pixels per pixel of trunk `name`'s output, the stem's stride included: crops that
    are multiples of it keep every stage's feature grid aligned with the input."""
    return STEM_STRIDE * trunk_stride(name)


# -- blocks ---------------------------------------------------------------------------------

def _act(x, name):
    return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)(x)


def _shortcut(x, preactivated, filters, stride, name):
    """Identity, or a 1x1 projection of the pre-activated input when the shape changes."""
    if stride == 1 and x.shape[-1] == filters:
        return x
    return NormalizedConv2D(filters, 1, strides=stride, name=f"{name}_proj")(preactivated)


@dataclasses.dataclass(frozen=True)
class ResidualBranch:
    """How a block adds its branch to the shortcut: `shortcut + gain * branch`, the gain fixed
    or learned (`gain=0, learnable=True` is ReZero; the default adds the branch as it is)."""

    gain: float = 1.0
    learnable: bool = False

    def __call__(self, shortcut, branch, name):
        if self.gain != 1.0 or self.learnable:
            branch = BranchGain(self.gain, self.learnable, name=f"{name}_gain")(branch)
        return keras.layers.Add(name=f"{name}_add")([shortcut, branch])


def basic_block(x, filters, stride, name, residual: ResidualBranch = ResidualBranch()):
    """Pre-activation basic residual block: act -> 3x3 (stride) -> act -> 3x3, plus shortcut."""
    a = _act(x, f"{name}_act1")
    shortcut = _shortcut(x, a, filters, stride, name)
    y = NormalizedConv2D(filters, 3, strides=stride, name=f"{name}_conv1")(a)
    y = NormalizedConv2D(filters, 3, name=f"{name}_conv2")(_act(y, f"{name}_act2"))
    return residual(shortcut, y, name)


def bottleneck_block(x, filters, stride, bottleneck_ratio, group_width, name,
                     residual: ResidualBranch = ResidualBranch()):
    """Pre-activation bottleneck block: act -> 1x1 -> act -> 3x3 (stride, grouped) -> act -> 1x1.

    RegNetX's X block is this with `bottleneck_ratio=1` and `group_width` channels per group.
    """
    inner = filters // bottleneck_ratio
    groups = inner // group_width if group_width else 1
    a = _act(x, f"{name}_act1")
    shortcut = _shortcut(x, a, filters, stride, name)
    y = NormalizedConv2D(inner, 1, name=f"{name}_conv1")(a)
    y = NormalizedConv2D(inner, 3, strides=stride, groups=groups,
                         name=f"{name}_conv2")(_act(y, f"{name}_act2"))
    y = NormalizedConv2D(filters, 1, name=f"{name}_conv3")(_act(y, f"{name}_act3"))
    return residual(shortcut, y, name)


def _stages(x, spec: TrunkSpec, stage_widths: list[int], block):
    for stage, (depth, filters, stride) in enumerate(
            zip(spec.depths, stage_widths, spec.strides), start=1):
        for index in range(depth):
            first = index == 0
            x = block(x, filters, stride if first else 1, name=f"stage{stage}_block{index + 1}")
        x = keras.layers.Identity(name=f"stage{stage}_output")(x)
    return x


def _trunk_model(spec: TrunkSpec, width: float, block, model_name: str) -> keras.Model:
    inputs = keras.Input(shape=(None, None, _input_channels(spec, width)),
                         name=f"{model_name}_input")                     # [B, H, W, C0]
    x = _stages(inputs, spec, _stage_widths(spec, width), block)        # [B, h, w, F]
    outputs = _act(x, "final_act")  # pre-activation nets end with one more activation
    return keras.Model(inputs, outputs, name=model_name)


def build_resnet(spec: TrunkSpec, width: float = 1.0, model_name: str = "trunk",
                 residual: ResidualBranch = ResidualBranch()) -> keras.Model:
    """Basic-block pre-activation ResNet from a `TrunkSpec` (family "basic")."""
    def block(x, filters, stride, name):
        return basic_block(x, filters, stride, name, residual)
    return _trunk_model(spec, _check_width(width), block, model_name)


def build_bottleneck_resnet(spec: TrunkSpec, width: float = 1.0, model_name: str = "trunk",
                            residual: ResidualBranch = ResidualBranch()) -> keras.Model:
    """Bottleneck pre-activation ResNet / RegNetX from a `TrunkSpec` (family "bottleneck")."""
    def block(x, filters, stride, name):
        return bottleneck_block(x, filters, stride, spec.bottleneck_ratio, spec.group_width, name,
                                residual)
    return _trunk_model(spec, _check_width(width), block, model_name)


_FAMILY_BUILDERS = {"basic": build_resnet, "bottleneck": build_bottleneck_resnet}


def build_trunk(name: str, width: float = 1.0, model_name: str = "trunk", *,
                residual: ResidualBranch = ResidualBranch()) -> keras.Model:
    """Trunk `name` (one of `config.TRUNK_NAMES`) at channel multiplier `width`.

    Input `[B, H, W, trunk_input_channels(name, width)]` with H, W divisible by
    `trunk_stride(name)`; output `[B, H / stride, W / stride, F]`. Stage outputs are the
    layers `stage{i}_output` (see `stage_model`). `residual` says how the blocks add their
    branches (ReZero: `ResidualBranch(0.0, learnable=True)`).
    """
    spec = _trunk_spec(name)
    return _FAMILY_BUILDERS[spec.family](spec, width, model_name, residual)


_STAGE_LAYER = re.compile(r"stage(\d+)_output")
# trunk -> its stage model, for CMCEncoder.stage_features; weak, so trunks are not kept alive.
_STAGE_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def stage_model(trunk: keras.Model) -> keras.Model:
    """A model sharing `trunk`'s layers that returns the list of its stage feature maps."""
    stages = sorted((int(m.group(1)), layer) for layer in trunk.layers
                    if (m := _STAGE_LAYER.fullmatch(layer.name)))
    if not stages:
        raise ValueError(f"Model '{trunk.name}' has no 'stage<i>_output' layers; "
                         "pass a trunk made by cmc_kit.models.build_trunk.")
    return keras.Model(trunk.input, [layer.output for _, layer in stages],
                       name=f"{trunk.name}_stages")


# -- stems and heads ------------------------------------------------------------------------

def build_stem(view: str, out_channels: int, name: str | None = None) -> NormalizedConv2D:
    """5x5 stride-2 normalised conv from the view's channels to the trunk's input width."""
    stem = NormalizedConv2D(out_channels, STEM_KERNEL, strides=STEM_STRIDE,
                            name=name or f"stem_{view}")
    stem.build((None, None, None, VIEW_CHANNELS[view]))
    return stem


def build_head(kind: str, feature_channels: int, embedding_dim: int, *, attention_heads: int = 3,
               attention_dim: int = 64, name: str = "head") -> keras.Model:
    """Feature map `[B, h, w, F]` -> float32 embedding `[B, embedding_dim]`.

    "mlp": global mean -> dense(F) -> dense(E) -> dense(E), leaky ReLU between (the seed's).
    "attention": `AttentionPooling2D` (layer "attention_pool") with a float32 output projection.
    """
    inputs = keras.Input(shape=(None, None, feature_channels), name=f"{name}_input")
    if kind == "mlp":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)              # [B, F]
        x = keras.layers.Dense(feature_channels, name="dense1")(x)
        x = keras.layers.Dense(embedding_dim, name="dense2")(_act(x, "act1"))
        outputs = keras.layers.Dense(embedding_dim, name="dense3", dtype="float32")(
            _act(x, "act2"))                                                     # [B, E]
    elif kind == "attention":
        outputs = AttentionPooling2D(attention_heads, attention_dim, embedding_dim,
                                     output_dtype="float32", name="attention_pool")(inputs)
    else:
        raise ValueError(f"Unknown head '{kind}'. Set model.head to 'mlp' or 'attention'. "
                         f"Received: kind={kind!r}")
    return keras.Model(inputs, outputs, name=name)


# -- the encoder ------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="cmc_kit")
class CMCEncoder(keras.Model):
    """All views' stems, the trunk(s) and heads of one CMC encoder, built from a ModelConfig.

    `encoder(inputs)` maps a dict `{view: [B, H, W, VIEW_CHANNELS[view]]}` (extra keys are
    ignored) to `{view: float32 [B, embedding_dim]}` raw (unnormalised) embeddings.
    Every weight exists after construction; `weights` has a fixed, config-determined order.
    """

    def __init__(self, model_config: ModelConfig, crop_size: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model_config, dict):
            model_config = ModelConfig(**model_config)
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0:
            raise ValueError("crop_size (data.crop_size) must be a positive integer. "
                             f"Received: crop_size={crop_size!r}")
        self.config = model_config
        self.crop_size = crop_size
        self.views = tuple(model_config.views)

        stem_width = trunk_input_channels(model_config.trunk, model_config.width)
        feature_channels = trunk_stage_channels(model_config.trunk, model_config.width)[-1]
        # Which stem each view uses: overview borrows terrain's when configured and present.
        self._stem_owner = {view: view for view in self.views}
        if model_config.share_overview_stem and {"overview", "terrain"} <= set(self.views):
            self._stem_owner["overview"] = "terrain"
        stem_views = [v for v in self.views if self._stem_owner[v] == v]
        trunk_views = ["shared"] if model_config.shared_trunk else list(self.views)

        # One plain attribute per sub-model, assigned in view order: Keras then lists the
        # weights in a fixed order, and tf.train.Checkpoint tracks each one (it does not see
        # into Keras's tracked lists or dicts).
        for v in stem_views:
            setattr(self, f"stem_{v}", build_stem(v, stem_width))
        for v in trunk_views:
            setattr(self, f"trunk_{v}", build_trunk(
                model_config.trunk, model_config.width,
                model_name="trunk" if v == "shared" else f"trunk_{v}",
                residual=ResidualBranch(model_config.branch_gain, model_config.learnable_gain)))
        for v in self.views:
            setattr(self, f"head_{v}", build_head(
                model_config.head, feature_channels, model_config.embedding_dim,
                attention_heads=model_config.attention_heads,
                attention_dim=model_config.attention_dim, name=f"head_{v}"))
        self.built = True

    # -- lookup ------------------------------------------------------------------------------
    def _check_view(self, view: str) -> None:
        if view not in self.views:
            raise ValueError(f"View '{view}' is not part of this encoder (model.views = "
                             f"{self.views}). Received: view={view!r}")

    def stem(self, view: str) -> NormalizedConv2D:
        self._check_view(view)
        return getattr(self, f"stem_{self._stem_owner[view]}")

    def trunk(self, view: str) -> keras.Model:
        self._check_view(view)
        return getattr(self, "trunk_shared" if self.config.shared_trunk else f"trunk_{view}")

    def head(self, view: str) -> keras.Model:
        self._check_view(view)
        return getattr(self, f"head_{view}")

    def _view_input(self, inputs, view):
        self._check_view(view)
        if view not in inputs:
            raise ValueError(f"Encoder input has no '{view}' entry; model.views = {self.views} "
                             f"needs all of them. Received keys: {sorted(inputs)}")
        x = inputs[view]
        channels = x.shape[-1]
        if len(x.shape) != 4 or channels != VIEW_CHANNELS[view]:
            raise ValueError(f"View '{view}' must be [B, H, W, {VIEW_CHANNELS[view]}]. "
                             f"Received: shape={tuple(x.shape)}")
        return x

    # -- forward -----------------------------------------------------------------------------
    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, dict):  # drop extras such as "id" before Keras converts inputs
            inputs = {v: inputs[v] for v in self.views if v in inputs}
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None):
        stemmed = [self.stem(v)(self._view_input(inputs, v)) for v in self.views]  # [B, h, w, C0]
        spatial = {tuple(s.shape[1:3]) for s in stemmed}
        if self.config.shared_trunk and len(spatial) == 1 and None not in next(iter(spatial)):
            # One trunk call on all views stacked along the batch: much faster than V calls.
            sizes = [ops.shape(s)[0] for s in stemmed]
            stacked = ops.concatenate(stemmed, axis=0)                          # [V*B, h, w, C0]
            features = self.trunk_shared(stacked, training=training)           # [V*B, h', w', F]
            per_view = tf.split(features, tf.stack(sizes), num=len(self.views), axis=0)
        else:
            per_view = [self.trunk(v)(s, training=training) for v, s in zip(self.views, stemmed)]
        return {v: self.head(v)(f, training=training) for v, f in zip(self.views, per_view)}

    def _features(self, x, view):
        x = self._view_input({view: x}, view)
        return self.trunk(view)(self.stem(view)(x))                            # [B, h, w, F]

    def encode_features(self, x, view: str = "terrain"):
        """Trunk output of one view, mean-pooled over space: float32 `[B, F]`."""
        return ops.cast(ops.mean(self._features(x, view), axis=(1, 2)), "float32")

    def stage_features(self, x, view: str = "terrain") -> list:
        """Stage feature maps of one view: list of float32 `[B, h_i, w_i, c_i]`."""
        x = self._view_input({view: x}, view)
        trunk = self.trunk(view)
        if trunk not in _STAGE_MODELS:  # built once per trunk (kept outside the tracked layers)
            _STAGE_MODELS[trunk] = stage_model(trunk)
        maps = _STAGE_MODELS[trunk](self.stem(view)(x))
        return [ops.cast(m, "float32") for m in maps]

    def embed(self, x, view: str = "terrain"):
        """Head embedding of one view alone: `[B, H, W, C_view]` -> float32 `[B, embedding_dim]`.

        The same numbers as `encoder(inputs)[view]`, without needing the other views' inputs.
        """
        return ops.cast(self.head(view)(self._features(x, view)), "float32")

    def attention_weights(self, x, view: str = "terrain"):
        """Attention of each head over the trunk's output positions: float32 `[B, heads, h*w]`."""
        if self.config.head != "attention":
            raise ValueError("attention_weights needs model.head='attention'. "
                             f"Received: model.head={self.config.head!r}")
        features = self._features(x, view)
        _, attention = self.head(view).get_layer("attention_pool")(features,
                                                                   return_attention=True)
        return attention

    # -- serialisation -----------------------------------------------------------------------
    def get_config(self):
        model_config = dataclasses.asdict(self.config)
        model_config["views"] = list(self.config.views)
        return {"name": self.name, "trainable": self.trainable,
                "model_config": model_config, "crop_size": self.crop_size}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_encoder(model_config: ModelConfig, crop_size: int = 64, name: str = "online",
                  *, seed: int | None = None) -> CMCEncoder:
    """The encoder for `model_config`, every weight created. See `CMCEncoder`.

    `seed`: an int makes the initial weights a function of it alone (the same weights as
    `keras.utils.set_random_seed(seed)` followed by `build_encoder(...)`), without reseeding the
    process's NumPy, TensorFlow or Python random streams. None draws from them as Keras does.
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError("build_encoder expects a cmc_kit.config.ModelConfig. "
                         f"Received: model_config={type(model_config).__name__}")
    if seed is None:
        return CMCEncoder(model_config, crop_size, name=name)
    with _python_random_seeded(seed):
        return CMCEncoder(model_config, crop_size, name=name)


@contextlib.contextmanager
def _python_random_seeded(seed: int):
    """Seeds Python's `random` for the block and then restores its previous state.

    Keras 3 gives every unseeded initializer an int seed drawn from Python's `random` when the
    layer is made, and the weights are a stateless function of those ints; so seeding `random`
    while the layers are made fixes every initial weight. Restoring the state afterwards leaves
    the caller's random stream as it was. Not thread-safe: another thread drawing from `random`
    during the block would shift the draws.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None. Received: seed={seed!r}")
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def build_momentum_twin(encoder: CMCEncoder, name: str = "momentum") -> CMCEncoder:
    """A non-trainable copy of `encoder` holding IDENTICAL weights (copied, not re-initialised)."""
    twin = CMCEncoder(encoder.config, encoder.crop_size, name=name)
    _check_pairing(encoder, twin)
    for target, source in zip(twin.weights, encoder.weights):
        target.assign(source)
    twin.trainable = False
    return twin


def _check_pairing(online, momentum_model):
    online_weights, twin_weights = online.weights, momentum_model.weights
    if len(online_weights) != len(twin_weights) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(online_weights, twin_weights)):
        raise ValueError(f"Models '{online.name}' and '{momentum_model.name}' have different "
                         "weights; build the momentum model with build_momentum_twin(online).")


def momentum_update(online: keras.Model, momentum_model: keras.Model, m) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q over all weights, paired by position.

    `m` is a Python float or a scalar tensor; works eagerly and inside `tf.function`.
    """
    _check_pairing(online, momentum_model)
    m = ops.cast(m, "float32")
    for theta_q, theta_k in zip(online.weights, momentum_model.weights):
        theta_k.assign(m * theta_k.value + (1.0 - m) * theta_q.value)
