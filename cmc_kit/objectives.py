"""Contrastive objectives (pure functions) and view-pair graphs.

Symbols follow MoCo (He et al. 2019) and CMC (Tian et al. 2019):
  q      [B, D]  query embeddings (online network, view i)
  k      [B, D]  key embeddings of the same samples (view j): the positives
  queue  [K, D]  past momentum embeddings of view j: the inter-batch negatives
  T              temperature

Every loss takes raw embeddings, L2-normalises them itself (cosine similarity), computes in
float32 whatever the input dtype (exp(1/0.07) overflows float16) and returns a float32 scalar:
the mean over the batch. The functions only use `keras.ops`, so they run eagerly, inside
`tf.function` and under XLA (`jit_compile=True`), and are differentiable.

Two loss forms (`kind`):
  "infonce"  softmax cross-entropy with the positive as target (MoCo; CMC's better variant).
  "nce"      the original script's CMC NCE form (see ORIGINAL.md "Objective"):
             P = exp(cos/T), Pn = n/(n+1) for n negatives, eps = 1e-7,
             loss = -(1/B) sum_b [ log(P+/(P+ + Pn + eps)) + sum_neg log(Pn/(P- + Pn + eps)) ].
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

from keras import ops

LOSS_KINDS = ("infonce", "nce")
NCE_EPS = 1e-7  # the original's epsilon inside the NCE denominators

# The original's eight ordered (query view, key view) pairs, in its order.
ORIGINAL_PAIRS = (
    ("terrain", "segmentation"),
    ("terrain", "height"),
    ("terrain", "overview"),
    ("segmentation", "terrain"),
    ("segmentation", "height"),
    ("height", "terrain"),
    ("height", "segmentation"),
    ("overview", "terrain"),
)


# -- losses -------------------------------------------------------------------------------

def inter_batch_loss(query, key, queue, temperature=0.07, kind="infonce"):
    """Contrasts each query with its own key (positive) and the whole queue (negatives).

    Args:
        query: [B, D] raw query embeddings (any float dtype).
        key: [B, D] raw key embeddings of the same samples, row for row.
        queue: [K, D] raw negative embeddings (K >= 1).
        temperature: positive number T dividing the cosine similarities.
        kind: "infonce" or "nce".
    Returns:
        float32 scalar, the mean loss over the B rows.
    """
    _check_temperature(temperature)
    _check_kind(kind)
    q, k = _check_pair(query, key, "query", "key")
    queue = _as_float32(queue)
    _check_rank2(queue, "queue")
    _check_same_dim(q, queue, "query", "queue")
    if queue.shape[0] == 0:
        raise ValueError("inter_batch_loss needs at least one negative in the queue. "
                         f"Received: queue.shape={tuple(queue.shape)}")

    q, k, queue = _l2_normalize(q), _l2_normalize(k), _l2_normalize(queue)
    inv_t = _inverse_temperature(temperature)
    l_pos = ops.einsum("nc,nc->n", q, k) * inv_t        # [B]
    l_neg = ops.einsum("nc,kc->nk", q, queue) * inv_t   # [B, K]
    if kind == "infonce":
        logits = ops.concatenate([l_pos[:, None], l_neg], axis=1)  # logits: Bx(1+K), target 0
        return ops.mean(ops.logsumexp(logits, axis=1) - l_pos)
    num_negatives = ops.cast(ops.shape(queue)[0], "float32")
    return _nce(l_pos, l_neg, ops.ones_like(l_neg), num_negatives)


def intra_batch_loss(query, key, temperature=0.07, kind="infonce", *, key_offset=None):
    """Contrasts each query with every key of the batch; its own key is the positive.

    Args:
        query: [B, D] raw query embeddings (B >= 2).
        key: [B, D] raw key embeddings; row b is the positive of query b and a negative for
            every other query.
        temperature: positive number T dividing the cosine similarities.
        kind: "infonce" or "nce".
        key_offset: for data parallelism. When given, `key` is the GLOBAL batch [N, D]
            (N >= B, all replicas' keys gathered) and `query` this replica's B rows; the
            positive of query b is key row key_offset + b, every other key row a negative.
            Averaging the result over replicas gives the loss of the whole batch.
    Returns:
        float32 scalar, the mean loss over the B rows.
    """
    _check_temperature(temperature)
    _check_kind(kind)
    if key_offset is not None:
        return _intra_batch_loss_with_offset(query, key, key_offset, temperature, kind)
    q, k = _check_pair(query, key, "query", "key")
    if q.shape[0] is not None and q.shape[0] < 2:
        raise ValueError("intra_batch_loss needs a batch of at least 2 (the other samples are "
                         f"the negatives). Received: query.shape={tuple(q.shape)}")

    q, k = _l2_normalize(q), _l2_normalize(k)
    inv_t = _inverse_temperature(temperature)
    logits = ops.einsum("nc,mc->nm", q, k) * inv_t  # logits: BxB, target b on the diagonal
    l_pos = ops.diagonal(logits)                     # [B]
    if kind == "infonce":
        return ops.mean(ops.logsumexp(logits, axis=1) - l_pos)
    batch = ops.shape(logits)[0]
    off_diagonal = 1.0 - ops.eye(batch, dtype="float32")  # [B, B]: 1 where c != b
    num_negatives = ops.cast(batch, "float32") - 1.0
    return _nce(l_pos, logits, off_diagonal, num_negatives)


def contrastive_accuracy(query, key, queue=None, *, key_offset=None):
    """Fraction of queries whose positive has the highest similarity (top-1), for progress logs.

    With `queue`, the candidates are [own key, queue...] as in `inter_batch_loss`; without it,
    all keys of the batch as in `intra_batch_loss`. Ties count as correct. float32 scalar.
    `key_offset` (no queue): `key` is the global batch and query b's positive is key row
    key_offset + b, as in `intra_batch_loss`.
    """
    if key_offset is not None and queue is None:
        q, k, positive_columns = _check_offset_pair(query, key, key_offset)
        logits = ops.einsum("nc,mc->nm", _l2_normalize(q), _l2_normalize(k))        # [B, N]
        l_pos = ops.take_along_axis(logits, positive_columns[:, None], axis=1)[:, 0]  # [B]
        return ops.mean(ops.cast(l_pos >= ops.max(logits, axis=1), "float32"))
    q, k = _check_pair(query, key, "query", "key")
    q, k = _l2_normalize(q), _l2_normalize(k)
    if queue is None:
        logits = ops.einsum("nc,mc->nm", q, k)  # [B, B]
        l_pos = ops.diagonal(logits)             # [B], taken from the same matrix: no rounding gap
        l_other = ops.max(logits, axis=1)        # includes the positive itself
    else:
        queue = _as_float32(queue)
        _check_rank2(queue, "queue")
        _check_same_dim(q, queue, "query", "queue")
        l_pos = ops.einsum("nc,nc->n", q, k)                              # [B]
        l_other = ops.max(ops.einsum("nc,kc->nk", q, _l2_normalize(queue)), axis=1)  # [B]
    correct = ops.cast(l_pos >= l_other, "float32")
    return ops.mean(correct)


# -- collapse diagnostics ------------------------------------------------------------------------

def embedding_spread(x):
    """Standard deviation over the batch of L2-normalised embeddings, averaged over dimensions.

    x: [B, D]. About 1/sqrt(D) when the embeddings spread over the sphere, 0 when they collapse
    to one point (the signal SimSiam and BYOL monitor). float32 scalar.
    """
    x = _l2_normalize(_as_float32(x))
    return ops.mean(ops.std(x, axis=0))


def alignment(query, key, alpha=2):
    """Wang & Isola (2020): mean ||q - k||^alpha over positive pairs of L2-normalised
    embeddings [B, D]; 0 when every pair coincides, 4 (alpha 2) when they point apart."""
    q, k = _check_pair(query, key, "query", "key")
    distance = ops.norm(_l2_normalize(q) - _l2_normalize(k), axis=1)  # [B]
    return ops.mean(distance ** alpha)


def uniformity(x, t=2.0):
    """Wang & Isola (2020): log mean over pairs i != j of exp(-t ||x_i - x_j||^2) of
    L2-normalised embeddings [B, D]; 0 when all coincide, more negative the more uniform."""
    x = _l2_normalize(_as_float32(x))
    batch = ops.shape(x)[0]
    squared = ops.maximum(2.0 - 2.0 * ops.einsum("nc,mc->nm", x, x), 0.0)   # [B, B]
    off_diagonal = 1.0 - ops.eye(batch, dtype="float32")
    pairs = ops.sum(off_diagonal)
    return ops.log(ops.sum(ops.exp(-t * squared) * off_diagonal) / pairs)


def _intra_batch_loss_with_offset(query, key, key_offset, temperature, kind):
    """`intra_batch_loss` of B local queries against N global keys (positive at key_offset + b)."""
    q, k, positive_columns = _check_offset_pair(query, key, key_offset)
    q, k = _l2_normalize(q), _l2_normalize(k)
    inv_t = _inverse_temperature(temperature)
    logits = ops.einsum("nc,mc->nm", q, k) * inv_t                               # logits: BxN
    l_pos = ops.take_along_axis(logits, positive_columns[:, None], axis=1)[:, 0]  # [B]
    if kind == "infonce":
        return ops.mean(ops.logsumexp(logits, axis=1) - l_pos)
    num_keys = ops.shape(logits)[1]
    negative_mask = 1.0 - ops.one_hot(positive_columns, num_keys, dtype="float32")  # [B, N]
    num_negatives = ops.cast(num_keys, "float32") - 1.0
    return _nce(l_pos, logits, negative_mask, num_negatives)


def _check_offset_pair(query, key, key_offset):
    """Checks local queries [B, D] against global keys [N, D]; returns them and the positive
    column of each query row, key_offset + b (int32 [B])."""
    q, k = _as_float32(query), _as_float32(key)
    _check_rank2(q, "query")
    _check_rank2(k, "key")
    _check_same_dim(q, k, "query", "key")
    rows_q, rows_k = q.shape[0], k.shape[0]
    if rows_q is not None and rows_k is not None and rows_k < rows_q:
        raise ValueError("With key_offset, key is the global batch and must have at least as "
                         f"many rows as query. Received: query.shape={tuple(q.shape)}, "
                         f"key.shape={tuple(k.shape)}")
    if isinstance(key_offset, numbers.Integral) and rows_q is not None and rows_k is not None \
            and not 0 <= key_offset <= rows_k - rows_q:
        raise ValueError(f"key_offset must lie in [0, {rows_k - rows_q}] so every query's "
                         f"positive is a key row. Received: key_offset={key_offset}")
    offset = ops.cast(key_offset, "int32")
    positive_columns = offset + ops.arange(ops.shape(q)[0], dtype="int32")  # [B]
    return q, k, positive_columns


def _nce(l_pos, l_neg, negative_mask, num_negatives):
    """The original's NCE loss from scaled similarities s = cos/T.

    l_pos [B], l_neg [B, N], negative_mask [B, N] (1 where the column is a negative).
    Evaluated in log space, identical to the literal formula but safe for any T:
      log(P/(P + c))  = s - logaddexp(s, log c)
      log(Pn/(P + c)) = log Pn - logaddexp(s, log c),   c = Pn + eps.
    """
    noise = num_negatives / (num_negatives + 1.0)      # Pn
    log_c = ops.log(noise + NCE_EPS)
    log_d_pos = l_pos - ops.logaddexp(l_pos, log_c)    # [B]
    log_d_neg = ops.log(noise) - ops.logaddexp(l_neg, log_c)  # [B, N]
    # where, not a product: with no negatives (a batch of 1) log Pn = -inf and -inf * 0 = NaN.
    log_d_neg = ops.sum(ops.where(negative_mask > 0, log_d_neg, 0.0), axis=1)  # [B]
    return -ops.mean(log_d_pos + log_d_neg)


# -- validation and small helpers ----------------------------------------------------------

def _check_temperature(temperature) -> None:
    # Plain numbers are checked here; a tensor (e.g. a scheduled temperature) is trusted.
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) and not hasattr(
            temperature, "dtype"):
        raise ValueError("temperature must be a positive number. "
                         f"Received: temperature={temperature!r}")
    if isinstance(temperature, numbers.Real):
        value = float(temperature)
        if not math.isfinite(value) or value <= 0:
            raise ValueError("temperature must be a positive, finite number (0.07 in MoCo and "
                             f"the original). Received: temperature={temperature}")


def _check_kind(kind) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}. Received: kind={kind!r}")


def _as_float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _check_rank2(x, name: str) -> None:
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None and rank != 2:
        raise ValueError(f"{name} must have shape [rows, dim]. "
                         f"Received: {name}.shape={tuple(x.shape)}")


def _check_same_dim(a, b, name_a: str, name_b: str) -> None:
    dim_a, dim_b = a.shape[-1], b.shape[-1]
    if dim_a is not None and dim_b is not None and dim_a != dim_b:
        raise ValueError(f"{name_a} and {name_b} must have the same embedding size. Received: "
                         f"{name_a}.shape={tuple(a.shape)}, {name_b}.shape={tuple(b.shape)}")


def _check_pair(query, key, name_q: str, name_k: str):
    q, k = _as_float32(query), _as_float32(key)
    _check_rank2(q, name_q)
    _check_rank2(k, name_k)
    _check_same_dim(q, k, name_q, name_k)
    rows_q, rows_k = q.shape[0], k.shape[0]
    if rows_q is not None and rows_k is not None and rows_q != rows_k:
        raise ValueError(f"{name_q} and {name_k} must have one row per sample, row for row. "
                         f"Received: {name_q}.shape={tuple(q.shape)}, "
                         f"{name_k}.shape={tuple(k.shape)}")
    return q, k


def _l2_normalize(x):
    # Same clamp as tf.math.l2_normalize: a zero row stays zero with a finite gradient.
    return x * ops.rsqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _inverse_temperature(temperature):
    return 1.0 / ops.cast(temperature, "float32")


# -- view pairs ----------------------------------------------------------------------------

def resolve_pairs(spec, views: Sequence[str]) -> list[tuple[str, str]]:
    """Turns the `train.pairs` setting into ordered (query view, key view) pairs.

    Args:
        spec: "original" (the original's 8 pairs, kept where both views are configured),
            "full" (every ordered pair of configured views), "core:<view>" (that view against
            each other view, both directions), an explicit string "terrain-height,height-terrain",
            or a list of (query view, key view) tuples.
        views: the configured view names (`model.views`).
    Returns:
        Non-empty list of distinct (query, key) tuples of configured, different views.
    """
    from cmc_kit.errors import ConfigError

    views = tuple(views)
    if len(views) < 2:
        raise ConfigError(f"View pairs need at least two configured views (model.views). "
                          f"Received: views={views}")
    configured = ", ".join(views)

    def check_view(name: str) -> str:
        if name not in views:
            raise ConfigError(f"Setting 'train.pairs' names the view {name!r}, which is not "
                              f"configured. Configured views (model.views): {configured}. "
                              f"Received: pairs={spec!r}")
        return name

    if isinstance(spec, str):
        text = spec.strip()
        if text == "original":
            pairs = [p for p in ORIGINAL_PAIRS if p[0] in views and p[1] in views]
        elif text == "full":
            pairs = list(itertools.permutations(views, 2))
        elif text.startswith("core:"):
            core = check_view(text[len("core:"):].strip())
            pairs = [pair for other in views if other != core
                     for pair in ((core, other), (other, core))]
        else:
            pairs = [_parse_pair_item(item, spec) for item in text.split(",") if item.strip()]
    elif isinstance(spec, (list, tuple)):
        pairs = [_parse_pair_item(item, spec) for item in spec]
    else:
        raise ConfigError("Setting 'train.pairs' must be 'original', 'full', 'core:<view>', "
                          f"'a-b,c-d' or a list of (query, key) tuples. Received: pairs={spec!r}")

    seen = set()
    for query_view, key_view in pairs:
        check_view(query_view)
        check_view(key_view)
        if query_view == key_view:
            raise ConfigError(f"Setting 'train.pairs' pairs the view {query_view!r} with itself; "
                              "a pair needs two different views. Received: "
                              f"pairs={spec!r}")
        if (query_view, key_view) in seen:
            raise ConfigError(f"Setting 'train.pairs' lists {query_view}-{key_view} twice; "
                              f"list each pair once. Received: pairs={spec!r}")
        seen.add((query_view, key_view))
    if not pairs:
        raise ConfigError(f"Setting 'train.pairs'={spec!r} leaves no pair among the configured "
                          f"views ({configured}). Use 'full' or list pairs such as "
                          f"'{views[0]}-{views[1]},{views[1]}-{views[0]}'.")
    return pairs


def _parse_pair_item(item, spec) -> tuple[str, str]:
    from cmc_kit.errors import ConfigError

    if isinstance(item, str):
        parts = [part.strip() for part in item.split("-")]
    elif isinstance(item, (list, tuple)):
        parts = [str(part).strip() for part in item]
    else:
        parts = []
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"Setting 'train.pairs' has the item {item!r}; write each pair as "
                          f"'query-key', e.g. 'terrain-height'. Received: pairs={spec!r}")
    return parts[0], parts[1]


__all__ = [
    "LOSS_KINDS",
    "ORIGINAL_PAIRS",
    "alignment",
    "contrastive_accuracy",
    "embedding_spread",
    "inter_batch_loss",
    "intra_batch_loss",
    "resolve_pairs",
    "uniformity",
]
