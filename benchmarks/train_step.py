"""Train-step speed at cpu-demo settings, against a bare Keras reference step, side by side.

Usage: python benchmarks/train_step.py [--preset cpu-demo] [--set model.width=0.5 ...]
       [--rounds 5] [--steps 3] [--samples 80]

Measured in one run, the variants alternating in every round so they share the machine load
(the best round's mean step time: on a shared machine, load only ever adds time; the
process CPU time per step is printed too, as it is less sensitive to other processes):
  cmc step        `Trainer.train_step`: online forward/backward and momentum forward of all
                  views, every pair's inter- and intra-batch loss, Adam, EMA, queue enqueue.
  encoders only   the same online/momentum passes and Adam update, a trivial loss, no queue,
                  no EMA: (cmc - this) / cmc is the share spent in losses, queues and EMA.
  bare Keras      the same shapes and passes built from plain `keras.layers.Conv2D` ('same'
                  padding, no bias), momentum forward, a plain InfoNCE against the queue per
                  pair, Adam: what a straightforward Keras implementation costs (target:
                  cmc reaches >= 0.9 of its samples/s).
  bare + NormConv the bare step with `NormalizedConv2D` instead of Conv2D: separates the cost
                  of the layer (kernel normalisation, symmetric padding) from the rest.
  cmc step, XLA   the cmc step compiled whole with XLA (forced on; the trainer uses XLA
                  only with a GPU/TPU attached). Skipped for grouped trunks.
  NormConv ablations  the bare + NormConv step with zero 'SAME' padding instead of the
                  symmetric tf.pad + VALID conv, and without the kernel normalisation:
                  which part of the layer costs the time.
Also: achieved FLOP/s of the cmc step vs a large float32 matmul measured in the same run
(FLOPs from TensorFlow's profiler), the input pipeline's samples/s from PNGs and from the
`prepare` cache vs what the step consumes, and peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from cmc_kit import cache as shard_cache  # noqa: E402
from cmc_kit import data, layers, models, objectives, synth, training, views  # noqa: E402
from cmc_kit.config import preset  # noqa: E402
from cmc_kit.layers import NormalizedConv2D, symmetric_pad  # noqa: E402


# -- the bare reference ---------------------------------------------------------------------------

class BareEncoder(keras.Model):
    """The cmc encoder's shapes (stems, stacked shared ResNet trunk, MLP heads) from plain layers.

    `conv(filters, kernel, stride)` makes every convolution; pre-activation basic blocks with
    leaky ReLU 0.2, as in `cmc_kit.models`.
    """

    def __init__(self, model_config, conv, **kwargs):
        super().__init__(**kwargs)
        self.views = tuple(model_config.views)
        stem_width = models.trunk_input_channels(model_config.trunk, model_config.width)
        widths = models.trunk_stage_channels(model_config.trunk, model_config.width)
        spec = models.TRUNK_SPECS[model_config.trunk]
        self.owner = {v: ("terrain" if v == "overview" and "terrain" in self.views else v)
                      for v in self.views}
        self.stems = {v: conv(stem_width, 5, 2) for v in self.views if self.owner[v] == v}
        inputs = keras.Input((None, None, stem_width))
        x = inputs
        for depth, filters, stride in zip(spec.depths, widths, spec.strides):
            for index in range(depth):
                s = stride if index == 0 else 1
                a = keras.layers.LeakyReLU(0.2)(x)
                shortcut = x if s == 1 and x.shape[-1] == filters else conv(filters, 1, s)(a)
                y = conv(filters, 3, s)(a)
                y = conv(filters, 3, 1)(keras.layers.LeakyReLU(0.2)(y))
                x = keras.layers.Add()([shortcut, y])
        self.trunk = keras.Model(inputs, keras.layers.LeakyReLU(0.2)(x))
        self.heads = {}
        for v in self.views:
            head_in = keras.Input((None, None, widths[-1]))
            h = keras.layers.GlobalAveragePooling2D()(head_in)
            h = keras.layers.Dense(widths[-1])(h)
            h = keras.layers.Dense(model_config.embedding_dim)(keras.layers.LeakyReLU(0.2)(h))
            h = keras.layers.Dense(model_config.embedding_dim)(keras.layers.LeakyReLU(0.2)(h))
            self.heads[v] = keras.Model(head_in, h)

    def call(self, batch):
        stemmed = [self.stems[self.owner[v]](batch[v]) for v in self.views]  # [B, h, w, C0]
        features = self.trunk(tf.concat(stemmed, axis=0))                   # [V*B, h', w', F]
        per_view = tf.split(features, len(self.views), axis=0)
        return {v: self.heads[v](f) for v, f in zip(self.views, per_view)}  # {v: [B, E]}


def keras_conv(filters, kernel, stride):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)


def normalized_conv(filters, kernel, stride):
    return NormalizedConv2D(filters, kernel, strides=stride)


class AblatedConv2D(keras.layers.Layer):
    """NormalizedConv2D with one part switched off, for attributing its cost.

    normalise: divide the kernel by its per-filter L2 norm (as NormalizedConv2D).
    symmetric: symmetric padding + VALID conv (as NormalizedConv2D), else zero 'SAME' padding.
    """

    def __init__(self, filters, kernel, stride, *, normalise: bool, symmetric: bool, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.stride = filters, kernel, stride
        self.normalise, self.symmetric = normalise, symmetric

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", initializer="glorot_uniform",
            shape=(self.kernel_size, self.kernel_size, input_shape[-1], self.filters))

    def call(self, x):
        kernel = self.kernel
        if self.normalise:
            kernel = kernel * tf.math.rsqrt(
                tf.reduce_sum(tf.square(kernel), axis=(0, 1, 2), keepdims=True) + 1e-8)
        if not self.symmetric:
            return tf.nn.conv2d(x, kernel, self.stride, "SAME")
        p = (self.kernel_size - 1) // 2
        if p:
            x = symmetric_pad(x, p, p)  # the layer's own padding
        return tf.nn.conv2d(x, kernel, self.stride, "VALID")


def zero_pad_normalized_conv(filters, kernel, stride):
    return AblatedConv2D(filters, kernel, stride, normalise=True, symmetric=False)


def symmetric_pad_conv(filters, kernel, stride):
    return AblatedConv2D(filters, kernel, stride, normalise=False, symmetric=True)


def bare_step(model_config, train_config, conv, batch, queue_size: int):
    """A plain MoCo-style step: online fwd/bwd, momentum fwd, InfoNCE vs a fixed queue per pair."""
    online = BareEncoder(model_config, conv)
    momentum = BareEncoder(model_config, conv)
    online(batch)
    momentum(batch)
    optimizer = keras.optimizers.Adam(train_config.learning_rate, clipnorm=train_config.clipnorm)
    pairs = objectives.resolve_pairs(train_config.pairs, model_config.views)
    queue = tf.math.l2_normalize(tf.random.normal([queue_size, model_config.embedding_dim]), -1)
    inv_t = 1.0 / train_config.temperature

    @tf.function
    def step(batch):
        keys = {v: tf.math.l2_normalize(k, -1) for v, k in momentum(batch).items()}
        with tf.GradientTape() as tape:
            queries = {v: tf.math.l2_normalize(q, -1) for v, q in online(batch).items()}
            losses = []
            for q_view, k_view in pairs:
                q, k = queries[q_view], keys[k_view]
                logits = tf.concat([tf.reduce_sum(q * k, 1, keepdims=True),     # [B, 1+K]
                                    tf.matmul(q, queue, transpose_b=True)], 1) * inv_t
                losses.append(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    tf.zeros(tf.shape(q)[:1], tf.int32), logits)))
            loss = tf.add_n(losses)
        grads = tape.gradient(loss, online.trainable_variables)
        optimizer.apply_gradients(zip(grads, online.trainable_variables))
        return loss

    return step


def encoders_only_step(trainer):
    """The cmc trainer's own networks and optimizer, with no loss terms, queue or EMA."""
    online, momentum, optimizer = trainer.online, trainer.momentum, trainer.optimizer

    @tf.function
    def step(batch):
        keys = momentum(batch, training=False)
        with tf.GradientTape() as tape:
            queries = online(batch, training=True)
            loss = tf.add_n([tf.reduce_mean(queries[v] * tf.stop_gradient(keys[v]))
                             for v in queries])
        grads = tape.gradient(loss, online.trainable_variables)
        optimizer.apply_gradients(zip(grads, online.trainable_variables))
        return loss

    return step


