"""Trunks, heads, the CMC encoder and the momentum twin (tiny widths and crops)."""

import dataclasses
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from cmc_kit import models
from cmc_kit.config import TRUNK_NAMES, Config, ModelConfig
from cmc_kit.layers import NormalizedConv2D
from cmc_kit.models import (VIEW_CHANNELS, CMCEncoder, build_encoder, build_momentum_twin,
                            build_trunk, momentum_update, stage_model)

TINY = 0.125


def view_batch(views, batch=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {v: rng.normal(size=(batch, size, size, VIEW_CHANNELS[v])).astype("float32")
            for v in views}


def conv_weight_count(model):
    return sum(int(np.prod(layer.kernel.shape)) for layer in model.layers
               if isinstance(layer, NormalizedConv2D))


@pytest.fixture
def restore_policy():
    previous = keras.mixed_precision.dtype_policy()
    yield
    keras.mixed_precision.set_dtype_policy(previous)


# -- trunks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRUNK_NAMES)
def test_trunk_shapes_and_stage_outputs(name):
    trunk = build_trunk(name, width=TINY)
    stride = models.trunk_stride(name)
    channels = models.trunk_input_channels(name, TINY)
    stage_channels = models.trunk_stage_channels(name, TINY)
    x = np.random.default_rng(0).normal(size=(2, 2 * stride, 4 * stride, channels))
    y = trunk(x.astype("float32"))
    assert tuple(y.shape) == (2, 2, 4, stage_channels[-1])

    maps = stage_model(trunk)(x.astype("float32"))
    spec = models.TRUNK_SPECS[name]
    assert len(maps) == len(spec.depths)
    height, width = x.shape[1:3]
    for feature_map, stage_stride, stage_width in zip(maps, spec.strides, stage_channels):
        height, width = height // stage_stride, width // stage_stride
        assert tuple(feature_map.shape) == (2, height, width, stage_width)
    # The trunk's output is the last stage after the final leaky ReLU.
    last = maps[-1].numpy()
    np.testing.assert_allclose(y.numpy(), np.where(last > 0, last, 0.2 * last), rtol=1e-6)


def test_resnet34_stages_hold_torchvision_conv_weight_count():
    # torchvision ResNet-34 layer1..layer4 conv weights (3x3 convs + 1x1 downsample convs).
    trunk = build_trunk("resnet34", width=1.0)
    assert conv_weight_count(trunk) == 21_258_240
    assert trunk.count_params() == 21_258_240  # no biases, no BatchNorm


def test_resnet18_stages_hold_torchvision_conv_weights():
    # torchvision's resnet18 has 11,689,512 parameters: minus its 7x7 stem conv (9,408), its
    # BatchNorms (9,600) and the 1000-way classifier (513,000), the stages' conv weights.
    trunk = build_trunk("resnet18", width=1.0)
    assert conv_weight_count(trunk) == 11_689_512 - 9_408 - 9_600 - 513_000
    blocks = {layer.name.split("_")[1] for layer in trunk.layers if "_block" in layer.name}
    assert blocks == {"block1", "block2"}  # two basic blocks in every stage


@pytest.mark.parametrize("name, torchvision_params, stem_width", [
    ("regnetx-200mf", 2_684_792, 32),
    ("regnetx-800mf", 7_259_656, 32),
])
def test_regnetx_matches_torchvision_conv_weights(name, torchvision_params, stem_width):
    # torchvision's total minus its 3x3 stem conv, every BatchNorm (2 params per channel)
    # and the 1000-way classifier leaves exactly the stages' conv weights.
    spec = models.TRUNK_SPECS[name]
    batchnorm = 2 * stem_width + sum(d * 6 * w + 2 * w for d, w in zip(spec.depths, spec.widths))
    classifier = spec.widths[-1] * 1000 + 1000
    expected = torchvision_params - 3 * 9 * stem_width - batchnorm - classifier
    assert conv_weight_count(build_trunk(name, width=1.0)) == expected


def test_regnetx_width_multiplier_rounds_to_group_width():
    widths = models.trunk_stage_channels("regnetx-1.6gf", 0.5)
    assert widths == [48, 96, 216, 456]  # 72, 168, 408, 912 halved, multiples of 24
    trunk = build_trunk("regnetx-1.6gf", width=0.5)
    conv = trunk.get_layer("stage2_block1_conv2")
    assert conv.groups == 96 // 24 and conv.kernel.shape == (3, 3, 24, 96)


def test_trunk_invalid_arguments():
    with pytest.raises(ValueError, match="model.trunk"):
        build_trunk("resnet50")
    with pytest.raises(ValueError, match="Received: width=0"):
        build_trunk("resnet34", width=0)


def test_trunk_keras_file_round_trip(tmp_path):
    trunk = build_trunk("regnetx-200mf", width=TINY)
    path = tmp_path / "trunk.keras"
    trunk.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 8)).astype("float32")
    np.testing.assert_array_equal(loaded(x).numpy(), trunk(x).numpy())


