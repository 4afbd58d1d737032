"""NormalizedConv2D and AttentionPooling2D against naive NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cmc_kit import layers
from cmc_kit.layers import AttentionPooling2D, NormalizedConv2D, ring_symmetric_pad, symmetric_pad


def reference_normalized_conv(x, kernel, stride, groups, epsilon=1e-8):
    """Naive NumPy: per-filter L2-normalised kernel, np.pad symmetric, VALID grouped conv."""
    kh, kw, cin_g, filters = kernel.shape
    norm = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=(0, 1, 2)) + epsilon)
    k = kernel / norm                                                   # [kh, kw, cin_g, O]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x.astype(np.float64), [(0, 0), (ph, ph), (pw, pw), (0, 0)], mode="symmetric")
    batch, height, width, _ = xp.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((batch, out_h, out_w, filters))
    fg = filters // groups
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            for g in range(groups):
                p = patch[..., g * cin_g:(g + 1) * cin_g]               # [B, kh, kw, cin_g]
                out[:, i, j, g * fg:(g + 1) * fg] = np.einsum(
                    "bhwc,hwco->bo", p, k[..., g * fg:(g + 1) * fg])
    return out


@pytest.fixture
def restore_policy():
    previous = keras.mixed_precision.dtype_policy()
    yield
    keras.mixed_precision.set_dtype_policy(previous)


@pytest.fixture(params=["xla", "ring"])
def padding_path(request):
    """Runs a test through both implementations of `symmetric_pad`."""
    if request.param == "xla" and not layers.xla_padding_available():
        pytest.skip("XLA cannot compile on this device")
    with layers.xla_padding(request.param == "xla"):
        yield request.param


@pytest.mark.parametrize("kernel_size, stride, groups, cin, filters, size", [
    (3, 1, 1, 3, 4, (7, 9)),
    (3, 2, 2, 4, 6, (7, 8)),
    (5, 2, 1, 2, 3, (9, 6)),
    (1, 2, 4, 8, 4, (5, 5)),
    (3, 1, 4, 8, 8, (6, 6)),
    ((3, 5), 1, 1, 2, 2, (5, 7)),
])
def test_matches_naive_reference(kernel_size, stride, groups, cin, filters, size, padding_path):
    rng = np.random.default_rng(0)
    layer = NormalizedConv2D(filters, kernel_size, strides=stride, groups=groups)
    x = rng.normal(size=(2, *size, cin)).astype("float32")
    y = layer(x).numpy()
    expected = reference_normalized_conv(x, layer.kernel.numpy(), stride, groups)
    assert y.shape == expected.shape == layer.compute_output_shape(x.shape)
    assert y.shape[1:3] == tuple(-(-s // stride) for s in size)  # ceil(H / stride)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("size", [(5, 6), (8, 7)])
def test_matches_naive_reference_over_kernels_strides_groups_and_sizes(kernel_size, stride,
                                                                       groups, size):
    rng = np.random.default_rng(10)
    layer = NormalizedConv2D(4, kernel_size, strides=stride, groups=groups)
    x = rng.normal(size=(2, *size, 4)).astype("float32")
    y = layer(x).numpy()
    expected = reference_normalized_conv(x, layer.kernel.numpy(), stride, groups)
    assert y.shape == expected.shape == (2, *(-(-s // stride) for s in size), 4)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pad_h, pad_w, size", [(1, 1, (5, 4)), (2, 1, (2, 6)), (0, 2, (3, 3)),
                                                (2, 2, (7, 2))])
@pytest.mark.parametrize("pad", [symmetric_pad, ring_symmetric_pad])
def test_symmetric_pad_equals_np_pad_and_its_gradient_folds_the_border(pad, pad_h, pad_w, size):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3, *size, 2)).astype("float32")
    paddings = [(0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)]
    weights = rng.normal(size=np.pad(x, paddings).shape).astype("float32")
    x_tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tensor)
        padded = tf.function(pad)(x_tensor, pad_h, pad_w)
        loss = tf.reduce_sum(padded * weights)
    np.testing.assert_array_equal(padded.numpy(), np.pad(x, paddings, mode="symmetric"))
    # d loss / d x[i, j] = sum of the weights at every padded position that copies x[i, j].
    expected = np.zeros_like(x, dtype=np.float64)
    rows = [min(max(r - pad_h, -1 - (r - pad_h)), 2 * size[0] - 1 - (r - pad_h))
            for r in range(size[0] + 2 * pad_h)]
    cols = [min(max(c - pad_w, -1 - (c - pad_w)), 2 * size[1] - 1 - (c - pad_w))
            for c in range(size[1] + 2 * pad_w)]
    for r, source_r in enumerate(rows):
        for c, source_c in enumerate(cols):
            expected[:, source_r, source_c] += weights[:, r, c]
    np.testing.assert_allclose(tape.gradient(loss, x_tensor).numpy(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size, stride, groups", [(3, 1, 1), (5, 2, 2), ((3, 5), 1, 2)])
def test_gradients_match_mirror_pad_autodiff(kernel_size, stride, groups, padding_path):
    rng = np.random.default_rng(12)
    layer = NormalizedConv2D(4, kernel_size, strides=stride, groups=groups)
    x = tf.constant(rng.normal(size=(2, 7, 6, 4)).astype("float32"))
    layer(x)
    pad_h, pad_w = ((k - 1) // 2 for k in layer.kernel_size)

    def reference(x):  # tf.pad(SYMMETRIC): TF's own MirrorPad and MirrorPadGrad
        padded = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="SYMMETRIC")
        return tf.nn.conv2d(padded, layer.normalized_kernel(), stride, "VALID")

    grads = []
    for function in (layer, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.function(function)(x) ** 2)
        grads.append([g.numpy() for g in tape.gradient(loss, [x, layer.kernel.value])])
    for got, expected in zip(*grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_xla_padding_can_be_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(layers, "_XLA_PAD_AVAILABLE", None)
    monkeypatch.setenv("CMC_KIT_XLA_PAD", "0")
    assert not layers.xla_padding_available()
    x = tf.reshape(tf.range(12.0), [1, 3, 4, 1])
    expected = np.pad(x.numpy(), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    np.testing.assert_array_equal(symmetric_pad(x, 1, 1).numpy(), expected)


def test_inside_an_xla_compiled_function_the_pad_is_not_a_nested_xla_call():
    """A nested jit function recompiles at every call of the outer one (11 s per train step)."""
    layer = NormalizedConv2D(4, 3)
    spec = tf.TensorSpec([2, 6, 6, 4])
    compiled = tf.function(lambda x: layer(x), jit_compile=True).get_concrete_function(spec)
    op_types = {op.type for op in compiled.graph.get_operations()}
    assert "MirrorPad" in op_types and not op_types & {"PartitionedCall", "StatefulPartitionedCall"}
    x = tf.random.normal([2, 6, 6, 4])
    np.testing.assert_allclose(compiled(x).numpy(), layer(x).numpy(), rtol=1e-5, atol=1e-6)


def test_scale_of_each_filter_does_not_matter():
    rng = np.random.default_rng(1)
    layer = NormalizedConv2D(4, 3, groups=2)
    x = rng.normal(size=(1, 6, 6, 4)).astype("float32")
    before = layer(x).numpy()
    layer.kernel.assign(layer.kernel.numpy() * np.array([0.1, 3.0, 7.0, 0.5], "float32"))
    np.testing.assert_allclose(layer(x).numpy(), before, rtol=1e-5, atol=1e-6)


def test_kernel_gradient_is_orthogonal_to_each_filter():
    # Scale invariance implies d loss / d w_o . w_o = 0 for every filter o.
    rng = np.random.default_rng(2)
    layer = NormalizedConv2D(5, 3, strides=2)
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 3)
    grad = tape.gradient(loss, layer.kernel.value).numpy()
    kernel = layer.kernel.numpy()
    radial = (grad * kernel).sum(axis=(0, 1, 2))
    scale = np.abs(grad).sum(axis=(0, 1, 2)) * np.abs(kernel).max()
    assert np.all(np.abs(radial) < 1e-4 * scale)
    assert np.all(np.abs(grad).sum(axis=(0, 1, 2)) > 0)


def test_padding_repeats_the_edge_pixel_like_np_pad_symmetric():
    # A one-hot kernel tap at (0, 0) copies the padded input shifted by one pixel, so the
    # output is exactly the top-left window of np.pad(x, 1, mode="symmetric").
    x = np.arange(2 * 5 * 4 * 2, dtype="float32").reshape(2, 5, 4, 2)
    layer = NormalizedConv2D(2, 3)
    layer.build(x.shape)
    kernel = np.zeros((3, 3, 2, 2), "float32")
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 2.5  # any positive scale normalises to 1
    layer.kernel.assign(kernel)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    np.testing.assert_allclose(layer(x).numpy(), padded[:, :5, :4, :], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(filters=5, kernel_size=3, groups=2), "Received: filters=5, groups=2"),
    (dict(filters=4, kernel_size=4), "kernel_size=(4, 4)"),
    (dict(filters=4, kernel_size=(3, 2)), "must be odd"),
    (dict(filters=0, kernel_size=3), "Received: filters=0"),
    (dict(filters=4, kernel_size=0), "Received: kernel_size=0"),
    (dict(filters=4, kernel_size=3, strides=0), "Received: strides=0"),
    (dict(filters=4, kernel_size=3, groups=-1), "Received: groups=-1"),
    (dict(filters=4, kernel_size=(3, 3, 3)), "pair of ints"),
    (dict(filters=2.5, kernel_size=3), "Received: filters=2.5"),
    (dict(filters=4, kernel_size=3, epsilon=0.0), "Received: epsilon=0.0"),
])
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NormalizedConv2D(**kwargs)


def test_input_channels_not_divisible_by_groups():
    layer = NormalizedConv2D(4, 3, groups=4)
    with pytest.raises(ValueError, match="input channels=6, groups=4"):
        layer(np.zeros((1, 5, 5, 6), "float32"))


def test_config_round_trip():
    layer = NormalizedConv2D(6, (3, 5), strides=2, groups=3, kernel_initializer="he_normal",
                             epsilon=1e-6, name="conv")
    clone = NormalizedConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.filters, clone.kernel_size, clone.strides, clone.groups, clone.epsilon) == (
        6, (3, 5), 2, 3, 1e-6)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    inputs = keras.Input((None, None, 4))
    x = NormalizedConv2D(8, 3, strides=2, groups=2, name="grouped")(inputs)
    outputs = NormalizedConv2D(3, 1, name="pointwise")(keras.layers.LeakyReLU(0.2)(x))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(3).normal(size=(2, 9, 7, 4)).astype("float32")
    path = tmp_path / "normalized.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("grouped"), NormalizedConv2D)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_mixed_float16_output_and_float32_normalisation(restore_policy):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    layer = NormalizedConv2D(8, 3, groups=2)
    y = layer(x)
    assert layer.kernel.dtype == "float32"
    assert y.dtype == "float16"
    assert np.all(np.isfinite(y.numpy()))
    expected = reference_normalized_conv(x, layer.kernel.numpy(), 1, 2)
    np.testing.assert_allclose(y.numpy().astype("float32"), expected, rtol=2e-2, atol=2e-2)


# -- attention pooling -------------------------------------------------------------------------

def reference_attention_pooling(x, layer):
    def dense(sub, v):
        kernel, bias = (w.numpy().astype(np.float64) for w in sub.weights)
        return v @ kernel + bias
    batch, height, width, channels = x.shape
    heads, dim = layer.num_heads, layer.key_dim
    positions = x.reshape(batch, height * width, channels).astype(np.float64)
    q = dense(layer.query_dense, positions.mean(axis=1)).reshape(batch, heads, dim)
    k = dense(layer.key_dense, positions).reshape(batch, -1, heads, dim)
    v = dense(layer.value_dense, positions).reshape(batch, -1, heads, dim)
    logits = np.einsum("bnd,bpnd->bnp", q, k) / np.sqrt(dim)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    mixed = np.einsum("bnp,bpnd->bnd", a, v).reshape(batch, heads * dim)
    return dense(layer.output_dense, mixed), a


def test_attention_pooling_matches_reference():
    rng = np.random.default_rng(5)
    layer = AttentionPooling2D(3, 4, 6)
    x = rng.normal(size=(2, 3, 5, 7)).astype("float32")
    y, attention = layer(x, return_attention=True)
    expected_y, expected_attention = reference_attention_pooling(x, layer)
    assert y.shape == (2, 6) and attention.shape == (2, 3, 15)
    np.testing.assert_allclose(attention.numpy(), expected_attention, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y.numpy(), expected_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attention.numpy().sum(-1), 1.0, rtol=1e-5)


def test_attention_pooling_float32_output_under_mixed_precision(restore_policy):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    inputs = keras.Input((None, None, 8))
    outputs = AttentionPooling2D(2, 4, 5, output_dtype="float32", name="pool")(inputs)
    model = keras.Model(inputs, outputs)
    assert outputs.dtype == "float32"
    y = model(np.random.default_rng(6).normal(size=(2, 4, 4, 8)).astype("float32"))
    assert y.dtype == "float32" and np.all(np.isfinite(y.numpy()))


def test_attention_pooling_config_round_trip():
    layer = AttentionPooling2D(3, 8, 16, output_dtype="float32", name="pool")
    clone = AttentionPooling2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="Received: num_heads=0"):
        AttentionPooling2D(0, 8, 16)
