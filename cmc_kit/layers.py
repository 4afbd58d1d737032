"""Custom Keras layers: the normalised convolution and attention pooling.

`NormalizedConv2D` is the seed's "Normalized Convolution": a bias-free convolution whose
kernel is divided, per output filter, by its L2 norm at every call (StyleGAN2-style weight
demodulation used as a drop-in replacement for BatchNorm). Padding is symmetric (the edge
pixel repeated), so odd kernels keep the spatial size at stride 1 and give ceil(H / stride)
otherwise.

`AttentionPooling2D` pools a feature map into one vector with multi-head self-attention:
one query per head from the globally pooled features, keys and values from 1x1 projections
of every spatial position.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from cmc_kit.config import xla_padding_setting


def _positive_int(value, argument: str, layer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{layer}: `{argument}` must be a positive integer. "
                         f"Received: {argument}={value!r}")
    return value


def _mirror_sources(length: int, pad: int) -> np.ndarray:
    """Index into [0, length) of every position of the symmetric-padded axis [-pad, length + pad)."""
    index = np.arange(-pad, length + pad)
    return np.where(index < 0, -index - 1, np.where(index >= length, 2 * length - 1 - index, index))


def _batched_indices(positions: np.ndarray, batch) -> tf.Tensor:
    """[N, 2] (row, col) positions -> [B, N, 3] (b, row, col) indices for *_nd ops."""
    positions = tf.constant(positions, tf.int32)                               # [N, 2]
    count = positions.shape[0]
    batch_index = tf.broadcast_to(tf.range(batch, dtype=tf.int32)[:, None, None],
                                  [batch, count, 1])
    return tf.concat([batch_index, tf.broadcast_to(positions[None], [batch, count, 2])], axis=-1)


def symmetric_pad(inputs, pad_h: int, pad_w: int):
    """`tf.pad(inputs, ..., mode="SYMMETRIC")` on [B, H, W, C], bit-identical, but cheaper.

    TF's own MirrorPad and MirrorPadGrad kernels are slow (3x a zero pad on CPU). Where XLA
    can compile for the current device, the pad (and, through the function's gradient, the
    fold of the border back onto the edge) runs as one XLA-compiled copy each way; the convs
    around it stay on TensorFlow's kernels (oneDNN / cuDNN). Elsewhere (an XLA-less device
    plugin, or `CMC_KIT_XLA_PAD=0`) it falls back to `ring_symmetric_pad`.
    Measured on CPU, fwd + bwd of a 3x3 conv at cpu-demo shapes: XLA pad 1.1-1.2x faster
    than `ring_symmetric_pad`, which is itself 1.1-1.4x faster than MirrorPad.
    """
    if not (pad_h or pad_w):
        return inputs
    if _inside_xla_compilation():
        # Already compiled whole (the trainer's XLA step): XLA fuses MirrorPad itself, and a
        # nested XLA function here would be recompiled at every call.
        return tf.pad(inputs, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="SYMMETRIC")
    if xla_padding_available():
        padded = _xla_symmetric_pad_function(pad_h, pad_w)(inputs)
        batch, height, width, channels = inputs.shape
        padded.set_shape([batch, None if height is None else height + 2 * pad_h,
                          None if width is None else width + 2 * pad_w, channels])
        return padded
    return ring_symmetric_pad(inputs, pad_h, pad_w)


@contextlib.contextmanager
def xla_padding(enabled: bool):
    """Within the block, `symmetric_pad` (in functions traced there) uses XLA or not.

    `enabled=True` still needs `xla_padding_available()`. For comparisons and tools that read
    graphs (TensorFlow's FLOP profiler does not see through the XLA function call).
    """
    global _XLA_PAD_AVAILABLE
    previous = _XLA_PAD_AVAILABLE
    _XLA_PAD_AVAILABLE = bool(enabled) and xla_padding_available()
    try:
        yield
    finally:
        _XLA_PAD_AVAILABLE = previous


def _inside_xla_compilation() -> bool:
    """Whether the graph being traced is (inside) a `jit_compile=True` function."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):  # private API moved: assume not compiled
        return False


_XLA_PAD_FUNCTIONS: dict[tuple[int, int], tf.types.experimental.GenericFunction] = {}
_XLA_PAD_AVAILABLE: bool | None = None


def _xla_symmetric_pad_function(pad_h: int, pad_w: int):
    """One XLA-compiled tf.function per padding (traced again per input shape and dtype)."""
    key = (pad_h, pad_w)
    if key not in _XLA_PAD_FUNCTIONS:
        paddings = [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]]
        _XLA_PAD_FUNCTIONS[key] = tf.function(
            lambda x: tf.pad(x, paddings, mode="SYMMETRIC"),
            jit_compile=True)
    return _XLA_PAD_FUNCTIONS[key]


