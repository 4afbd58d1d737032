"""Grouped vs dense convolutions: RegNetX-1.6GF vs ResNet-34 train-step time per FLOP on CPU.

Usage: python benchmarks/grouped_conv.py [--input 32] [--batch 4] [--widths 1.0 0.5] [--rounds 3]

Both trunks are built by `cmc_kit.models.build_trunk` (NormalizedConv2D everywhere; RegNetX's
3x3 convs are grouped, 24 channels per group at width 1). Each is timed on a forward + backward
pass in a `tf.function` (graph mode, no XLA: XLA makes grouped convs ~9x slower on CPU), the
two trunks alternating in every round so both see the same machine load. FLOPs are counted
by TensorFlow's profiler on the frozen forward graph (2 x multiply-adds; x3 for a train step).
The question (issue 9): is grouped NormalizedConv2D no slower per FLOP than 2x the dense one?
A third row, RegNetX-1.6GF's own topology without groups at equal FLOPs, separates the cost
of grouping from that of the architecture (1x1 convs and small late stages are less
efficient per FLOP than ResNet-34's 3x3 convs whatever the grouping).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from cmc_kit import layers, models  # noqa: E402

TRUNKS = ("resnet34", "regnetx-1.6gf", "regnetx-1.6gf-dense")


def dense_twin(width: float):
    """RegNetX-1.6GF's topology without groups, stage widths chosen for equal FLOPs.

    An X block of width c and group width g costs 2c^2 + 9cg multiply-adds per position
    (two 1x1 convs, one grouped 3x3); a dense one of width c' costs 11c'^2.
    """
    spec = models.TRUNK_SPECS["regnetx-1.6gf"]
    widths = models.trunk_stage_channels("regnetx-1.6gf", width)
    g = spec.group_width
    dense_widths = tuple(max(8, round(((2 * c * c + 9 * c * g) / 11) ** 0.5)) for c in widths)
    dense = dataclasses.replace(spec, widths=dense_widths, group_width=0,
                                stem_width=models.trunk_input_channels("regnetx-1.6gf", width))
    return models.build_bottleneck_resnet(dense, 1.0, model_name="dense_twin"), dense_widths


def forward_flops(function, *input_specs) -> int:
    """Floating-point operations of one call of `function` (profiler count of the frozen graph).

    Traced without the XLA-compiled padding, whose function call hides the shapes after it.
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    with layers.xla_padding(False):
        concrete = tf.function(function).get_concrete_function(*input_specs)
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops


def train_pass(trunk):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(trunk(x, training=True)))
        return tape.gradient(loss, trunk.trainable_weights)
    return step


def seconds_per_step(step, x, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        grads = step(x)
    float(grads[0][0, 0, 0, 0])  # wait for the last step
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=int, default=32, help="trunk input side (= crop / 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, intra-op threads {threads}; "
          f"batch {args.batch}, trunk input {args.input}x{args.input}, fwd+bwd, median of "
          f"{args.rounds} rounds x {args.steps} steps")
    header = (f"{'trunk':20s} {'width':>5s} {'groups (3x3)':>16s} {'GFLOP/step':>10s} "
              f"{'ms/step':>8s} {'GFLOP/s':>8s} {'ns/MFLOP':>9s}")
    for width in args.widths:
        rows = {}
        for name in TRUNKS:
            if name.endswith("-dense"):
                trunk, _ = dense_twin(width)
                channels = models.trunk_input_channels("regnetx-1.6gf", width)
            else:
                trunk = models.build_trunk(name, width)
                channels = models.trunk_input_channels(name, width)
            x = tf.random.normal([args.batch, args.input, args.input, channels])
            flops = 3 * forward_flops(lambda t, trunk=trunk: trunk(t),
                                      tf.TensorSpec(x.shape, tf.float32))
            if name.endswith("-dense"):
                groups = [1, 1, 1, 1]
            else:
                group_width = models.TRUNK_SPECS[name].group_width
                groups = [c // group_width if group_width else 1
                          for c in models.trunk_stage_channels(name, width)]
            step = train_pass(trunk)
            step(x)  # trace
            rows[name] = {"flops": flops, "groups": groups, "step": step, "x": x, "times": []}
        for _ in range(args.rounds):
            for name in TRUNKS:  # alternate: same load for both
                row = rows[name]
                row["times"].append(seconds_per_step(row["step"], row["x"], args.steps))
        print()
        print(header)
        per_flop = {}
        for name in TRUNKS:
            row = rows[name]
            seconds = statistics.median(row["times"])
            per_flop[name] = seconds / row["flops"]
            print(f"{name:20s} {width:5.2f} {str(row['groups']):>16s} {row['flops'] / 1e9:10.2f} "
                  f"{seconds * 1e3:8.1f} {row['flops'] / seconds / 1e9:8.1f} "
                  f"{per_flop[name] * 1e15:9.1f}")
        ratio = per_flop["regnetx-1.6gf"] / per_flop["resnet34"]
        grouping = per_flop["regnetx-1.6gf"] / per_flop["regnetx-1.6gf-dense"]
        print(f"time per FLOP, grouped RegNetX / dense ResNet-34: {ratio:.2f}x "
              f"(target <= 2x: {'yes' if ratio <= 2.0 else 'NO'}); grouped RegNetX / its dense "
              f"twin of equal FLOPs (the cost of grouping alone): {grouping:.2f}x")


if __name__ == "__main__":
    main()
