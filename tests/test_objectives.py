"""Contrastive losses against a slow NumPy reference; view-pair graphs."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from cmc_kit.config import ALL_VIEWS, ConfigError
from cmc_kit.objectives import (
    ORIGINAL_PAIRS,
    contrastive_accuracy,
    inter_batch_loss,
    intra_batch_loss,
    resolve_pairs,
)

# -- slow, obvious reference (float64, explicit loops) -------------------------------------


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_row_loss(query_row, positive, negatives, temperature, kind):
    """Loss of one query against its positive and a list of negatives."""
    s_pos = cosine(query_row, positive) / temperature
    s_neg = [cosine(query_row, n) / temperature for n in negatives]
    if kind == "infonce":
        # -log softmax(positive) over [positive, negatives...]
        denominator = math.exp(s_pos) + sum(math.exp(s) for s in s_neg)
        return -math.log(math.exp(s_pos) / denominator)
    # The original's NCE, written exactly as in ORIGINAL.md.
    n = len(negatives)
    pn = n / (n + 1)
    eps = 1e-7
    p_pos = math.exp(s_pos)
    total = math.log(p_pos / (p_pos + pn + eps))
    for s in s_neg:
        total += math.log(pn / (math.exp(s) + pn + eps))
    return -total


def reference_inter(query, key, queue, temperature, kind):
    rows = [reference_row_loss(query[b], key[b], list(queue), temperature, kind)
            for b in range(len(query))]
    return sum(rows) / len(rows)


def reference_intra(query, key, temperature, kind):
    rows = []
    for b in range(len(query)):
        negatives = [key[c] for c in range(len(key)) if c != b]
        rows.append(reference_row_loss(query[b], key[b], negatives, temperature, kind))
    return sum(rows) / len(rows)


def random_embeddings(seed, batch, queue_size, dim=6):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim)),
            rng.normal(size=(queue_size, dim)))


# -- agreement with the reference ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["infonce", "nce"])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("queue_size", [1, 7, 40])
@pytest.mark.parametrize("batch", [2, 5, 8])
def test_inter_batch_loss_matches_reference(batch, queue_size, temperature, kind):
    q, k, queue = random_embeddings(batch * 100 + queue_size, batch, queue_size)
    got = inter_batch_loss(q.astype("float32"), k.astype("float32"), queue.astype("float32"),
                           temperature=temperature, kind=kind)
    expected = reference_inter(q, k, queue, temperature, kind)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["infonce", "nce"])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("batch", [2, 5, 8])
def test_intra_batch_loss_matches_reference(batch, temperature, kind):
    q, k, _ = random_embeddings(batch, batch, 1)
    got = intra_batch_loss(q.astype("float32"), k.astype("float32"),
                           temperature=temperature, kind=kind)
    expected = reference_intra(q, k, temperature, kind)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=2e-5, atol=1e-5)


def test_known_value_with_orthogonal_negatives():
    # q = k = unit vectors, queue orthogonal to every q: l_pos = 1/T, l_neg = 0.
    temperature, batch, queue_size = 0.1, 3, 4
    eye = np.eye(batch + queue_size, dtype="float32")
    q = k = eye[:batch]
    queue = eye[batch:]
    e = math.exp(1 / temperature)
    infonce = math.log(e + queue_size) - 1 / temperature
    pn = queue_size / (queue_size + 1)
    nce = -(math.log(e / (e + pn + 1e-7)) + queue_size * math.log(pn / (1 + pn + 1e-7)))
    # atol: float32 keeps ~1e-6 of logsumexp(logits) - l_pos when both are ~1/T.
    np.testing.assert_allclose(float(inter_batch_loss(q, k, queue, temperature)), infonce,
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(float(inter_batch_loss(q, k, queue, temperature, kind="nce")), nce,
                               rtol=1e-5, atol=2e-6)


# -- properties ------------------------------------------------------------------------------

@pytest.mark.parametrize("low_precision", ["float16", "bfloat16"])
def test_low_precision_inputs_are_computed_in_float32(low_precision):
    q, k, queue = random_embeddings(3, 8, 40, dim=16)
    low = [tf.constant(x, dtype=low_precision) for x in (q, k, queue)]
    rounded = [tf.cast(x, tf.float32) for x in low]  # the same values, already in float32
    for kind in ("infonce", "nce"):
        inter_low = inter_batch_loss(*low, temperature=0.07, kind=kind)
        intra_low = intra_batch_loss(*low[:2], temperature=0.07, kind=kind)
        assert inter_low.dtype == tf.float32 and intra_low.dtype == tf.float32
        assert np.isfinite(float(inter_low)) and np.isfinite(float(intra_low))
        # Upcasting first means low-precision inputs give exactly the float32 result ...
        np.testing.assert_allclose(float(inter_low),
                                   float(inter_batch_loss(*rounded, 0.07, kind)), rtol=1e-6)
        np.testing.assert_allclose(float(intra_low),
                                   float(intra_batch_loss(*rounded[:2], 0.07, kind)), rtol=1e-6)
        # ... and close to the unrounded float64 reference.
        tolerance = 2e-2 if low_precision == "bfloat16" else 2e-3
        np.testing.assert_allclose(float(inter_low), reference_inter(q, k, queue, 0.07, kind),
                                   rtol=tolerance)
        np.testing.assert_allclose(float(intra_low), reference_intra(q, k, 0.07, kind),
                                   rtol=tolerance)


def test_matching_pairs_with_far_queue_give_near_zero_infonce():
    rng = np.random.default_rng(0)
    direction = np.zeros(16, dtype="float32")
    direction[0] = 1.0
    q = direction + 0.01 * rng.normal(size=(8, 16)).astype("float32")
    queue = -direction + 0.01 * rng.normal(size=(40, 16)).astype("float32")
    assert float(inter_batch_loss(q, q, queue, 0.07)) < 1e-6
    # Intra: orthogonal samples, so other keys sit at cosine 0 (loss ~ (B-1) exp(-1/T)).
    one_hot = np.eye(8, 16, dtype="float32")
    assert float(intra_batch_loss(one_hot, one_hot, 0.07)) < 1e-5


def test_losses_ignore_embedding_scale():
    q, k, queue = (x.astype("float32") for x in random_embeddings(4, 5, 7))
    rng = np.random.default_rng(5)
    scale = lambda x: x * rng.uniform(0.01, 100.0, size=(len(x), 1)).astype("float32")  # noqa: E731
    for kind in ("infonce", "nce"):
        scaled = inter_batch_loss(scale(q), scale(k), scale(queue), 0.2, kind)
        np.testing.assert_allclose(float(scaled), float(inter_batch_loss(q, k, queue, 0.2, kind)),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(intra_batch_loss(scale(q), scale(k), 0.2, kind)),
                                   float(intra_batch_loss(q, k, 0.2, kind)), rtol=1e-5)


def test_graph_and_xla_match_eager():
    q, k, queue = (tf.constant(x, tf.float32) for x in random_embeddings(6, 5, 7))

    def all_losses(q, k, queue):
        return tf.stack([inter_batch_loss(q, k, queue, 0.07, "infonce"),
                         inter_batch_loss(q, k, queue, 0.07, "nce"),
                         intra_batch_loss(q, k, 0.07, "infonce"),
                         intra_batch_loss(q, k, 0.07, "nce")])

    eager = all_losses(q, k, queue).numpy()
    # Unknown batch and queue sizes at trace time, as in a training loop with a partial batch.
    spec = tf.TensorSpec([None, 6], tf.float32)
    graph = tf.function(all_losses, input_signature=[spec, spec, spec])(q, k, queue).numpy()
    xla = tf.function(all_losses, jit_compile=True)(q, k, queue).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    np.testing.assert_allclose(xla, eager, rtol=1e-5)


def test_intra_batch_of_one_inside_a_graph_is_finite():
    # A partial last batch of 1 cannot be rejected at trace time when the batch size is None.
    spec = tf.TensorSpec([None, 4], tf.float32)
    loss = tf.function(lambda q, k: tf.stack([intra_batch_loss(q, k, kind="infonce"),
                                              intra_batch_loss(q, k, kind="nce")]),
                       input_signature=[spec, spec])
    values = loss(tf.ones([1, 4]), tf.ones([1, 4])).numpy()
    # No negatives: only the positive term remains, -log(P/(P + 0 + eps)) ~ 0.
    np.testing.assert_allclose(values, [0.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("kind", ["infonce", "nce"])
def test_gradients_match_finite_differences_of_reference(kind):
    q, k, queue = random_embeddings(7, 3, 4, dim=5)
    temperature = 0.2
    tensors = [tf.Variable(x.astype("float32")) for x in (q, k, queue)]
    with tf.GradientTape() as tape:
        loss = (inter_batch_loss(*tensors, temperature, kind)
                + intra_batch_loss(*tensors[:2], temperature, kind))
    grads = [g.numpy() for g in tape.gradient(loss, tensors)]

    def reference(q, k, queue):
        return (reference_inter(q, k, queue, temperature, kind)
                + reference_intra(q, k, temperature, kind))

    step = 1e-5
    arrays = [q, k, queue]
    for which, grad in enumerate(grads):
        assert np.all(np.isfinite(grad))
        numeric = np.zeros_like(arrays[which])
        for index in np.ndindex(arrays[which].shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (reference(*plus) - reference(*minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_zero_embedding_gives_finite_loss_and_gradient():
    q, k, queue = (x.astype("float32") for x in random_embeddings(8, 4, 5))
    q[1] = 0.0
    q_var = tf.Variable(q)
    with tf.GradientTape() as tape:
        loss = inter_batch_loss(q_var, k, queue) + intra_batch_loss(q_var, k, kind="nce")
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(tape.gradient(loss, q_var).numpy()))


def test_contrastive_accuracy():
    eye = np.eye(8, dtype="float32")
    q = eye[:3]
    far_queue = -eye[:3]
    assert float(contrastive_accuracy(q, q, far_queue)) == 1.0
    assert float(contrastive_accuracy(q, q)) == 1.0
    # A queue holding the queries themselves beats keys that point elsewhere.
    keys = eye[3:6]
    assert float(contrastive_accuracy(q, keys, q)) == 0.0
    # Intra: query 0's best match is key 1 (cos 0.71 > 0.1), the others find their own key.
    shuffled = np.stack([eye[3] + 0.1 * eye[0], eye[1] + eye[0], eye[2]])
    np.testing.assert_allclose(float(contrastive_accuracy(q, shuffled)), 2 / 3, rtol=1e-6)


# -- argument validation ---------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0, -0.1, float("nan"), float("inf"), "0.07", True])
def test_bad_temperature_is_rejected(temperature):
    q, k, queue = random_embeddings(0, 2, 3)
    with pytest.raises(ValueError, match=r"Received: temperature="):
        inter_batch_loss(q, k, queue, temperature=temperature)
    with pytest.raises(ValueError, match=r"Received: temperature="):
        intra_batch_loss(q, k, temperature=temperature)


def test_bad_shapes_and_kind_are_rejected():
    q, k, queue = random_embeddings(0, 4, 3, dim=6)
    with pytest.raises(ValueError, match=r"Received: kind='softmax'"):
        inter_batch_loss(q, k, queue, kind="softmax")
    with pytest.raises(ValueError, match=r"query.shape=\(4, 6, 1\)"):
        inter_batch_loss(q[..., None], k, queue)
    with pytest.raises(ValueError, match=r"queue.shape=\(3, 5\)"):
        inter_batch_loss(q, k, queue[:, :5])
    with pytest.raises(ValueError, match=r"key.shape=\(3, 6\)"):
        intra_batch_loss(q, k[:3])
    with pytest.raises(ValueError, match=r"queue.shape=\(0, 6\)"):
        inter_batch_loss(q, k, queue[:0])
    with pytest.raises(ValueError, match=r"at least 2"):
        intra_batch_loss(q[:1], k[:1])


# -- view pairs ------------------------------------------------------------------------------

def test_original_pairs_with_all_views():
    pairs = resolve_pairs("original", ALL_VIEWS)
    assert pairs == list(ORIGINAL_PAIRS)
    assert len(pairs) == 8
    crops = ("terrain", "segmentation", "height")
    # All ordered pairs among the three crops, plus terrain <-> overview.
    assert set(pairs) == set(itertools.permutations(crops, 2)) | {
        ("terrain", "overview"), ("overview", "terrain")}


def test_original_pairs_restricted_to_configured_views():
    assert resolve_pairs("original", ("height", "terrain")) == [
        ("terrain", "height"), ("height", "terrain")]
    with pytest.raises(ConfigError, match="no pair"):
        resolve_pairs("original", ("segmentation", "overview"))


def test_full_pairs():
    views = ("terrain", "height", "overview")
    pairs = resolve_pairs("full", views)
    assert len(pairs) == len(set(pairs)) == 6
    assert all(a != b and a in views and b in views for a, b in pairs)


def test_core_pairs():
    pairs = resolve_pairs("core:height", ALL_VIEWS)
    assert sorted(pairs) == sorted([("height", v) for v in ALL_VIEWS if v != "height"]
                                   + [(v, "height") for v in ALL_VIEWS if v != "height"])
    with pytest.raises(ConfigError, match=r"'overview'.*terrain, height"):
        resolve_pairs("core:overview", ("terrain", "height"))


def test_explicit_pairs():
    assert resolve_pairs(" terrain-height , height-terrain", ALL_VIEWS) == [
        ("terrain", "height"), ("height", "terrain")]
    assert resolve_pairs([("overview", "terrain")], ALL_VIEWS) == [("overview", "terrain")]


@pytest.mark.parametrize("spec, message", [
    ("terrain-sky", r"'sky'.*Configured views.*terrain, height"),
    ("terrain", r"'terrain'.*query-key"),
    ("terrain-height-overview", r"query-key"),
    ("terrain-terrain", r"itself"),
    ("terrain-height,terrain-height", r"twice"),
    ("", r"no pair"),
    ([("terrain",)], r"query-key"),
    (42, r"Received: pairs=42"),
])
def test_bad_pair_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_pairs(spec, ("terrain", "height"))


# -- collapse diagnostics ------------------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_spread_is_zero_when_collapsed_and_about_one_over_sqrt_d_when_spread():
    from cmc_kit.objectives import embedding_spread

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(4096, 64)).astype(np.float32)
    assert float(embedding_spread(spread)) == pytest.approx(1 / np.sqrt(64), rel=0.02)
    collapsed = np.tile(rng.normal(size=(1, 64)), (32, 1)).astype(np.float32) \
        + 1e-6 * rng.normal(size=(32, 64)).astype(np.float32)
    assert float(embedding_spread(collapsed)) < 1e-5
    x = rng.normal(size=(16, 8)).astype(np.float32)
    np.testing.assert_allclose(float(embedding_spread(x)), np.std(_unit(x), axis=0).mean(),
                               rtol=1e-5)


def test_alignment_and_uniformity_match_the_papers_definitions():
    from cmc_kit.objectives import alignment, uniformity

    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(12, 5)).astype(np.float32)
    qn, kn = _unit(q), _unit(k)
    np.testing.assert_allclose(float(alignment(q, k)), np.mean(np.sum((qn - kn) ** 2, axis=1)),
                               rtol=1e-5)
    assert float(alignment(q, 3 * q)) == pytest.approx(0.0, abs=1e-6)
    squared = np.sum((qn[:, None] - qn[None]) ** 2, axis=-1)
    mask = ~np.eye(12, dtype=bool)
    np.testing.assert_allclose(float(uniformity(q)), np.log(np.mean(np.exp(-2 * squared[mask]))),
                               rtol=1e-4)
    same = np.tile(q[:1], (12, 1))
    assert float(uniformity(same)) == pytest.approx(0.0, abs=1e-5)  # all points coincide
