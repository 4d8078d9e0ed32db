"""Ray actors: the public-data indexer/selector and the evaluator.

The selector owns the public index, the semantic query function and the
selection; it is the only actor that reads sensitive data outside the DP
trainer, and only to run the DP histogram query, whose cost it charges to the
ledger it is handed before releasing anything. It returns DP outputs only.

The evaluator samples the synthetic dataset from the DP generator (or joins
the shards the sampling workers drew, services/sampling.py) and scores it
against the real TEST split (non-private evaluation, labelled as such). With
``ray.use_gpu`` it samples, runs the Inception passes and trains the CNN
classifiers on its GPU (``RayConfig.gpu_options``; ``EvaluatorActor`` gets
them through ``.options``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from privimage_core.config import from_dict, resolve_k
from privimage_core.data.imageset import ImageSet
from privimage_core.data.shards import open_streamed
from privimage_core.data.sources import build_public_pool, check_prefixes
from privimage_core.data.specs import is_streamed
from privimage_core.device import resolve_device
from privimage_core.errors import ConfigError
from privimage_core.evaluation.canary_audit import CanaryAuditInput, CanarySet
from privimage_core.evaluation.report import render_html
from privimage_core.evaluation.semantic_similarity import selection_sds
from privimage_core.evaluation.suite import run_evaluation
from privimage_core.models.state import state_from_bytes
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.selection.distribution import query_semantic_distribution, relabel_selection
from privimage_core.selection.public_index import PublicIndex
from privimage_core.selection.semantic_query import predict_topk, train_semantic_query
from privimage_core.synthesize import balanced_labels, generate, write_dataset
from services.metrics import PipelineMetrics
from services.process_setup import configure_torch
from services.progress import ProgressPoster
from services.public_data import index_parts, read_images
from services.public_query import pretrained_query, train_query_stream
from services.sampling import load_release_module


class PublicSelector:
    """Steps 1-3 of Algorithm 2 (plain class; ``SelectorActor`` is its Ray actor)."""

    def __init__(self, cfg_dict: dict, workdir: str, metrics_run_id: str | None = None):
        self.cfg = from_dict(cfg_dict)
        configure_torch(self.cfg)
        self.workdir = Path(workdir)
        self.index: PublicIndex | None = None
        self.model = None
        # Live metrics (services/metrics.py): public counts and DP selection only.
        self.pm = PipelineMetrics(metrics_run_id) if metrics_run_id else None

    def build_index(self) -> dict:
        """Index the public pool: sources small enough are loaded in memory
        (build_public_pool); shards:/folder: sources are indexed shard by
        shard from their labels (services/public_data.py), never read whole."""
        c = self.cfg.data
        t0 = time.time()
        check_prefixes(c.public)
        memory = [s for s in c.public if not is_streamed(s)]
        glyph_opts = {"max_fonts": c.glyph_max_fonts, "per_font": c.glyph_copies_per_font}
        pool = build_public_pool(memory, image_size=c.image_size, channels=c.channels,
                                 max_per_class=c.public_max_per_class, seed=self.cfg.run.seed,
                                 glyph_opts=glyph_opts) if memory else None
        streamed, parts = [open_streamed(s) for s in c.public if is_streamed(s)], {}
        if streamed:
            streamed, parts = index_parts(streamed, str(self._parts_dir()), c.public_read_workers)
        self.index = PublicIndex.build_sources(
            pool, streamed, self.workdir / "public_index", self._parts_dir(),
            (c.image_size, c.image_size, c.channels), c.public_max_per_class, self.cfg.run.seed)
        del pool
        counts = self.index.counts_per_label()
        if self.pm:
            self.pm.public_images(self.index.num_rows)
        return {"num_public_images": int(self.index.num_rows),
                "num_public_labels": len(self.index.label_names),
                "label_names": list(self.index.label_names),
                "public_counts": counts.tolist(), "seconds": time.time() - t0,
                "index_shards": parts.get("shards", 0), "index_shards_reused": parts.get("reused", 0)}

    def _parts_dir(self) -> Path:
        """Cached per-shard index parts: shared by the runs of an output
        directory (public, budget-free) unless run.cache_public is off."""
        if self.cfg.run.cache_public:
            return Path(self.cfg.run.output_dir).resolve() / "cache" / "public-index-parts"
        return self.workdir / "public_index_parts"

    def train_query_function(self) -> dict:
        q = self.cfg.semantic_query
        workers = self.cfg.data.public_read_workers
        if q.pretrained is not None:
            self.model, metrics = pretrained_query(self.index, q, self.cfg.run.seed, workers)
        elif self.index.streamed:
            self.model, metrics = train_query_stream(
                self.index, q, self.cfg.run.seed, workers, self.workdir / "query_function_train",
                log_level=self.cfg.ray.train_log_level)
        else:
            pool = self.index.load()
            self.model, metrics = train_semantic_query(
                pool, width=q.width, epochs=q.epochs, batch_size=q.batch_size, lr=q.lr,
                val_fraction=q.val_fraction, seed=self.cfg.run.seed, colour=q.colour)
        torch.save(self.model.state_dict(), self.workdir / "semantic_query.pt")
        return metrics

    def query(self, ledger_state: dict, sensitive: tuple[np.ndarray, np.ndarray],
              num_classes: int, sigma_q: float) -> dict:
        """The DP semantic distribution query. Returns the noisy histograms,
        the selection and the charged ledger: DP outputs only."""
        images, labels = sensitive
        ledger = PrivacyLedger.from_state_dict(ledger_state)
        k1, k2 = resolve_k(self.cfg, len(self.index.label_names), num_classes)
        known = getattr(self.model, "num_known_labels", k1)
        if k1 > known:
            raise ConfigError(f"selection.k1={k1} exceeds the {known} public labels the "
                              "pre-trained classifier knows (semantic_query.pretrained_classes); "
                              "lower selection.k1 or selection.selection_ratio")
        x = ImageSet(images, labels, [str(i) for i in range(num_classes)]).to_tensor()
        topk = predict_topk(self.model, x, k=k1,
                            batch_size=getattr(self.model, "predict_batch_size", 1000))
        dist = query_semantic_distribution(topk, labels, len(self.index.label_names), num_classes,
                                           k1, k2, sigma_q, ledger)
        del x, topk, images, labels
        return {"noisy_histograms": dist.noisy_histograms, "k1": k1, "k2": k2,
                "sigma_q": dist.sigma_q, "selection": dist.selection,
                "ledger": ledger.state_dict()}

    def semantic_similarity(self, class_names: list[str], noisy_histograms,
                            selection: dict[int, list[int]]) -> dict:
        """SDS (paper Eq. 5) from DP outputs and public counts only."""
        t0 = time.time()
        out = selection_sds(class_names, noisy_histograms, selection,
                            list(self.index.label_names), self.index.counts_per_label())
        out["sds_seconds"] = time.time() - t0
        return out

    def _images(self, table) -> tuple[np.ndarray, np.ndarray]:
        """(images, public labels) of an index table's rows, in id order: read
        from the shards of a streamed pool, from memory otherwise."""
        table = table.sort_by("id")
        if not self.index.streamed:
            ds = self.index.load(table)
            return ds.images, ds.labels
        images = read_images(self.index, table, self.cfg.data.public_read_workers)
        return images, table.column("label").to_numpy().astype(np.int64)

    def pool_images(self, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The public pool, with a sensitive class id drawn uniformly from
        ``seed`` (public) per image: PDP-Diffusion's pre-training on the
        whole pool; beyond data.public_pool_pretrain_max images, a uniform
        subsample of that size drawn from the same public seed."""
        table = self.index.table
        cap = self.cfg.data.public_pool_pretrain_max
        if cap is not None and table.num_rows > cap:
            rows = np.random.default_rng([seed, 0x9D]).choice(table.num_rows, cap, replace=False)
            table = table.take(np.sort(rows))
        images, _ = self._images(table)
        labels = np.random.default_rng(seed).integers(0, num_classes, len(images))
        if self.pm:  # the images pre-training uses: here the whole pool
            self.pm.selected(len(labels))
        return images, labels.astype(np.int64)

    def selected_images(self, selection: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Public images whose labels were selected, relabelled to the sensitive
        class: a filter over the index, then only those rows are read."""
        ids = sorted(p for ps in selection.values() for p in ps)
        images, public_labels = self._images(self.index.select(ids))
        idx, new_labels = relabel_selection(public_labels, selection)
        if self.pm:
            self.pm.selected(len(new_labels))
        return images[idx], new_labels


@ray.remote(num_cpus=1)
class SelectorActor(PublicSelector):
    pass


class Evaluator:
    """Samples the synthetic dataset from the DP generator, then evaluates it
    (privimage_core.evaluation.suite): fidelity and utility against the real
    TEST split, the "train on real" ceiling and the membership-inference audit
    on the SENSITIVE training set. All of it is non-private evaluation; only
    numbers and the report (synthetic images + figures) leave this actor."""

    # Exported live from this actor while it works (the driver re-exports
    # the final values, which outlive the actor).
    # Only metrics that read no sensitive TRAINING data (the audit and the
    # ceiling stay in the labelled MLflow run and the report).
    LIVE_METRICS = ("fid", "kid", "precision", "recall", "accuracy_lr", "accuracy_mlp",
                    "accuracy_cnn", "detector_privacy_loss")

    def __init__(self, cfg_dict: dict, workdir: str, metrics_run_id: str | None = None):
        self.cfg = from_dict(cfg_dict)
        configure_torch(self.cfg)
        self.workdir = Path(workdir)
        self.pm = PipelineMetrics(metrics_run_id) if metrics_run_id else None
        self._device = None
        self.synthetic: ImageSet | None = None
        self.family = self.release = self.manifest = None
        self.provenance: dict = {}

    @property
    def device(self):
        """Chosen once, on the first call (before any work): the one-line error
        when ray.use_gpu is set and this actor sees no GPU is then a method's
        error, which reaches the driver as such (an actor's constructor error
        arrives as a dead actor)."""
        if self._device is None:
            self._device = resolve_device(self.cfg.ray.use_gpu)
        return self._device

    def synthesize(self, state: bytes, manifest: dict, provenance: dict,
                   progress_board: str | None = None, shards: list | None = None) -> dict:
        """Sample the synthetic dataset from the release: its weights
        (``state_bytes``) and its manifest (models/release.py), which says
        which family and network to rebuild. ``shards``: ObjectRefs of the
        images the sampling workers drew (services/sampling.py), in image
        order, joined instead of sampling here."""
        c = self.cfg
        t0 = time.time()
        # with shards the release only serves the audits, on the CPU
        fam, man, release = load_release_module(
            state, manifest, self.device if shards is None else torch.device("cpu"))
        if shards is None:
            ds = generate(fam, release, c.sampling.num_images, man.class_names,
                          c.sampling.num_steps, c.sampling.solver, seed=c.run.seed,
                          batch_size=c.sampling.batch_size, guidance=c.sampling.guidance,
                          progress=ProgressPoster(progress_board))
        else:
            ds = ImageSet(np.concatenate(ray.get(list(shards))),
                          balanced_labels(c.sampling.num_images, len(man.class_names)),
                          list(man.class_names), name="synthetic")
        # The membership diagnostic and the canary audit run the release on
        # the CPU, where their seeded draws and the reference model live.
        release = release.cpu()
        out = write_dataset(ds, self.workdir / "synthetic", provenance)
        self.family, self.release, self.manifest = fam, release, man
        self.synthetic, self.provenance = ds, dict(provenance)
        if self.pm:
            self.pm.eval_metric("synthetic_images", len(ds))
        return {"path": str(out), "num_images": len(ds), "seconds": time.time() - t0}

    def evaluate(self, real_test: tuple[np.ndarray, np.ndarray], class_names: list[str],
                 sensitive: tuple[np.ndarray, np.ndarray] | None = None,
                 ledger_epsilon: float | None = None, canaries: dict | None = None,
                 reference_state: bytes | None = None, progress_board: str | None = None,
                 audit_epsilon: float | None = None) -> dict:
        """Non-private evaluation. ``sensitive``: the sensitive training
        images and labels the generator was fine-tuned on (members of the
        audit, the ceiling's training data); never written anywhere.
        ``ledger_epsilon``: the release's epsilon (default: the provenance's);
        ``audit_epsilon``: the epsilon of the DP-SGD stages alone, the claim the
        canary audit tests (canaries never enter the queries).
        ``canaries``: the run's CanarySet fields (images, labels, included,
        source, source_index) for the canary audit; ``reference_state``: the
        public pre-trained weights (state_bytes), which calibrate its scores.
        Returns the numeric metrics (``<metric>_seconds`` for each), plus
        'report_html' (the one-page report), 'audit_message', 'audit_verdict'
        and 'canary_detail' (the audit's counts: operator only)."""
        if self.synthetic is None:
            raise RuntimeError("Evaluator.evaluate needs synthesize() first")
        test = ImageSet(real_test[0], real_test[1], class_names, name="real_test")
        train = (ImageSet(sensitive[0], sensitive[1], class_names, name="sensitive_train")
                 if sensitive is not None else None)
        eps = ledger_epsilon if ledger_epsilon is not None else self.provenance.get("epsilon")
        logs: list[str] = []
        poster = ProgressPoster(progress_board)

        def log(line: str) -> None:  # kept for the caller, and shown as it happens
            logs.append(line)
            poster.say(line)

        canary = self._canary_input(canaries, reference_state)
        res = run_evaluation(self.cfg.evaluation, self.synthetic, test, seed=self.cfg.run.seed,
                             real_train=train, ledger_epsilon=eps, audit_epsilon=audit_epsilon,
                             delta=self.provenance.get("delta"),
                             fid_cache_dir=str(self.workdir.parent / "fid_cache"),
                             log=log, canary=canary, family=self.family,
                             release=self.release, progress=poster,
                             device=str(self.device))
        del train, sensitive
        out: dict = dict(res.metrics)
        if self.pm:
            for k in self.LIVE_METRICS:
                if isinstance(out.get(k), (int, float)):
                    self.pm.eval_metric(k, out[k])
        out["report_html"] = render_html(res, self.synthetic, self.provenance)
        out["audit_message"] = res.audit_message
        out["failure"] = res.failure
        out["notes"] = res.notes
        out["log"] = logs
        out["audit_verdict"] = res.canary["verdict"] if res.canary else None
        out["canary_detail"] = res.canary
        return out

    def _canary_input(self, canaries: dict | None, reference_state: bytes | None):
        if canaries is None:
            return None
        ref = None
        if reference_state is not None:
            model = self.manifest.build()
            model.load_state_dict(state_from_bytes(reference_state))
            ref = self.family.release_module(model).eval()
        return CanaryAuditInput(CanarySet(**canaries), self.family, self.release, ref)


@ray.remote(num_cpus=1)
class EvaluatorActor(Evaluator):
    pass


def outside_trial(actor_cls, **options):
    """Schedule an actor on the cluster's free resources, not in the caller's
    placement group: a Tune trial's group holds only the trial function's
    own (fractional) CPU, and Ray would otherwise capture child actors into it
    and refuse them. Outside Tune this changes nothing. ``options``: further
    Ray options (``RayConfig.gpu_options()``)."""
    return actor_cls.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None), **options)