def xla_padding_available() -> bool:
    """Whether `symmetric_pad` compiles with XLA here (probed once per process).

    False when `CMC_KIT_XLA_PAD=0`, or when a tiny XLA-compiled pad with its gradient fails on
    the default device (e.g. a device plugin without an XLA JIT).
    """
    global _XLA_PAD_AVAILABLE
    if _XLA_PAD_AVAILABLE is None:
        if not xla_padding_setting():
            _XLA_PAD_AVAILABLE = False
        else:
            # A fresh thread executes eagerly even when this is first called while tracing
            # a graph (tf.init_scope would pause the gradient tape).
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                _XLA_PAD_AVAILABLE = pool.submit(_probe_xla_padding).result()
    return _XLA_PAD_AVAILABLE


def _probe_xla_padding() -> bool:
    try:
        probe = tf.ones([1, 2, 2, 1])
        with tf.GradientTape() as tape:
            tape.watch(probe)
            padded = _xla_symmetric_pad_function(1, 1)(probe)              # [1, 4, 4, 1]
        gradient = tape.gradient(padded, probe)
        return gradient is not None and float(tf.reduce_sum(gradient)) == 16.0
    except (tf.errors.OpError, NotImplementedError, ValueError):
        return False


def ring_symmetric_pad(inputs, pad_h: int, pad_w: int):
    """`tf.pad(inputs, ..., mode="SYMMETRIC")` on [B, H, W, C], bit-identical, without XLA.

    TF's MirrorPad and MirrorPadGrad kernels are slow (3x a zero pad on CPU). Here the forward
    is a zero pad with only the border ring overwritten (gather + scatter of the ring pixels),
    and the gradient is the interior slice of the incoming gradient plus the ring's gradient
    scatter-added onto the pixels it was copied from. Needs static H and W (else tf.pad).
    """
    height, width = inputs.shape[1], inputs.shape[2]
    paddings = [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]]
    if height is None or width is None or height < pad_h or width < pad_w:
        # Unknown sizes: MirrorPad; too small: MirrorPad raises its own error.
        return tf.pad(inputs, paddings, mode="SYMMETRIC")
    rows, cols = np.meshgrid(np.arange(height + 2 * pad_h), np.arange(width + 2 * pad_w),
                             indexing="ij")                                    # padded grid
    ring = ((rows < pad_h) | (rows >= height + pad_h) | (cols < pad_w) | (cols >= width + pad_w))
    ring_positions = np.stack([rows[ring], cols[ring]], axis=-1)              # [N, 2] padded
    source_positions = np.stack([_mirror_sources(height, pad_h)[rows[ring]],
                                 _mirror_sources(width, pad_w)[cols[ring]]], axis=-1)  # in x

    @tf.custom_gradient
    def pad(x):
        batch = tf.shape(x)[0]
        ring_index = _batched_indices(ring_positions, batch)                   # [B, N, 3]
        source_index = _batched_indices(source_positions, batch)               # [B, N, 3]
        padded = tf.tensor_scatter_nd_update(tf.pad(x, paddings), ring_index,
                                             tf.gather_nd(x, source_index))     # [B, H+2p, W+2p, C]

        def grad(upstream):                                                    # [B, H+2p, W+2p, C]
            interior = upstream[:, pad_h:pad_h + height, pad_w:pad_w + width]  # [B, H, W, C]
            return tf.tensor_scatter_nd_add(interior, source_index,
                                            tf.gather_nd(upstream, ring_index))
        return padded, grad

    return pad(inputs)