# -- encoder -----------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["mlp", "attention"])
def test_encoder_embeddings_and_features(head):
    config = ModelConfig(width=TINY, head=head, embedding_dim=16)
    encoder = build_encoder(config, crop_size=32)
    inputs = view_batch(config.views)
    inputs["id"] = np.array([b"0001", b"0002"])  # extra keys are ignored
    embeddings = encoder(inputs, training=True)
    assert set(embeddings) == set(config.views)
    for value in embeddings.values():
        assert value.dtype == "float32" and tuple(value.shape) == (2, 16)

    features = encoder.encode_features(inputs["terrain"], view="terrain")
    trunk_out = encoder.trunk("terrain")(encoder.stem("terrain")(inputs["terrain"])).numpy()
    np.testing.assert_allclose(features.numpy(), trunk_out.mean(axis=(1, 2)), rtol=1e-5,
                               atol=1e-6)
    maps = encoder.stage_features(inputs["height"], view="height")
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32),
                                              (2, 2, 2, 64)]
    if head == "attention":
        weights = encoder.attention_weights(inputs["terrain"], view="terrain").numpy()
        assert weights.shape == (2, config.attention_heads, 4)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="model.head='attention'"):
            encoder.attention_weights(inputs["terrain"])


def test_stacked_trunk_call_equals_per_view_calls():
    config = ModelConfig(width=TINY, embedding_dim=8)
    encoder = build_encoder(config, crop_size=32)
    inputs = view_batch(config.views, batch=3)
    stacked = encoder(inputs)
    for view in config.views:
        features = encoder.trunk(view)(encoder.stem(view)(inputs[view]))
        expected = encoder.head(view)(features).numpy()
        np.testing.assert_allclose(stacked[view].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared_trunk, head", [(True, "mlp"), (False, "attention")])
def test_embed_of_one_view_equals_the_full_forward_pass(shared_trunk, head):
    config = ModelConfig(width=TINY, head=head, embedding_dim=8, shared_trunk=shared_trunk)
    encoder = build_encoder(config, crop_size=32)
    inputs = view_batch(config.views, batch=3, seed=1)
    together = encoder(inputs)  # all views at once (stacked through a shared trunk)
    for view in config.views:
        alone = encoder.embed(inputs[view], view=view)  # overview via terrain's shared stem
        assert alone.dtype == "float32" and tuple(alone.shape) == (3, 8)
        np.testing.assert_allclose(alone.numpy(), together[view].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, H, W, 7\]"):
        encoder.embed(inputs["terrain"], view="segmentation")


def test_seeded_encoder_is_reproducible_and_leaves_global_random_streams_alone():
    config = ModelConfig(views=("terrain", "height"), trunk="regnetx-200mf", width=TINY,
                         head="attention", embedding_dim=8)
    weights = lambda m: [w.numpy() for w in m.weights]  # noqa: E731
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first = weights(build_encoder(config, crop_size=32, seed=3))
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    again = weights(build_encoder(config, crop_size=32, seed=3))
    other = weights(build_encoder(config, crop_size=32, seed=4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other) if a.std() > 0)
    # Same weights as reseeding every global stream first, the old way of fixing them.
    keras.utils.set_random_seed(3)
    reseeded = weights(build_encoder(config, crop_size=32))
    assert all(np.array_equal(a, b) for a, b in zip(first, reseeded))
    with pytest.raises(ValueError, match="Received: seed='3'"):
        build_encoder(config, crop_size=32, seed="3")


def test_views_of_different_sizes_fall_back_to_per_view_calls():
    config = ModelConfig(views=("terrain", "height"), width=TINY, embedding_dim=8)
    encoder = build_encoder(config, crop_size=32)
    inputs = {"terrain": view_batch(["terrain"], size=32)["terrain"],
              "height": view_batch(["height"], size=64)["height"]}
    embeddings = encoder(inputs)
    expected = encoder.head("height")(encoder.trunk("height")(encoder.stem("height")(
        inputs["height"])))
    np.testing.assert_allclose(embeddings["height"].numpy(), expected.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_stem_sharing_and_separate_trunks():
    shared = build_encoder(ModelConfig(width=TINY), crop_size=32)
    assert shared.stem("overview") is shared.stem("terrain")
    assert shared.trunk("height") is shared.trunk("terrain")
    assert [v for v in shared.views if shared.stem(v).kernel.shape[2] == 3] == [
        "terrain", "overview"]

    separate = build_encoder(ModelConfig(width=TINY, shared_trunk=False,
                                         share_overview_stem=False), crop_size=32)
    assert separate.stem("overview") is not separate.stem("terrain")
    trunks = {id(separate.trunk(v)) for v in separate.views}
    assert len(trunks) == 4
    # Each trunk adds its own weights: 3 more copies than the shared encoder, 1 more stem.
    trunk_params = shared.trunk("terrain").count_params()
    stem_params = shared.stem("terrain").count_params()
    assert separate.count_params() == shared.count_params() + 3 * trunk_params + stem_params
    embeddings = separate(view_batch(separate.views))
    assert all(tuple(e.shape) == (2, 128) for e in embeddings.values())


def test_encoder_bad_inputs_raise_clear_errors():
    encoder = build_encoder(ModelConfig(views=("terrain", "height"), width=TINY), crop_size=32)
    inputs = view_batch(["terrain", "height"])
    with pytest.raises(ValueError, match="no 'height' entry"):
        encoder({"terrain": inputs["terrain"]})
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        encoder({"terrain": inputs["terrain"], "height": inputs["terrain"]})
    with pytest.raises(ValueError, match="Received: view='segmentation'"):
        encoder.encode_features(inputs["terrain"], view="segmentation")
    with pytest.raises(ValueError, match="Received: crop_size=0"):
        build_encoder(ModelConfig(width=TINY), crop_size=0)


def test_encoder_mixed_precision_gives_float32_embeddings(restore_policy):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    config = ModelConfig(views=("terrain", "segmentation"), trunk="regnetx-200mf", width=TINY,
                         head="attention", embedding_dim=8)
    encoder = build_encoder(config, crop_size=64)
    assert all(w.dtype == "float32" for w in encoder.weights)
    embeddings = encoder(view_batch(config.views, size=64))
    for value in embeddings.values():
        assert value.dtype == "float32" and np.all(np.isfinite(value.numpy()))
    maps = encoder.stage_features(view_batch(["terrain"], size=64)["terrain"])
    assert all(m.dtype == "float32" and np.all(np.isfinite(m.numpy())) for m in maps)


def test_same_config_builds_same_architecture_and_round_trips():
    config = ModelConfig(views=("terrain", "height", "overview"), trunk="regnetx-400mf",
                         width=TINY, head="attention", embedding_dim=12, shared_trunk=False)
    # ModelConfig survives the run's JSON.
    assert Config.from_dict(Config(model=config).to_dict()).model == config

    first, second = build_encoder(config, 32), build_encoder(config, 32, name="other")
    describe = lambda m: [(w.path, tuple(w.shape)) for w in m.weights]  # noqa: E731
    assert describe(first) == describe(second)
    clone = CMCEncoder.from_config(first.get_config())
    assert clone.config == config and clone.crop_size == 32 and clone.name == first.name
    assert describe(clone) == describe(first)


def test_encoder_keras_file_round_trip(tmp_path):
    config = ModelConfig(views=("terrain", "segmentation"), width=TINY, head="attention",
                         embedding_dim=8)
    encoder = build_encoder(config, crop_size=32)
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CMCEncoder) and loaded.config == config
    inputs = view_batch(config.views)
    for view, value in encoder(inputs).items():
        np.testing.assert_array_equal(loaded(inputs)[view].numpy(), value.numpy())


# -- momentum twin ------------------------------------------------------------------------------

def test_momentum_twin_copies_weights_and_is_frozen():
    config = ModelConfig(views=("terrain", "height"), width=TINY, embedding_dim=8)
    online = build_encoder(config, crop_size=32)
    twin = build_momentum_twin(online, name="momentum")
    assert twin.name == "momentum" and not twin.trainable and twin.trainable_weights == []
    assert [w.path for w in twin.weights] == [w.path for w in online.weights]
    for q, k in zip(online.weights, twin.weights):
        assert q is not k
        np.testing.assert_array_equal(k.numpy(), q.numpy())
    inputs = view_batch(config.views)
    for view, value in online(inputs).items():
        np.testing.assert_array_equal(twin(inputs)[view].numpy(), value.numpy())
    # Independent storage: changing the online weights leaves the twin alone.
    online.weights[0].assign(online.weights[0] + 1.0)
    assert not np.array_equal(online.weights[0].numpy(), twin.weights[0].numpy())


def test_momentum_update_follows_numpy_recursion_inside_tf_function():
    config = ModelConfig(views=("terrain", "height"), width=TINY, embedding_dim=8)
    online = build_encoder(config, crop_size=32)
    twin = build_momentum_twin(online)
    rng = np.random.default_rng(7)
    theta_k = [w.numpy() for w in twin.weights]

    update = tf.function(momentum_update)
    for step, m in enumerate([0.9, 0.5, 0.99]):
        for w in online.weights:  # pretend the optimizer moved the online weights
            w.assign(w.numpy() + rng.normal(size=w.shape).astype("float32"))
        theta_q = [w.numpy() for w in online.weights]
        m_arg = tf.constant(m) if step % 2 else m
        update(online, twin, m_arg)
        m32 = np.float32(m)
        theta_k = [m32 * k + (np.float32(1) - m32) * q for k, q in zip(theta_k, theta_q)]
    for expected, actual in zip(theta_k, twin.weights):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_momentum_update_rejects_mismatched_models():
    a = build_encoder(ModelConfig(views=("terrain", "height"), width=TINY), crop_size=32)
    b = build_encoder(ModelConfig(views=("terrain", "height"), width=0.25), crop_size=32)
    with pytest.raises(ValueError, match="build_momentum_twin"):
        momentum_update(a, b, 0.99)


def test_config_dataclass_fields_are_all_used():
    # Guard: a new ModelConfig field must be handled by the encoder (and this list updated).
    assert [f.name for f in dataclasses.fields(ModelConfig)] == [
        "views", "trunk", "width", "head", "embedding_dim", "shared_trunk",
        "share_overview_stem", "attention_heads", "attention_dim", "branch_gain",
        "learnable_gain"]


def test_tf_checkpoint_restores_encoder_and_twin(tmp_path):
    # The trainer checkpoints both networks with tf.train.Checkpoint.
    config = ModelConfig(views=("terrain", "height", "overview"), width=TINY, head="attention",
                         shared_trunk=False, embedding_dim=8)
    online = build_encoder(config, crop_size=32)
    twin = build_momentum_twin(online)
    path = tf.train.Checkpoint(online=online, momentum=twin).save(str(tmp_path / "ckpt"))

    fresh_online = build_encoder(config, crop_size=32)  # new random initialisation
    fresh_twin = build_momentum_twin(fresh_online)
    status = tf.train.Checkpoint(online=fresh_online, momentum=fresh_twin).restore(path)
    status.assert_consumed()
    for saved, restored in zip(online.weights + twin.weights,
                               fresh_online.weights + fresh_twin.weights):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())