# -- measuring ------------------------------------------------------------------------------------

def forward_flops(function, input_specs) -> int:
    """Floating-point operations of one call (TensorFlow profiler on the frozen graph).

    Traced with the ring padding: the profiler loses the shapes behind the XLA-compiled pad's
    function call and would count no convolution after it. The FLOPs are the same.
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    with layers.xla_padding(False):
        concrete = tf.function(function).get_concrete_function(input_specs)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    graph = convert_variables_to_constants_v2(concrete).graph
    return tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops


def mean_seconds(step, batch, steps: int) -> tuple[float, float]:
    """Mean wall-clock and process CPU seconds per step."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = step(batch)
    tf.nest.map_structure(lambda t: t.numpy(), out)  # wait for the last step
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


def matmul_flops_per_second(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """FLOP/s of an n^3 matmul in `dtype` (best of `repeats`; only one element is fetched)."""
    a = tf.cast(tf.random.normal([n, n]), dtype)
    b = tf.cast(tf.random.normal([n, n]), dtype)
    matmul = tf.function(lambda: tf.matmul(a, b)[:1, :1])
    matmul().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul().numpy()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def pipeline_samples_per_second(catalog, config, cache, epochs: int = 2) -> float:
    """Training-mode tf.data over the catalog (all views), no model: median of `epochs` epochs."""
    rates = []
    for epoch in range(epochs + 1):
        dataset = views.make_dataset(catalog, views=config.model.views,
                                     crop_size=config.data.crop_size,
                                     batch_size=config.data.batch_size, training=True, seed=0,
                                     epoch=epoch, cache=cache)
        start, samples = time.perf_counter(), 0
        for batch in dataset:
            samples += int(batch["terrain"].shape[0])
        if epoch:  # epoch 0 traces and warms the page cache
            rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--samples", type=int, default=80, help="synthetic samples (> queue size)")
    parser.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.width=0.5")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the cmc step under XLA (default: unless the trunk is "
                             "grouped, where XLA on CPU is ~9x slower)")
    args = parser.parse_args()

    config = preset(args.preset).with_overrides(args.set)
    if args.xla is None:
        args.xla = not config.model.trunk.startswith("regnetx")
    dc, mc, tc = config.data, config.model, config.train
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; preset {args.preset}: "
          f"batch {dc.batch_size}, crop {dc.crop_size}, {mc.trunk} x{mc.width}, "
          f"{len(mc.views)} views, pairs {tc.pairs}, embedding {mc.embedding_dim}")
    with tempfile.TemporaryDirectory() as tmp:
        root = synth.generate(Path(tmp) / "data", n=args.samples, size=args.image_size, seed=0,
                              progress=False)
        catalog = data.discover(root)
        trainer = training.Trainer(config, Path(tmp) / "run", catalog, verbose=0)
        trainer.fill_queues()
        batch = next(iter(trainer.dataset(epoch=0)))
        batch = {v: batch[v] for v in mc.views}
        print(f"strategy {type(trainer.strategy).__name__} ({trainer.replicas} replica), "
              f"precision {trainer.precision}, queue {trainer.queue_size}, "
              f"{len(trainer.pairs)} pairs")

        variants = {
            "cmc step": trainer.train_step,
            "encoders only": encoders_only_step(trainer),
            "bare Keras (Conv2D)": bare_step(mc, tc, keras_conv, batch, trainer.queue_size),
            "bare + NormalizedConv2D": bare_step(mc, tc, normalized_conv, batch,
                                                 trainer.queue_size),
            "bare + NormConv, zero pad": bare_step(mc, tc, zero_pad_normalized_conv, batch,
                                                   trainer.queue_size),
            "bare + NormConv, no norm": bare_step(mc, tc, symmetric_pad_conv, batch,
                                                  trainer.queue_size),
        }
        if args.xla:
            # Forced on: the trainer itself uses XLA only with a GPU/TPU attached.
            xla_trainer = training.Trainer(config, Path(tmp) / "run_xla", catalog, verbose=0,
                                           jit_compile=True)
            xla_trainer.fill_queues()
            variants["cmc step, XLA (forced)"] = xla_trainer.train_step
        for step in variants.values():  # trace and warm up
            mean_seconds(step, batch, 2)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in variants.items():
                times[name].append(mean_seconds(step, batch, args.steps))
        seconds = {name: min(wall for wall, _ in values) for name, values in times.items()}
        cpu_seconds = {name: min(cpu for _, cpu in values) for name, values in times.items()}

        specs = {v: tf.TensorSpec(batch[v].shape, tf.float32) for v in mc.views}
        encoder_flops = forward_flops(lambda b: trainer.online(b, training=False), specs)
        step_flops = 4 * encoder_flops  # online forward + backward (~2x) + momentum forward
        matmul = matmul_flops_per_second()

        cache = shard_cache.prepare_cache(catalog, Path(tmp) / "cache", progress=False)
        png_rate = pipeline_samples_per_second(catalog, config, None)
        cache_rate = pipeline_samples_per_second(catalog, config, cache)

    batch_size = dc.batch_size
    reference = seconds["bare Keras (Conv2D)"]
    cpu_reference = cpu_seconds["bare Keras (Conv2D)"]
    print(f"\n{'variant':28s} {'ms/step':>8s} {'samples/s':>10s} {'vs bare Keras':>14s} "
          f"{'CPU ms/step':>12s} {'vs bare (CPU)':>14s}")
    for name, value in seconds.items():
        print(f"{name:28s} {value * 1e3:8.1f} {batch_size / value:10.1f} "
              f"{reference / value:13.2f}x {cpu_seconds[name] * 1e3:12.1f} "
              f"{cpu_reference / cpu_seconds[name]:13.2f}x")
    cmc = seconds["cmc step"]
    outside = (cmc - seconds["encoders only"]) / cmc
    outside_cpu = (cpu_seconds["cmc step"] - cpu_seconds["encoders only"]) / cpu_seconds["cmc step"]
    step_rate = batch_size / cmc
    rows = [
        ("cmc samples/s / bare Keras samples/s", f"{reference / cmc:.2f}", ">= 0.9"),
        ("  of which NormalizedConv2D vs Conv2D",
         f"{reference / seconds['bare + NormalizedConv2D']:.2f}", ""),
        ("    NormConv with zero 'SAME' padding instead",
         f"{reference / seconds['bare + NormConv, zero pad']:.2f}", "padding's share"),
        ("    NormConv without kernel normalisation",
         f"{reference / seconds['bare + NormConv, no norm']:.2f}", "normalisation's share"),
        ("  of which the rest (cmc vs bare + NormConv)",
         f"{seconds['bare + NormalizedConv2D'] / cmc:.2f}", ""),
        ("share of step outside the encoder passes", f"{100 * outside:.1f}%",
         f"< 5% (by CPU time {100 * outside_cpu:.1f}%)"),
        ("step GFLOP (4 x encoder forward)", f"{step_flops / 1e9:.2f}", ""),
        ("achieved GFLOP/s (cmc step)", f"{step_flops / cmc / 1e9:.1f}", ""),
        ("float32 matmul 2048^3 GFLOP/s", f"{matmul / 1e9:.1f}", ""),
        ("achieved / matmul FLOP/s", f"{step_flops / cmc / matmul:.2f}", ""),
        ("input pipeline from PNG, samples/s", f"{png_rate:.1f}",
         f"/ step {png_rate / step_rate:.1f}x"),
        ("input pipeline from cache, samples/s", f"{cache_rate:.1f}",
         f"/ step {cache_rate / step_rate:.1f}x"),
        ("peak RSS, MB", f"{peak_rss_mb():.0f}", ""),
    ]
    print(f"\n{'measure':48s} {'value':>8s}  target / note")
    for name, value, note in rows:
        print(f"{name:48s} {value:>8s}  {note}")


if __name__ == "__main__":
    main()
