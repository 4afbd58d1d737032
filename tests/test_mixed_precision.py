"""Mixed precision: policy choice per device, finite training under bfloat16 / float16 on CPU,
float32 embeddings, checkpoints that load back and resume, no leaked global policy."""

import numpy as np
import pandas as pd
import pytest

from cmc_kit.config import preset


def tiny_config(**overrides):
    base = {
        "data.crop_size": 32, "data.batch_size": 8, "data.validation_fraction": 0.2,
        "model.width": 0.125, "model.embedding_dim": 16,
        "model.views": "terrain,height,segmentation", "train.pairs": "full",
        "train.epochs": 1, "train.queue_multiplier": 2, "train.eval_subset": 0,
    }
    base.update(overrides)
    return preset("cpu-demo").with_overrides(base)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from cmc_kit import synth

    return synth.generate(tmp_path_factory.mktemp("mixed") / "data", n=30, size=64, seed=5,
                          progress=False)


# -- which policy where ---------------------------------------------------------------------------

@pytest.mark.parametrize("tpu, capabilities, expected", [
    (True, [], "mixed_bfloat16"),
    (False, [], "float32"),                            # CPU
    (False, [(7, 5), (7, 5)], "mixed_float16"),        # Kaggle 2x T4
    (False, [(8, 0)], "mixed_float16"),                # A100
    (False, [(9, 0)], "mixed_bfloat16"),               # H100 / H200
    (False, [(9, 0), (7, 5)], "mixed_float16"),        # the weakest GPU decides
    (False, [(6, 0)], "float32"),                      # P100: no tensor cores
])
def test_policy_for_devices(tpu, capabilities, expected):
    from cmc_kit.training import precision_for_devices

    assert precision_for_devices(tpu=tpu, gpu_capabilities=capabilities) == expected


def test_settings_map_to_policies():
    import tensorflow as tf

    from cmc_kit.training import resolve_mixed_precision

    assert resolve_mixed_precision("off") == "float32"
    assert resolve_mixed_precision("mixed_bfloat16") == "mixed_bfloat16"
    if not tf.config.list_physical_devices("GPU") and not tf.config.list_logical_devices("TPU"):
        assert resolve_mixed_precision("auto") == "float32"


def test_kaggle_t4_preset_turns_on_mixed_precision_and_xla():
    train = preset("kaggle-t4").train
    assert train.mixed_precision == "auto" and train.jit_compile
    assert preset("cpu-demo").train.mixed_precision == "off"


# -- training under a mixed policy --------------------------------------------------------------

def _cpu_kernels_exist(policy: str, grouped: bool) -> tuple[bool, str]:
    """Forward + backward of a tiny (grouped) conv in the policy's compute dtype on this CPU."""
    import tensorflow as tf

    dtype = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    x = tf.ones([1, 5, 5, 4], dtype)
    kernel = tf.ones([3, 3, 2 if grouped else 4, 4], dtype)
    try:
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "VALID"))
        tape.gradient(y, [x, kernel])
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.UnimplementedError) as err:
        return False, str(err).splitlines()[0][:200]
    return True, ""


