"""The core sections of the config: the run, the data, the semantic query and
the selection (paper Sec. 3.2-3.3), privacy, the generator and sampling.

Each section is a dataclass whose ``validate`` checks its own ranges with a
one-line error naming the key and the fix; allowed values sit next to the
key they name. Checks that need the data (delta < 1/N) are in
``config/resolve.py``; checks across sections in ``config/schema.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from privimage_core.config.types import require as _require


@dataclass
class RunConfig:
    name: str = "privimage"
    seed: int = 0
    # Where the run writes its outputs (index, checkpoints, synthetic data).
    output_dir: str = "runs"
    # Offline data root (MNIST IDX files, caches); env PRIVIMAGE_DATA_DIR wins if unset.
    data_dir: str | None = None
    # Threads torch may use per process (0 = torch default).
    torch_threads: int = 2
    # The lifetime ledgers (one per sensitive dataset digest, composed over
    # every run on it); None: <output_dir>/lifetime_ledgers.
    ledger_store: str | None = None
    # Reuse budget-free public stages (pre-training) across runs and sweep
    # trials: cached under <output_dir>/cache by a digest of all they depend on.
    cache_public: bool = True

    def validate(self) -> None:
        _require(self.torch_threads >= 0,
                 f"run.torch_threads must be >= 0 (0 = torch's default), got {self.torch_threads}")


SENSITIVE_MAX_REFUSED = (
    "data.sensitive_max is refused: a subsample drawn inside the run breaks add/remove-one DP "
    "(removing one record changes which records are drawn); make the subsample the declared "
    "dataset: privimage data subsample --source SPEC --n N --out PATH.parquet, then set "
    "data.sensitive: parquet:PATH.parquet")
IMAGE_CHANNELS = (1, 3)


@dataclass
class DataConfig:
    # A built-in dataset (mnist, fashion_mnist), folder:<ImageFolder> or
    # parquet:<file> (docs/data.md).
    sensitive: str = "mnist"
    # Real test split for evaluation (non-private: it never trains anything).
    sensitive_test: str | None = None
    public: list[str] = field(default_factory=lambda: ["glyphs", "fashion_mnist"])
    # Every image is read at image_size x image_size with `channels` (one of
    # IMAGE_CHANNELS); other sizes are refused unless `resize`.
    image_size: int = 28
    channels: int = 1
    resize: bool = False
    # Cap on images per public class (deterministic subsample); None = all.
    public_max_per_class: int | None = 300
    # The sensitive classes, declared (never read off the sensitive labels):
    # a user dataset's labels are mapped onto this list, a class without
    # images is kept. None: the file's metadata or the folder's subfolders
    # (built-in datasets have fixed lists).
    class_names: list[str] | None = None
    # Refused when set (SENSITIVE_MAX_REFUSED); kept as a key so that old
    # configs get that message instead of "unknown key".
    sensitive_max: int | None = None
    glyph_max_fonts: int | None = None
    glyph_copies_per_font: int = 2
    # Ray Data read tasks that stream a shards: or folder: public source
    # (indexing, the query function's training, reading pre-training
    # images); 0: read in the selector's own process, without Ray Data.
    public_read_workers: int = 1
    # PDP-Diffusion's whole-pool pre-training (and the fallback to it) draws
    # at most this many public images, uniformly and seeded by run.seed (a
    # public seed), as pre-training sees pretrain.steps x batch_size images
    # anyway; null: every image of the pool, held in memory.
    public_pool_pretrain_max: int | None = 100000

    def validate(self) -> None:
        _require(self.channels in IMAGE_CHANNELS,
                 f"data.channels must be 1 or 3, got {self.channels}")
        _require(8 <= self.image_size <= 256 and self.image_size % 4 == 0,
                 f"data.image_size must be a multiple of 4 in [8, 256], got {self.image_size}")
        _require(len(self.public) > 0,
                 "data.public must name at least one public source, e.g. [glyphs]")
        _require(self.sensitive_max is None, SENSITIVE_MAX_REFUSED)
        _require(self.public_read_workers >= 0,
                 f"data.public_read_workers must be >= 0 (0 = no Ray Data), got "
                 f"{self.public_read_workers}")
        _require(self.public_pool_pretrain_max is None or self.public_pool_pretrain_max >= 1,
                 f"data.public_pool_pretrain_max must be >= 1 or null, got "
                 f"{self.public_pool_pretrain_max}")
        if self.class_names is not None:
            _require(len(self.class_names) > 0 and all(n.strip() for n in self.class_names)
                     and len(set(self.class_names)) == len(self.class_names),
                     "data.class_names must list distinct, non-empty class names, or be null")


# The query function's network: small_resnet is trained on the public pool
# (selection/semantic_query.py); the others are classifiers pre-trained
# elsewhere on public data, loaded from semantic_query.pretrained
# (selection/pretrained.py; efficientnet_lite0 needs the package
# efficientnet-lite-pytorch, the others torchvision).
QUERY_ARCHITECTURES = ("small_resnet", "efficientnet_lite0", "resnet18", "resnet50",
                       "mobilenet_v3_small", "efficientnet_b0")
# How the semantic query function bridges the colour gap between the public
# pool and the sensitive images (selection/semantic_query.py):
#   luminance  train and predict on each image's luminance, negated when its
#              border is brighter than its mean, stretched to the full range:
#              a digit reads the same in any stroke and background colours;
#   augment    train on public images recoloured at random (black and white
#              mapped to two contrasting colours: colour jitter and inversion),
#              some then grayscaled; predict on the images as they are (keeps
#              colour; learns the public labels worse at the default epochs);
#   none       the images as they are (blind to digits in other colours);
#   auto       luminance when the run is in RGB and the public images are
#              grayscale (three equal channels), else none: a one-channel run
#              has no colour gap, and a colour pool (ImageNet) keeps its
#              colours, which carry its semantics; decided from public images.
COLOUR_MODES = ("auto", "luminance", "augment", "none")


@dataclass
class SemanticQueryConfig:
    """The semantic query function of Sec. 3.2 (a classifier on public labels)."""
    width: int = 16
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    val_fraction: float = 0.1
    # At most this many public images an epoch when the pool is streamed
    # (it has a shards: or folder: source), a fresh seeded draw each epoch;
    # null: every image.
    max_images_per_epoch: int | None = None
    # Ray Train workers that train small_resnet from the stream of a
    # shards: or folder: pool (Ray Data into Ray Train; data-parallel from
    # 2 on, each streaming its share); 0: Ray Train's local mode, in the
    # selector's own process.
    train_workers: int = 0
    # CPUs each of those workers reserves; the stream's read tasks need one
    # more free CPU, else training falls back to local mode.
    cpus_per_train_worker: float = 0.5
    # One of QUERY_ARCHITECTURES.
    architecture: str = "small_resnet"
    # A local weights file (state dict) of a pre-trained `architecture`,
    # used instead of training one; null: train small_resnet. Never
    # downloaded.
    pretrained: str | None = None
    # The pre-trained classifier's class names: imagenet (the 1,000
    # ImageNet-1k names torchvision ships) or a text file, line i naming
    # output i. A public label <source>/<name> is its class <name>.
    pretrained_classes: str | None = None
    # The pre-trained classifier sees images resized to this size, in RGB.
    pretrained_input_size: int = 224
    # How the function sees sensitive images of any stroke and background
    # colour against a grayscale public pool: one of COLOUR_MODES. Either way
    # it is trained on public data and the run's seed only. The default was
    # chosen by benchmarks/query_colour.py (results/query-colour-*).
    colour: str = "auto"

    def validate(self) -> None:
        _require(self.width >= 1 and self.epochs >= 1 and self.batch_size >= 1,
                 "semantic_query.width, epochs and batch_size must be >= 1")
        _require(self.lr > 0, f"semantic_query.lr must be > 0, got {self.lr}")
        _require(0 <= self.val_fraction < 1,
                 f"semantic_query.val_fraction must be in [0, 1), got {self.val_fraction}")
        _require(self.max_images_per_epoch is None or self.max_images_per_epoch >= 1,
                 "semantic_query.max_images_per_epoch must be >= 1 or null, got "
                 f"{self.max_images_per_epoch}")
        _require(self.train_workers >= 0,
                 f"semantic_query.train_workers must be >= 0 (0 = local mode), got "
                 f"{self.train_workers}")
        _require(self.cpus_per_train_worker > 0,
                 "semantic_query.cpus_per_train_worker must be > 0 (Ray rejects 0 CPUs), got "
                 f"{self.cpus_per_train_worker}")
        _require(self.architecture in QUERY_ARCHITECTURES,
                 f"semantic_query.architecture must be one of {', '.join(QUERY_ARCHITECTURES)}, "
                 f"got '{self.architecture}'")
        pre = self.architecture != "small_resnet"
        _require(pre == (self.pretrained is not None),
                 "semantic_query.pretrained (a local weights file) goes with a pre-trained "
                 "semantic_query.architecture, and small_resnet with pretrained: null; set both "
                 "or neither")
        _require(not pre or self.pretrained_classes is not None,
                 "semantic_query.pretrained_classes must name the classifier's classes "
                 "(imagenet or a file, one name per line) when semantic_query.pretrained is set")
        _require(16 <= self.pretrained_input_size <= 1024,
                 f"semantic_query.pretrained_input_size must be in [16, 1024], got "
                 f"{self.pretrained_input_size}")
        _require(self.colour in COLOUR_MODES,
                 f"semantic_query.colour must be one of {', '.join(COLOUR_MODES)}, "
                 f"got '{self.colour}'")


# What to pre-train on when some classes' selections cannot be told from
# noise (privacy/query_budget.py, fallback_plan):
#   fallback  those classes get no pre-training images; when fewer than half
#             the classes are significant, the whole public pool instead;
#   keep      the noisy selection anyway (the paper's behaviour), with a warning;
#   fail      stop before pre-training (the query's budget is spent and recorded).
ON_INSIGNIFICANT = ("fallback", "keep", "fail")


@dataclass
class SelectionConfig:
    """Sec. 3.3: DP semantic distribution query and top-k2 selection."""
    # Fraction of public semantics selected in total (Table 8): k2 per class is
    # floor(ratio * num_public_labels / num_sensitive_classes), at least 1.
    selection_ratio: float = 0.1
    # Explicit k2 overrides the ratio.
    k2: int | None = None
    # Semantics queried per sensitive image; the paper sets k1 = k2 (App. A).
    k1: int | None = None
    # The query's share of privacy.target_epsilon (privacy/query_budget.py):
    # sigma_q is calibrated so the query alone costs at most share * epsilon;
    # DP-SGD gets the rest of the composed budget. Chosen by measurement of
    # DP-SGD's added noise against the significance threshold it buys
    # (benchmarks/query_share.py; results in benchmarks/results/query-share-*).
    query_epsilon_share: float = 0.1
    # An explicit noise multiplier of the histogram query (noise std
    # sigma_q * sqrt(k1)) wins over the share; the paper's setting.
    sigma_q: float | None = None
    # The significance check of the noisy histogram (query_budget.py): a
    # class's selection counts when its best noisy count exceeds the level a
    # no-signal histogram reaches with probability alpha (Bonferroni).
    significance_alpha: float = 0.05
    # When any class fails it: one of ON_INSIGNIFICANT.
    on_insignificant: str = "fallback"

    def validate(self) -> None:
        _require(0 < self.selection_ratio <= 1,
                 f"selection.selection_ratio must be in (0, 1], got {self.selection_ratio}; "
                 "set e.g. 0.1")
        _require(self.sigma_q is None or self.sigma_q > 0,
                 "selection.sigma_q must be > 0 or null (calibrated from the share), got "
                 f"{self.sigma_q}")
        _require(0 < self.query_epsilon_share < 1,
                 f"selection.query_epsilon_share must be in (0, 1), got "
                 f"{self.query_epsilon_share}; set e.g. 0.05")
        _require(0 < self.significance_alpha < 1,
                 f"selection.significance_alpha must be in (0, 1), got {self.significance_alpha}")
        _require(self.on_insignificant in ON_INSIGNIFICANT,
                 f"selection.on_insignificant must be one of {', '.join(ON_INSIGNIFICANT)}, "
                 f"got '{self.on_insignificant}'")
        for k in ("k1", "k2"):
            v = getattr(self, k)
            _require(v is None or v >= 1, f"selection.{k} must be >= 1 or null, got {v}")


# Opacus accountants the ledger composes with (privacy/ledger.py).
ACCOUNTANTS = ("rdp", "prv")


@dataclass
class PrivacyConfig:
    target_epsilon: float = 10.0
    # None: 1e-5, or 0.1/N when N is so small that 1e-5 >= 1/N (resolve_delta).
    target_delta: float | None = None
    # One of ACCOUNTANTS.
    accountant: str = "rdp"
    # A budget for ALL runs on the same sensitive data (lifetime ledger): a
    # run whose plan would take the composition past it is refused before it
    # reads the data. None: every run is composed and reported, none refused.
    lifetime_epsilon: float | None = None
    # The identity the lifetime ledger follows the sensitive dataset by, shared
    # by all its versions and copies (e.g. "clinic-xrays"). None: its origin,
    # a folder's or file's path or a subsample's source (docs/privacy.md).
    dataset_id: str | None = None
    # The sensitive dataset's size as you declare it public: the Poisson rate
    # q = 1/ceil(size / batch), the expected batch and the default delta use
    # it, and it is what the run releases (the true N never is). None: a
    # built-in dataset's published size, a materialised subsample's size, or
    # else a DP estimate costing size_epsilon_share of the target epsilon
    # (privacy/dataset_size.py).
    dataset_size: int | None = None
    size_epsilon_share: float = 0.01

    def validate(self) -> None:
        _require(self.target_epsilon > 0 and math.isfinite(self.target_epsilon),
                 f"privacy.target_epsilon must be > 0, got {self.target_epsilon}; set e.g. 10")
        _require(self.lifetime_epsilon is None or self.lifetime_epsilon > 0,
                 f"privacy.lifetime_epsilon must be > 0 or null, got {self.lifetime_epsilon}")
        if self.target_delta is not None:
            _require(0 < self.target_delta < 1,
                     f"privacy.target_delta must be in (0, 1), got {self.target_delta}; "
                     "set e.g. 1e-5")
        _require(self.dataset_size is None or self.dataset_size >= 1,
                 f"privacy.dataset_size must be >= 1 or null, got {self.dataset_size}")
        _require(0 < self.size_epsilon_share < 1,
                 f"privacy.size_epsilon_share must be in (0, 1), got "
                 f"{self.size_epsilon_share}; set e.g. 0.01")
        _require(self.dataset_id is None or bool(self.dataset_id.strip()),
                 "privacy.dataset_id must be a non-empty name or null")
        _require(self.accountant in ACCOUNTANTS,
                 f"privacy.accountant must be 'rdp' or 'prv', got '{self.accountant}'")


@dataclass
class GeneratorConfig:
    # A preset of the method's model family (models/<family>/).
    preset: str = "tiny"
    # Overrides of the preset's network arguments (e.g. base_channels).
    overrides: dict = field(default_factory=dict)
    # Classifier-free guidance (the families with ``guidance``: diffusion,
    # latent): the share of training examples whose label is replaced by the
    # null label, in pre-training and DP-SGD. Off by default: on validation
    # splits it lowered downstream accuracy on MNIST, and on the coloured
    # digits a pipeline pre-trained with it and sampled at w 1 scored no
    # better than without; it helped on Fashion-MNIST
    # (benchmarks/results/quality-explore-*, rgb-explore-*).
    label_dropout: float = 0.0

    def validate(self) -> None:
        _require(0 <= self.label_dropout < 1,
                 f"generator.label_dropout must be in [0, 1), got {self.label_dropout}")


# ODE solvers of the diffusion samplers (models/diffusion/edm.py).
SOLVERS = ("euler", "heun")


@dataclass
class SamplingConfig:
    # Enough for a comparable FID (evaluation.fid_images) and for the
    # downstream classifiers.
    num_images: int = 5000
    num_steps: int = 18
    # One of SOLVERS.
    solver: str = "euler"
    batch_size: int = 500
    # Classifier-free guidance scale w: D = (1 + w) D(x|y) - w D(x|null);
    # 0 = plain conditional sampling; w > 0 needs generator.label_dropout > 0
    # and a family with guidance.
    guidance: float = 0.0

    def validate(self) -> None:
        _require(self.solver in SOLVERS,
                 f"sampling.solver must be 'euler' or 'heun', got '{self.solver}'")
        _require(self.guidance >= 0, "sampling.guidance must be >= 0")
        _require(self.num_images >= 1 and self.num_steps >= 1,
                 "sampling.num_images and sampling.num_steps must be >= 1")
        _require(self.batch_size >= 1,
                 f"sampling.batch_size must be >= 1, got {self.batch_size}")
