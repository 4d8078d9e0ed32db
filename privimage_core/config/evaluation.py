"""The evaluation section of the config (``evaluation:``) and its checks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from privimage_core.config.types import require as _require


@dataclass
class EvaluationConfig:
    """What the evaluator measures (privimage_core/evaluation/suite.py). All of
    it is non-private evaluation (real test split; the ceiling and the
    membership audit also read the sensitive training set). FID and KID use
    500 images per side by default, what a first run on 2 CPU cores affords
    (the Inception pass is most of the evaluation's time on a CPU; the real
    side's features are cached by content hash after the first run); the
    comparable protocol's 5,000 (evaluation/protocol.py) is
    configs/benchmark.yaml, or configs/eval-fid5k.yaml for a finished run."""
    # Semantic distribution similarity (paper Eq. 5) of the sensitive classes
    # to the selected public data and to the whole public pool, computed by
    # the selector from the noisy histograms (a DP output) and public counts:
    # the one metric here that is private (evaluation/semantic_similarity.py).
    sds: bool = True
    fid: bool = True
    # Images per side for FID, KID and precision/recall (one Inception pass
    # serves all). FID is biased upward at small N and the bias depends on
    # the model: only FIDs at equal N compare, and published ones use 5,000+;
    # KID is unbiased at any N, and every fidelity line says which it is
    # (the synthetic side is min(fid_images, sampling.num_images)).
    fid_images: int = 500
    fid_weights: str | None = None
    # Which runtime runs the FID Inception (one of INCEPTION_BACKENDS):
    # 'auto' = OpenVINO on a CPU where installed (the same float32 network,
    # faster there: benchmarks/bench_inception.py), else torch.
    inception_backend: str = "auto"
    # Precision/recall in the FID features (computed only when fid is on).
    precision_recall: bool = True
    pr_k: int = 3
    # The headline classifier (summary "accuracy", utility matrix).
    classifier: str = "cnn"
    # Classifiers trained on synthetic data, tested on the real test split.
    classifiers: list[str] = field(default_factory=lambda: ["lr", "mlp", "cnn"])
    classifier_epochs: int = 8
    # LR / MLP train on at most this many images, with these iteration caps.
    sklearn_max_images: int = 2000
    lr_max_iter: int = 50
    mlp_max_iter: int = 15
    # "Train on real" ceiling on a subset of the SENSITIVE training set (non-private).
    real_ceiling: bool = True
    ceiling_images: int = 1000
    # Real/synthetic utility matrix; synthetic images held out as its synthetic test set.
    utility_matrix: bool = True
    utility_holdout: int = 500
    # Detector attack (real vs synthetic classifier) on this many images per side.
    detector: bool = True
    detector_images: int = 400
    detector_kind: str = "cnn"
    detector_min_steps: int = 100
    # Loss-threshold membership inference on the DP generator.
    mia: bool = True
    mia_members: int = 500
    mia_nonmembers: int = 500
    mia_noise_levels: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    mia_repeats: int = 1
    mia_confidence: float = 0.95
    # The one-run canary audit (evaluation/canary_audit.py; Steinke, Nasr &
    # Jagielski 2023): the privacy check that can fail. It changes TRAINING:
    # DP fine-tuning reads the sensitive set plus each of `canaries` public
    # canaries (the test split of `canary_source`, labels uniform) with
    # probability 1/2; the guarantee then covers that dataset (ledger.json says
    # so). Half the canaries choose the guesses, half give the bound at
    # confidence 1 - canary_beta. With m canaries at most about ln(m) can be
    # shown: a larger claim is reported "inconclusive", never "passed". 500
    # keeps the quickstart cheap (about 250 public images join the training
    # set; scoring takes seconds).
    canary_audit: bool = True
    canaries: int = 500
    canary_beta: float = 0.05
    # 'auto': Fashion-MNIST, or MNIST when the sensitive data is Fashion-MNIST.
    canary_source: str = "auto"
    # Seeds the family's audit loss is averaged over per canary.
    canary_repeats: int = 4

    # Memorisation checks (evaluation/memorisation.py), NON-PRIVATE: they read
    # the sensitive training set. DCR of memorisation_images synthetic images
    # against EVERY training image and memorisation_heldout held-out test
    # images in pixel space, and on memorisation_feature_images synthetic
    # images and class-matched training / held-out pairs in FID-Inception
    # space (an Inception pass per image; 0 = pixel space only). The
    # reconstruction attack uses memorisation_reconstruction_images pairs.
    memorisation: bool = True
    memorisation_images: int = 500
    memorisation_heldout: int = 2000
    memorisation_reconstruction_images: int = 500
    memorisation_feature_images: int = 100
    # Noise levels (EDM sigma, images in [-1, 1]) of the one-step reconstruction.
    memorisation_noise_levels: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # Family-wise significance level over the three checks (each runs at
    # alpha / 3), and the smallest effect (share / AUC above 0.5) that counts.
    memorisation_alpha: float = 0.05
    memorisation_effect: float = 0.1
    # Embed the closest synthetic / TRAINING pairs in the report. Off by
    # default: it puts sensitive training images into the report (an MLflow
    # artifact); turn on only for an operator's eyes.
    memorisation_show_pairs: bool = False


    def validate(self) -> None:
        kinds = ("cnn", "mlp", "lr")
        _require(self.classifier in kinds, "evaluation.classifier must be cnn, mlp or lr")
        _require(all(k in kinds for k in self.classifiers),
                 f"evaluation.classifiers must be among cnn, mlp, lr, got {self.classifiers}")
        _require(self.detector_kind in kinds, "evaluation.detector_kind must be cnn, mlp or lr")
        _require(self.pr_k >= 1, f"evaluation.pr_k must be >= 1, got {self.pr_k}")
        _require(self.fid_images > self.pr_k and self.fid_images >= 2,
                 f"evaluation.fid_images must be >= 2 and > evaluation.pr_k, got {self.fid_images}; set e.g. 200")
        _require(self.inception_backend in INCEPTION_BACKENDS,
                 f"evaluation.inception_backend must be one of {', '.join(INCEPTION_BACKENDS)}, "
                 f"got '{self.inception_backend}'")
        for k in ("classifier_epochs", "sklearn_max_images", "lr_max_iter", "mlp_max_iter",
                  "ceiling_images", "utility_holdout", "detector_min_steps", "mia_repeats"):
            _require(getattr(self, k) >= 1, f"evaluation.{k} must be >= 1, got {getattr(self, k)}")
        _require(self.detector_images >= 4,
                 f"evaluation.detector_images must be >= 4, got {self.detector_images}; set e.g. 400")
        for k in ("mia_members", "mia_nonmembers"):
            _require(getattr(self, k) >= 2, f"evaluation.{k} must be >= 2, got {getattr(self, k)}; set e.g. 500")
        _require(len(self.mia_noise_levels) >= 1 and all(
            0 < s < 1000 and math.isfinite(s) for s in self.mia_noise_levels),
            f"evaluation.mia_noise_levels must be a non-empty list of sigmas in (0, 1000), "
            f"got {self.mia_noise_levels}; set e.g. [0.1, 0.3, 1.0]")
        _require(0 < self.mia_confidence < 1,
                 f"evaluation.mia_confidence must be in (0, 1), got {self.mia_confidence}; set e.g. 0.95")
        _require(self.canary_source in CANARY_SOURCES + ("auto",),
                 f"evaluation.canary_source must be auto or one of {', '.join(CANARY_SOURCES)}, got "
                 f"'{self.canary_source}'")
        _require(16 <= self.canaries <= MAX_CANARIES,
                 f"evaluation.canaries must be in [16, {MAX_CANARIES}], got {self.canaries}; set e.g. 500")
        _require(0 < self.canary_beta <= 0.5,
                 f"evaluation.canary_beta must be in (0, 0.5], got {self.canary_beta}; set e.g. 0.05")
        _require(1 <= self.canary_repeats <= 64,
                 f"evaluation.canary_repeats must be in [1, 64], got {self.canary_repeats}; set e.g. 4")
        for k in ("memorisation_images", "memorisation_heldout", "memorisation_reconstruction_images"):
            _require(getattr(self, k) >= 2, f"evaluation.{k} must be >= 2, got {getattr(self, k)}; set e.g. 500")
        _require(self.memorisation_feature_images >= 0,
                 f"evaluation.memorisation_feature_images must be >= 0 (0 = pixel space only), "
                 f"got {self.memorisation_feature_images}")
        _require(len(self.memorisation_noise_levels) >= 1 and all(
            0 < s < 1000 and math.isfinite(s) for s in self.memorisation_noise_levels),
            f"evaluation.memorisation_noise_levels must be a non-empty list of sigmas in (0, 1000), "
            f"got {self.memorisation_noise_levels}; set e.g. [0.5, 1.0, 2.0]")
        _require(0 < self.memorisation_alpha < 0.5,
                 f"evaluation.memorisation_alpha must be in (0, 0.5), got {self.memorisation_alpha}")
        _require(0 < self.memorisation_effect < 0.5,
                 f"evaluation.memorisation_effect must be in (0, 0.5), got {self.memorisation_effect}")


# Runtimes for the FID Inception (privimage_core/evaluation/fid.resolve_backend).
INCEPTION_BACKENDS = ("auto", "torch", "openvino")
# Public sources canaries may come from (their test splits; glyphs have none).
CANARY_SOURCES = ("fashion_mnist", "mnist", "glyphs")
MAX_CANARIES = 10_000  # the test splits' size
