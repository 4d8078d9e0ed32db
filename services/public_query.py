"""The semantic query function of a pool read from its shards: trained from
the stream of services/public_data.py, or a pre-trained classifier plugged
in from a local weights file (privimage_core/selection/pretrained.py)."""
from __future__ import annotations

import numpy as np

from privimage_core.config.sections import SemanticQueryConfig
from privimage_core.selection.pretrained import (
    PretrainedQuery, classifier_class_names, load_classifier, match_classes)
from privimage_core.selection.public_index import PublicIndex
from privimage_core.selection.semantic_query import predict_topk
from privimage_core.selection.stream_query import to_model_input, train_semantic_query_stream
from services.public_data import iter_images, read_images

# Held-out public images for the query function's validation accuracy (a
# public-only sanity figure): val_fraction of the pool, at most this many.
VAL_MAX = 10_000


def train_query_stream(index: PublicIndex, q: SemanticQueryConfig, seed: int, workers: int,
                       log=None):
    """The query function trained on the pool streamed from its shards; a
    held-out public part (val_fraction, at most VAL_MAX) scores it."""
    n = index.num_rows
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = min(max(1, int(n * q.val_fraction)), VAL_MAX) if q.val_fraction > 0 else 0
    val_pos, train_pos = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    val = None
    if n_val:
        vt = index.table.take(val_pos)
        val = read_images(index, vt, workers), vt.column("label").to_numpy()
    per_epoch = min(len(train_pos), q.max_images_per_epoch or len(train_pos))

    def epoch_batches(ep: int):
        pos = train_pos if per_epoch == len(train_pos) else np.sort(
            np.random.default_rng([seed, 8, ep]).choice(train_pos, per_epoch, replace=False))
        for x, y, _ in iter_images(index, index.table.take(pos), workers, q.batch_size,
                                   shuffle_seed=seed * 1000 + ep, drop_last=True):
            yield x, y

    return train_semantic_query_stream(
        epoch_batches, per_epoch // q.batch_size, len(index.label_names),
        index.manifest["image_shape"][2], val, q.width, q.epochs, q.lr, seed, log=log)


def pretrained_query(index: PublicIndex, q: SemanticQueryConfig, seed: int, workers: int,
                     sample: int = 1000):
    """A pre-trained classifier as the query function, scored on a public
    sample of the labels it knows (its top-1 in the pool's label space)."""
    names = classifier_class_names(q.pretrained_classes)
    net = load_classifier(q.pretrained, q.architecture, len(names))
    clf_ids, pool_ids = match_classes(names, index.label_names)
    model = PretrainedQuery(net, q.architecture, q.pretrained_input_size, clf_ids, pool_ids,
                            len(index.label_names)).eval()
    known = index.select(sorted(set(pool_ids)))
    take = np.sort(np.random.default_rng([seed, 9]).choice(
        known.num_rows, min(sample, known.num_rows), replace=False))
    t = known.take(take)
    pred = predict_topk(model, to_model_input(read_images(index, t, workers)), k=1)[:, 0]
    acc = float((pred == t.column("label").to_numpy()).mean()) if len(pred) else float("nan")
    return model, {"public_val_accuracy": acc, "matched_public_labels": len(set(pool_ids)),
                   "classifier_classes": len(names)}