# -- ReZero residual branches ---------------------------------------------------------------------

def test_rezero_blocks_start_as_their_shortcuts_and_learn_a_gain():
    import keras

    from cmc_kit.layers import BranchGain
    from cmc_kit.models import ResidualBranch

    trunk = build_trunk("resnet34", width=TINY, residual=ResidualBranch(0.0, learnable=True))
    gains = [layer for layer in trunk.layers if isinstance(layer, BranchGain)]
    assert len(gains) == 3 + 4 + 6 + 3  # one per block of ResNet-34
    assert all(float(g.gain.numpy()) == 0.0 and g.gain.trainable for g in gains)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, trunk.input.shape[-1])).astype("float32")
    before = trunk(x).numpy()
    # The branches' convolutions do not matter yet: the blocks are their shortcuts alone.
    for layer in trunk.layers:
        if layer.name.endswith("_conv2"):
            layer.kernel.assign(layer.kernel * 3.0 + 1.0)
    np.testing.assert_allclose(trunk(x).numpy(), before, rtol=1e-6, atol=1e-6)
    gains[0].gain.assign(0.5)
    assert not np.allclose(trunk(x).numpy(), before)
    # A fixed gain of 1 builds the trunk exactly as before: no extra layers or weights.
    plain = build_trunk("resnet34", width=TINY)
    assert not any(isinstance(layer, BranchGain) for layer in plain.layers)
    assert [w.path for w in plain.weights] == [w.path for w in build_trunk("resnet34", width=TINY,
                                                                           residual=ResidualBranch())
                                               .weights]
    layer = BranchGain(0.25, learnable=True, name="g")
    restored = BranchGain.from_config(layer.get_config())
    assert (restored.initial, restored.learnable, restored.name) == (0.25, True, "g")
    assert keras.saving.get_registered_name(BranchGain) == "cmc_kit>BranchGain"
