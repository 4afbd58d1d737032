"""One short GPU run for issue 9: a kaggle-t4-like train step's speed, FLOP/s against the GPU's
peak, peak GPU memory, and grouped vs dense convolutions on the GPU.

Usage, on a machine with a GPU (about 5 minutes, most of it XLA compilation):
    python benchmarks/gpu_report.py [--batch 16] [--precision mixed_float16] [--steps 20]
    python benchmarks/gpu_report.py --smoke      # tiny shapes on any device: checks the script
    python benchmarks/gpu_report.py --cpu --batch 2 --steps 1 --precision off   # full shapes

kaggle-t4 trains a global batch of 32 on 2x T4 with MirroredStrategy, so one T4 runs 16: the
default here is one GPU at batch 16, mixed_float16 (what a T4 gets; a Hopper GPU would pick
mixed_bfloat16 by itself), XLA on (the trainer's default with a GPU). Measured:
  samples/s        of `Trainer.train_step` (online forward/backward and momentum forward of
                   the 4 views, 8 pairs of losses, Adam, EMA, queue), after the compile steps;
  FLOP/s           FLOPs per step from TensorFlow's profiler (4 x the online forward: forward,
                   backward ~2x, momentum forward), against (a) a large matmul in the policy's
                   compute dtype measured in the same run and (b) the datasheet peak when the
                   GPU is in DATASHEET_PEAK;
  peak memory      `tf.config.experimental.get_memory_info(GPU:0)["peak"]` over the timed steps;
  grouped convs    `benchmarks/grouped_conv.py` at GPU-sized shapes, in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from cmc_kit import data, synth, training  # noqa: E402
from cmc_kit.config import preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_step import forward_flops, matmul_flops_per_second  # noqa: E402

# Dense tensor-core peak FLOP/s (no sparsity) from the vendors' datasheets, by the name
# TensorFlow reports, for the compute dtype of each mixed-precision policy.
DATASHEET_PEAK = {
    "Tesla T4": {"float16": 65e12, "float32": 8.1e12},
    "Tesla P100-PCIE-16GB": {"float16": 18.7e12, "float32": 9.3e12},
    "NVIDIA A100-SXM4-40GB": {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA A100-SXM4-80GB": {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA H100 80GB HBM3": {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12},
}


def compute_dtype(precision: str) -> str:
    return {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(precision, "float32")


def gpu_description() -> tuple[str, str]:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "no GPU", "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    name = details.get("device_name", "GPU")
    capability = ".".join(map(str, details.get("compute_capability", ())))
    return name, f"{len(gpus)} x {name} (compute {capability})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="per GPU (kaggle-t4: 32 on 2 GPUs)")
    parser.add_argument("--precision", default="mixed_float16",
                        help="train.mixed_precision: mixed_float16 (T4-like), mixed_bfloat16, off")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and few steps: checks the script on any device")
    parser.add_argument("--cpu", action="store_true",
                        help="run the full shapes even without a GPU (slow; checks the script)")
    args = parser.parse_args()

    name, description = gpu_description()
    if name == "no GPU" and not (args.smoke or args.cpu):
        print("No GPU: nothing to measure here (the CPU figures come from train_step.py). "
              "`--smoke` checks this script on the CPU.")
        return
    if args.smoke:
        config = preset("cpu-demo").with_overrides({
            "data.crop_size": 32, "data.batch_size": 4, "model.trunk": "resnet18",
            "model.width": 0.125,
            "model.embedding_dim": 16, "train.queue_multiplier": 2,
            "train.mixed_precision": "off" if name == "no GPU" else args.precision})
        args.steps, samples, image_size, matmul_n = 2, 16, 64, 512
        grouped = ["--input", "16", "--batch", "2", "--widths", "0.25", "--rounds", "1",
                   "--steps", "1"]
    else:
        config = preset("kaggle-t4").with_overrides({
            "data.batch_size": args.batch, "train.mixed_precision": args.precision,
            "train.strategy": "default", "train.eval_subset": 0})
        samples, image_size, matmul_n = 2 * 10 * args.batch + 8, 256, 8192
        grouped = ["--input", "128", "--batch", str(args.batch), "--widths", "1.0",
                   "--rounds", "3", "--steps", "5"]
    dc, mc = config.data, config.model
    print(f"TensorFlow {tf.__version__}; {description}")
    print(f"batch {dc.batch_size} per device, crop {dc.crop_size}, {mc.trunk} x{mc.width}, "
          f"{len(mc.views)} views, precision setting {config.train.mixed_precision}")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        root = synth.generate(Path(tmp) / "data", n=samples, size=image_size, seed=0,
                              progress=False)
        trainer = training.Trainer(config, Path(tmp) / "run", data.discover(root), verbose=0)
        trainer.fill_queues()
        batch = next(iter(trainer.dataset(epoch=0)))
        print(f"set up in {time.monotonic() - started:.0f} s: precision {trainer.precision}, "
              f"XLA {trainer.jit_mode}, queue {trainer.queue_size}")

        started = time.monotonic()
        for _ in range(3):  # compile and warm up
            float(trainer.train_step(batch)["loss"])
        print(f"first 3 steps (compile) {time.monotonic() - started:.0f} s")
        on_gpu = name != "no GPU"
        if on_gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        start = time.perf_counter()
        for _ in range(args.steps):
            logs = trainer.train_step(batch)
        loss = float(logs["loss"])
        seconds = (time.perf_counter() - start) / args.steps
        peak_memory = tf.config.experimental.get_memory_info("GPU:0")["peak"] if on_gpu else None

        specs = {v: tf.TensorSpec(batch[v].shape, tf.float32) for v in mc.views}
        step_flops = 4 * forward_flops(lambda b: trainer.online(b, training=False), specs)

    dtype = compute_dtype(trainer.precision)
    matmul = matmul_flops_per_second(matmul_n, dtype=dtype)
    achieved = step_flops / seconds
    peak = DATASHEET_PEAK.get(name, {}).get(dtype)
    rows = [
        ("device", description),
        ("precision / XLA", f"{trainer.precision} / {trainer.jit_mode}"),
        ("train step, ms", f"{seconds * 1e3:.1f} (loss {loss:.3f})"),
        ("samples/s", f"{dc.batch_size / seconds:.1f}"),
        ("GFLOP per step", f"{step_flops / 1e9:.1f}"),
        ("achieved TFLOP/s", f"{achieved / 1e12:.2f}"),
        (f"{matmul_n}^3 {dtype} matmul TFLOP/s", f"{matmul / 1e12:.2f}"),
        ("achieved / matmul", f"{achieved / matmul:.3f}"),
        ("achieved / datasheet peak",
         f"{achieved / peak:.3f} (peak {peak / 1e12:.0f} TFLOP/s {dtype})" if peak else
         f"n/a ({name!r} not in DATASHEET_PEAK)"),
        ("peak GPU memory, GB", f"{peak_memory / 1e9:.2f}" if peak_memory is not None else "n/a"),
    ]
    print()
    for label, value in rows:
        print(f"{label:34s} {value}")

    print("\ngrouped vs dense convolutions on this device (benchmarks/grouped_conv.py "
          + " ".join(grouped) + "):", flush=True)
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "grouped_conv.py"),
                             *grouped], capture_output=True, text=True, check=False)
    print(result.stdout.strip() or result.stderr[-2000:])


if __name__ == "__main__":
    main()