@keras.saving.register_keras_serializable(package="cmc_kit")
class NormalizedConv2D(keras.layers.Layer):
    """Bias-free 2-D convolution with a per-filter unit-L2-norm kernel and symmetric padding.

    At every call: `w_hat[..., o] = w[..., o] / sqrt(sum_{kh, kw, c} w[..., o]^2 + epsilon)`,
    then `x` padded symmetrically by (k - 1) / 2 each side (`symmetric_pad`, identical to
    `tf.pad(mode="SYMMETRIC")`) and a VALID convolution.
    The normalisation runs in float32 even under a mixed-precision policy.

    Args:
        filters: number of output channels; divisible by `groups`.
        kernel_size: odd positive int, or a pair of odd positive ints (kh, kw).
        strides: positive int, the same along height and width.
        groups: number of channel groups (as in `keras.layers.Conv2D`); input and output
            channels are both split into `groups` blocks.
        kernel_initializer: initializer of the raw kernel `[kh, kw, in / groups, filters]`.
        epsilon: added to the squared norm inside the square root.

    Input `[B, H, W, C_in]`, output `[B, ceil(H / strides), ceil(W / strides), filters]`.
    The raw (unnormalised) weight is `self.kernel`.
    """

    def __init__(self, filters, kernel_size, strides=1, groups=1,
                 kernel_initializer="glorot_uniform", epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        layer = type(self).__name__
        self.filters = _positive_int(filters, "filters", layer)
        if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
            kernel_size = (kernel_size, kernel_size)
        kernel_size = tuple(kernel_size)
        if len(kernel_size) != 2:
            raise ValueError(f"{layer}: `kernel_size` must be an int or a pair of ints. "
                             f"Received: kernel_size={kernel_size!r}")
        for size in kernel_size:
            _positive_int(size, "kernel_size", layer)
            if size % 2 == 0:
                raise ValueError(
                    f"{layer}: `kernel_size` must be odd, because symmetric padding puts "
                    f"(k - 1) / 2 pixels on each side; use 1, 3, 5, ... "
                    f"Received: kernel_size={kernel_size!r}")
        self.kernel_size = kernel_size
        self.strides = _positive_int(strides, "strides", layer)
        self.groups = _positive_int(groups, "groups", layer)
        if self.filters % self.groups:
            raise ValueError(f"{layer}: `filters` must be divisible by `groups`. "
                             f"Received: filters={self.filters}, groups={self.groups}")
        if not epsilon > 0:
            raise ValueError(f"{layer}: `epsilon` must be positive. Received: epsilon={epsilon!r}")
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(f"{type(self).__name__} '{self.name}': the channel axis of the "
                             f"input must be known. Received: input_shape={input_shape}")
        if in_channels % self.groups:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': input channels must be divisible by "
                f"`groups`. Received: input channels={in_channels}, groups={self.groups}")
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: in_channels})
        # autocast=False: the kernel stays float32 under mixed precision so the norm is exact.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, in_channels // self.groups, self.filters),
            initializer=self.kernel_initializer,
            autocast=False,
        )

    def normalized_kernel(self):
        """The kernel actually convolved, float32: `[kh, kw, in / groups, filters]`."""
        kernel = ops.cast(self.kernel, "float32")
        squared_norm = ops.sum(ops.square(kernel), axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, O]
        return kernel * ops.rsqrt(squared_norm + self.epsilon)

    def call(self, inputs):
        kernel = ops.cast(self.normalized_kernel(), inputs.dtype)
        pad_h, pad_w = (self.kernel_size[0] - 1) // 2, (self.kernel_size[1] - 1) // 2
        inputs = symmetric_pad(inputs, pad_h, pad_w)
        # tf.nn.conv2d, not keras.ops.conv: for grouped kernels Keras wraps the op in XLA on
        # CPU, which measured ~170x slower than TF 2.21's native grouped conv (fwd+bwd,
        # 8x32x32x64, 8 groups: 284 ms vs 1.7 ms; split-and-concat 3.7 ms).
        return tf.nn.conv2d(inputs, kernel, strides=self.strides, padding="VALID")

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        out_h = None if height is None else -(-height // self.strides)
        out_w = None if width is None else -(-width // self.strides)
        return (batch, out_h, out_w, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": self.strides,
            "groups": self.groups,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "epsilon": self.epsilon,
        })
        return config


@keras.saving.register_keras_serializable(package="cmc_kit")
class AttentionPooling2D(keras.layers.Layer):
    """Multi-head attention pooling of a feature map to one vector per sample.

    For heads n = 1..N with key size d:
        q_n = W_q^n mean_p(x_p)              (query from the globally pooled features)
        k_{n,p} = W_k^n x_p, v_{n,p} = W_v^n x_p   (1x1 projections of every position p)
        a_{n,p} = softmax_p(q_n . k_{n,p} / sqrt(d))
        y = W_o concat_n(sum_p a_{n,p} v_{n,p})
    The attention logits and softmax run in float32. `output_dtype` sets the dtype of the
    output projection ("float32" keeps the embedding float32 under mixed precision).

    Input `[B, H, W, C]`; output `[B, output_dim]`, plus `[B, num_heads, H * W]` attention
    weights when called with `return_attention=True`.
    """

    def __init__(self, num_heads, key_dim, output_dim, output_dtype=None, **kwargs):
        super().__init__(**kwargs)
        layer = type(self).__name__
        self.num_heads = _positive_int(num_heads, "num_heads", layer)
        self.key_dim = _positive_int(key_dim, "key_dim", layer)
        self.output_dim = _positive_int(output_dim, "output_dim", layer)
        self.output_dtype = output_dtype
        inner = self.num_heads * self.key_dim
        self.query_dense = keras.layers.Dense(inner, name="query", dtype=self.dtype_policy)
        self.key_dense = keras.layers.Dense(inner, name="key", dtype=self.dtype_policy)
        self.value_dense = keras.layers.Dense(inner, name="value", dtype=self.dtype_policy)
        self.output_dense = keras.layers.Dense(self.output_dim, name="output",
                                               dtype=output_dtype or self.dtype_policy)

    def build(self, input_shape):
        channels = input_shape[-1]
        if len(input_shape) != 4 or channels is None:
            raise ValueError(f"{type(self).__name__} '{self.name}' expects [B, H, W, C] "
                             f"with known C. Received: input_shape={input_shape}")
        self.query_dense.build((None, channels))
        self.key_dense.build((None, None, channels))
        self.value_dense.build((None, None, channels))
        self.output_dense.build((None, self.num_heads * self.key_dim))

    def call(self, inputs, return_attention=False):
        batch = ops.shape(inputs)[0]
        heads, dim = self.num_heads, self.key_dim
        positions = ops.reshape(inputs, (batch, -1, inputs.shape[-1]))               # [B, P, C]
        pooled = ops.mean(positions, axis=1)                                          # [B, C]
        q = ops.reshape(self.query_dense(pooled), (batch, heads, dim))               # [B, N, d]
        k = ops.reshape(self.key_dense(positions), (batch, -1, heads, dim))          # [B, P, N, d]
        v = ops.reshape(self.value_dense(positions), (batch, -1, heads, dim))        # [B, P, N, d]
        logits = ops.einsum("bnd,bpnd->bnp", ops.cast(q, "float32"), ops.cast(k, "float32"))
        attention = ops.softmax(logits / math.sqrt(dim), axis=-1)                    # [B, N, P]
        mixed = ops.einsum("bnp,bpnd->bnd", ops.cast(attention, v.dtype), v)          # [B, N, d]
        outputs = self.output_dense(ops.reshape(mixed, (batch, heads * dim)))         # [B, out]
        if return_attention:
            return outputs, attention
        return outputs

    def compute_output_spec(self, inputs, return_attention=False):
        batch, height, width = inputs.shape[:3]
        positions = None if height is None or width is None else height * width
        outputs = keras.KerasTensor((batch, self.output_dim),
                                    dtype=self.output_dense.compute_dtype)
        if return_attention:
            return outputs, keras.KerasTensor((batch, self.num_heads, positions), dtype="float32")
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "output_dim": self.output_dim,
            "output_dtype": self.output_dtype,
        })
        return config


@keras.saving.register_keras_serializable(package="cmc_kit")
class BranchGain(keras.layers.Layer):
    """Scales a residual branch: `x * a`, with `a` fixed or a trainable scalar from `initial`.

    `initial=0, learnable=True` is ReZero (Bachlechner et al. 2020): a block starts as the
    identity and its branch switches on as `a` is learned, so at initialisation a deep trunk is
    its shortcuts alone and the first optimizer steps cannot compound through every block.
    """

    def __init__(self, initial: float = 1.0, learnable: bool = False, **kwargs):
        super().__init__(**kwargs)
        initial = float(initial)
        if not np.isfinite(initial):
            raise ValueError(f"BranchGain needs a finite initial gain. Received: initial={initial}")
        self.initial, self.learnable = initial, bool(learnable)

    def build(self, input_shape):
        if self.learnable:
            self.gain = self.add_weight(name="gain", shape=(),
                                        initializer=keras.initializers.Constant(self.initial))

    def call(self, inputs):
        gain = self.gain if self.learnable else self.initial
        return inputs * ops.cast(gain, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial": self.initial, "learnable": self.learnable}