@pytest.mark.slow
@pytest.mark.parametrize("policy, trunk", [
    ("mixed_bfloat16", "resnet34"),
    ("mixed_bfloat16", "regnetx-200mf"),
    ("mixed_float16", "resnet34"),
    ("mixed_float16", "regnetx-200mf"),
])
def test_mixed_precision_trains_finite_and_checkpoints_load_back(policy, trunk, data_root,
                                                                tmp_path):
    import keras
    import tensorflow as tf

    from cmc_kit import models, runs, training

    grouped = trunk.startswith("regnetx")
    supported, reason = _cpu_kernels_exist(policy, grouped)
    if not supported:
        pytest.skip(f"TensorFlow {tf.__version__} has no CPU kernel for {policy} "
                    f"{'grouped ' if grouped else ''}conv gradients: {reason}")

    config = tiny_config(**{"train.mixed_precision": policy, "model.trunk": trunk})
    run = tmp_path / "run"
    result = training.train(data_root, run, config, verbose=0)
    assert result.step == 3
    assert keras.mixed_precision.global_policy().name == "float32", "policy leaked"
    log = pd.read_csv(run / "log.csv")
    terms = [c for c in log.columns if c.startswith(("inter_", "intra_"))] + ["loss"]
    assert np.all(np.isfinite(log[terms].to_numpy()))

    reader = tf.train.load_checkpoint(result.checkpoint)
    skipped = int(log["skipped_steps"].iloc[0])
    if policy == "mixed_float16":
        # Loss-scale warm-up: overflowing steps skip the update (and the EMA and queue) and are
        # reported; the optimizer applied exactly the others.
        applied = int(reader.get_tensor(
            "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
        assert applied == result.step - skipped
    else:
        assert skipped == 0
    names = list(reader.get_variable_to_shape_map())
    # Weights are stored in float32 whatever the compute dtype; float16 adds the loss scale.
    assert all(reader.get_variable_to_dtype_map()[n] != tf.bfloat16 for n in names)
    assert any("dynamic_scale" in n for n in names) == (policy == "mixed_float16")

    # The checkpoint loads into a float32 encoder and into one built under the policy: both
    # give float32 embeddings, and they agree to the policy's precision.
    handle = runs.load_run(run)
    full = handle.encoder("online")
    rng = np.random.default_rng(0)
    batch = {v: rng.uniform(-1, 1, (4, 32, 32, models.VIEW_CHANNELS[v])).astype(np.float32)
             for v in full.views}
    reference = full(batch, training=False)
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = models.build_encoder(config.model, crop_size=32, name="online")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(full.get_weights())
    embeddings = mixed(batch, training=False)
    for view in full.views:
        assert reference[view].dtype == embeddings[view].dtype == tf.float32
        a, b = reference[view].numpy(), embeddings[view].numpy()
        assert np.all(np.isfinite(b))
        cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.98, (view, cosine)

    # And training resumes from it under the same policy, and really updates the weights
    # (float16: the loss scale starts at 2^15 and halves on every overflowing step first).
    resumed = training.train(data_root, run, config.with_overrides({"train.epochs": 2}), verbose=0)
    log = pd.read_csv(run / "log.csv")
    assert resumed.step == 6 and np.isfinite(log["loss"]).all()
    reader = tf.train.load_checkpoint(resumed.checkpoint)
    applied = int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    # The optimizer applied exactly the steps the log does not report as skipped.
    assert applied == 6 - int(log["skipped_steps"].sum())
    if policy == "mixed_bfloat16":
        assert applied == 6
    elif applied == 0:
        # Seen for regnetx (grouped convolutions) on a CPU with AVX512-FP16, where oneDNN
        # computes float16 natively: every step's gradients overflowed, 6 of 6 skipped (resnet34
        # applied some; with TF_ENABLE_ONEDNN_OPTS=0 TensorFlow has no such CPU kernel at all).
        pytest.xfail("this CPU's float16 kernels overflowed on every step (all 6 skipped, "
                     "bookkeeping checked); the weight update is checked on other CPUs")
    else:
        assert applied < 6  # the loss scale starts at 2^15: its first steps overflow
    trained = runs.load_run(run).encoder("online").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(trained, full.get_weights()))


def test_losses_compute_in_float32_from_low_precision_embeddings():
    import tensorflow as tf

    from cmc_kit.objectives import inter_batch_loss, intra_batch_loss

    rng = np.random.default_rng(1)
    query, key = rng.normal(size=(2, 8, 16)).astype(np.float32)
    queue = rng.normal(size=(32, 16)).astype(np.float32)
    for dtype in (tf.bfloat16, tf.float16):
        low = [tf.cast(t, dtype) for t in (query, key, queue)]
        upcast = [tf.cast(t, tf.float32) for t in low]  # the same values, in float32
        inter = inter_batch_loss(*low, temperature=0.07)
        intra = intra_batch_loss(*low[:2], temperature=0.07, key_offset=0)
        assert inter.dtype == intra.dtype == tf.float32
        np.testing.assert_allclose(float(inter), float(inter_batch_loss(*upcast, 0.07)), rtol=1e-6)
        np.testing.assert_allclose(float(intra), float(intra_batch_loss(*upcast[:2], 0.07)),
                                   rtol=1e-6)


# -- resuming on hardware with another precision ------------------------------------------------

def _adam_steps_and_loss_scale(checkpoint: str) -> tuple[int, float | None]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    keys = reader.get_variable_to_shape_map()
    scale_key = "loss_scale/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"
    return (int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")),
            float(reader.get_tensor(scale_key)) if scale_key in keys else None)


def _applied_steps(run) -> int:
    log = pd.read_csv(run / "log.csv")
    return int((log["step"].diff().fillna(log["step"]) - log["skipped_steps"]).sum())


@pytest.mark.slow
def test_a_run_resumes_when_the_precision_changes(data_root, tmp_path):
    """Kaggle sessions change hardware: TPU (bfloat16) -> 2x T4 (float16 with a loss scale) ->
    P100 (float32). Adam's state and the loss scale carry over each time."""
    from cmc_kit import training

    supported, reason = _cpu_kernels_exist("mixed_float16", grouped=False)
    if not supported:
        pytest.skip(f"no CPU kernel for float16 conv gradients: {reason}")
    run = tmp_path / "run"
    scales = []
    for epochs, policy in enumerate(["mixed_bfloat16", "mixed_float16", "mixed_float16", "off"], 1):
        config = tiny_config(**{"train.mixed_precision": policy, "train.epochs": epochs})
        result = training.train(data_root, run, config, verbose=0)
        assert result.epoch == epochs
        adam_steps, scale = _adam_steps_and_loss_scale(result.checkpoint)
        # Adam counted every applied update since the start: nothing was re-initialised.
        assert adam_steps == _applied_steps(run)
        assert (scale is not None) == (policy == "mixed_float16")
        scales.append(scale)
    # The second float16 session continued from the first one's loss scale (2^15 halved once
    # per overflowing step, no growth within a few steps), not from 2^15 again.
    skipped = pd.read_csv(run / "log.csv")["skipped_steps"].tolist()
    assert skipped[0] == 0 and skipped[3] == 0  # only float16 overflows
    assert scales[1] == 2.0 ** 15 / 2 ** skipped[1]
    assert scales[2] == 2.0 ** 15 / 2 ** (skipped[1] + skipped[2])


@pytest.mark.slow
def test_a_checkpoint_with_the_older_float16_layout_resumes_in_float32(data_root, tmp_path,
                                                                       monkeypatch):
    """Checkpoints written before the layout change kept Adam inside the loss-scale wrapper."""
    import tensorflow as tf

    from cmc_kit import runs, training

    supported, reason = _cpu_kernels_exist("mixed_float16", grouped=False)
    if not supported:
        pytest.skip(f"no CPU kernel for float16 conv gradients: {reason}")
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # the old layout: the wrapper itself was checkpointed
        patch.setattr(training.state, "saved_optimizer", lambda optimizer: optimizer)
        first = training.train(data_root, run, tiny_config(**{
            "train.mixed_precision": "mixed_float16", "train.epochs": 2}), verbose=0)
    old_keys = tf.train.load_checkpoint(first.checkpoint).get_variable_to_shape_map()
    assert any(key.startswith("optimizer/inner_optimizer/_iterations") for key in old_keys)
    applied_before = _applied_steps(run)
    assert applied_before > 0

    float16_copy = tmp_path / "copy"
    runs.bring_in_previous_run(float16_copy, resume_from=run)
    resumed = training.train(data_root, run, tiny_config(**{"train.epochs": 3}), verbose=0)
    assert _adam_steps_and_loss_scale(resumed.checkpoint) == (applied_before + 3, None)

    # Under float16 again, the old layout restores the loss scale too.
    old_scale = float(tf.train.load_checkpoint(first.checkpoint).get_tensor(
        "optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"))
    again = training.train(data_root, float16_copy, tiny_config(**{
        "train.mixed_precision": "mixed_float16", "train.epochs": 3}), verbose=0)
    skipped = int(pd.read_csv(float16_copy / "log.csv")["skipped_steps"].iloc[-1])
    adam_steps, scale = _adam_steps_and_loss_scale(again.checkpoint)
    assert adam_steps == applied_before + 3 - skipped
    assert scale == old_scale / 2 ** skipped
