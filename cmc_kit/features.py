"""What an encoder's features are, for probes and embeddings: a feature source (the last stage,
every stage pooled, one stage, the projection head) as a function of a batch of crops.

`feature_function(encoder, view=, source=)` is `x [B, H, W, C] -> float32 [B, F]`; a Keras
encoder's network part runs as one `tf.function`, traced once per (encoder, view, source) and
cached without keeping the encoder alive. `cmc_kit.embed` turns these into tables.
"""

from __future__ import annotations

import re
import weakref

import keras
import numpy as np

from cmc_kit.errors import CmcKitError

# What is embedded: "trunk" (the last stage, mean-pooled: the original's UMAP embedding),
# "stages" (every stage pooled by `pooled_stage`, concatenated), "stage<N>" (stage N alone,
# pooled the same way), "head" (the projection head's embedding).
SOURCES = ("trunk", "stages", "head")
_STAGE_SOURCE = re.compile(r"stage([1-9][0-9]*)")


def check_source(source: str) -> str:
    """`source` if it names a feature source (`SOURCES` or "stage<N>"), else CmcKitError."""
    if source in SOURCES or _STAGE_SOURCE.fullmatch(str(source)):
        return source
    raise CmcKitError(f"Embedding source (--source / --features) must be one of "
                      f"{', '.join(SOURCES)} or stage<N> (e.g. stage1). Received: {source!r}")


def feature_vectors(encoder, x, *, view: str, source: str) -> np.ndarray:
    """One batch's features of `source` (see `SOURCES`): float32 [B, F]."""
    return feature_function(encoder, view=view, source=source, compile=False)(x)


def feature_function(encoder, *, view: str, source: str, compile: bool = True):
    """`x [B, H, W, C] -> float32 [B, F]`, the features of `source` (see `SOURCES`).

    For a Keras encoder the network's part runs as one `tf.function` (`compile`): called eagerly
    batch by batch, Keras' per-layer dispatch took most of an evaluation's embedding time. It
    is traced once per (encoder, view, source) and reused by later calls (`_compiled`).
    """
    if compile and isinstance(encoder, keras.Model):
        network = _compiled(encoder, view, source)
    else:
        network = _network(encoder, view, source)

    def features(x) -> np.ndarray:
        out = network(x)
        if source in ("trunk", "head"):
            return np.asarray(out, np.float32)
        return np.concatenate([pooled_stage(m) for m in out], axis=1)

    return features


def _network(encoder, view: str, source: str):
    """x -> the encoder's output for `source`: [B, F] (trunk, head) or a list of stage maps."""
    if source == "trunk":
        return lambda x: encoder.encode_features(x, view=view)  # [B, F]
    if source == "head":
        return lambda x: _head_embedding(encoder, x, view)  # [B, D]

    def network(x):
        maps = encoder.stage_features(x, view=view)            # [B, h_i, w_i, c_i] each
        if source == "stages":
            return list(maps)
        number = int(_STAGE_SOURCE.fullmatch(source).group(1))
        if number > len(maps):
            raise CmcKitError(f"Embedding source {source!r}: the trunk has {len(maps)} "
                              f"stages. Use stage1 .. stage{len(maps)}.")
        return [maps[number - 1]]

    return network


# encoder -> {(view, source): its traced network}; weak keys: a dropped encoder takes its
# functions with it.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(encoder, view: str, source: str):
    """The encoder's network for (view, source), traced once and kept for later embeddings of
    the same encoder (every epoch's `EpochEmbeddings` embeds twice: a new tf.function each time
    was traced again, ~0.35 s at cpu-demo's shapes, and TF warned about frequent retracing).
    The function reaches the encoder through a weak proxy, so the cache never keeps it alive."""
    per_encoder = _COMPILED.setdefault(encoder, {})
    if (view, source) not in per_encoder:
        per_encoder[(view, source)] = _traced_once(_network(weakref.proxy(encoder), view, source))
    return per_encoder[(view, source)]


def _traced_once(network):
    """`network` as one tf.function for any batch and crop size: its signature (batch, height
    and width unknown, the channels of the first input) is fixed on the first call, so it is
    traced once, not per shape (a last, smaller batch or another grid would retrace, and TF
    warns after a few of those)."""
    import tensorflow as tf

    compiled = []

    def call(x):
        if not compiled:
            spec = tf.TensorSpec([None, None, None, x.shape[-1]], tf.float32)
            # autograph=False: plain Python control flow.
            compiled.append(tf.function(network, input_signature=[spec], autograph=False))
        return compiled[0](tf.convert_to_tensor(x, tf.float32))

    return call


def pooled_stage(feature_map) -> np.ndarray:
    """One stage summarised, [B, h, w, c] -> float32 [B, 2c]: after the leaky ReLU the next
    block would apply, the mean and the standard deviation over space of every channel, that
    block L2-normalised per sample. Early stages keep colour and texture statistics the last
    stage mixes away; the normalisation gives each stage the same weight in a cosine kNN."""
    from cmc_kit.models import LEAKY_SLOPE

    x = np.asarray(feature_map, np.float32)
    x = np.where(x > 0, x, LEAKY_SLOPE * x)
    block = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)       # [B, 2c]
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def _head_embedding(encoder, x, view: str):
    """Head embedding [B, D] of one view."""
    if callable(getattr(encoder, "embed", None)):
        return encoder.embed(x, view=view)  # CMCEncoder: this view alone (call needs them all)
    return encoder({view: x})[view]
