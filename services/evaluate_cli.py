"""``privimage evaluate --synthetic SYN --real SPEC [--real-test SPEC] [--generator PT] [--out DIR]``:
score any synthetic dataset, ours or made elsewhere, against a real dataset
and write the one-page report.

SYN is a directory a run wrote (manifest.json + images.parquet), a
``folder:<ImageFolder>`` / ``parquet:<path>`` spec, or an ``.npz`` with
``images`` (N,H,W[,C] uint8), ``labels`` and optionally ``class_names``
(without them the real dataset's class names are used when the labels fit);
see ``privimage_core.synthesize.read_dataset``.

Non-private evaluation: it reads the real TEST split and, for the "train on
real" ceiling and the membership audit, the real TRAIN split. folder:/parquet:
sources have no splits of their own, so with those ``--real`` is the training
data and ``--real-test`` must name separate held-out data (refused otherwise:
testing on training images inflates every number and breaks the audit). The
audit needs the generator (``--generator runs/<run>/dp_generator.pt``) and
treats the whole ``--real`` training data as the members: a run trains on a
declared dataset (a subsample is materialised beforehand with ``privimage
data subsample``), so pass that dataset. The ledger's
epsilon and delta come from the synthetic set's manifest when it has one; for
other formats the report says they are unknown.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from privimage_core.config import load_config
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import load_source
from privimage_core.data.specs import is_user_source, parse_spec, same_user_dataset
from privimage_core.errors import DataError
from privimage_core.evaluation.diffusion_mia import image_digests
from privimage_core.evaluation.report import render_html
from privimage_core.evaluation.suite import run_evaluation
from privimage_core.models.release import load_release
from privimage_core.synthesize import read_dataset
from services.process_setup import configure_torch


def _load_generator(path: str, shape, class_names: list[str]):
    """(family, released module) of the release at ``path`` (its weights or
    run directory), rebuilt from its manifest whatever the family."""
    fam, release, man = load_release(path)
    if (man.image_size, man.image_size, man.channels) != tuple(shape):
        raise DataError(f"the release at '{path}' makes {man.image_size}x{man.image_size}x"
                        f"{man.channels} images but the synthetic set is {shape[0]}x{shape[1]}x"
                        f"{shape[2]}; pass the generator that made it")
    if list(man.class_names) != list(class_names):
        raise DataError(f"the release at '{path}' has classes {man.class_names[:5]}... but the "
                        f"synthetic set {class_names[:5]}...; pass the generator that made it")
    return fam, release


def check_real_specs(real: str, real_test: str | None) -> None:
    """Refuse a real test split that is (or may be) the training data."""
    if real_test is None:
        if is_user_source(real):
            raise DataError(f"--real {real} has no test split (folder:/parquet: data is used as "
                            "given, so the test split would be the training images); pass "
                            "held-out images of the same classes with --real-test folder:/path")
    elif same_user_dataset(real_test, real):
        raise DataError(f"--real-test {real_test} names the same files as --real {real}; point "
                        "--real-test at held-out images the generator never saw")


def align_classes(syn: ImageSet, class_names: list[str], real: str) -> ImageSet:
    """The synthetic set with the real dataset's class names and label order.

    Unnamed labels (.npz without class_names, Parquet with bare integer
    labels) take the real names by index when they fit; named classes are
    matched by name (a synthetic set may lack classes, not add them).
    """
    names = list(class_names)
    if list(syn.class_names) == names:
        return syn
    if not syn.meta.get("named", True):
        top = int(syn.labels.max()) if len(syn) else -1
        if top >= len(names):
            raise DataError(f"synthetic labels go up to {top} but {real} has {len(names)} classes; "
                            "evaluate against the matching dataset or save class_names with the "
                            "synthetic images")
        return ImageSet(syn.images, syn.labels, names, syn.name, syn.meta)
    extra = [n for n in syn.class_names if n not in names]
    if extra:
        raise DataError(f"synthetic classes {extra[:5]} are not among {real}'s classes "
                        f"{names[:5]}{'...' if len(names) > 5 else ''}; name the synthetic classes "
                        "(subfolders / class_names) like the real ones or evaluate against the "
                        "matching dataset")
    lookup = np.asarray([names.index(n) for n in syn.class_names], dtype=np.int64)
    return ImageSet(syn.images, lookup[syn.labels], names, syn.name, syn.meta)


def _default_out(synthetic: str, syn: ImageSet, cfg) -> Path:
    """runs/<run>/evaluation for a run's synthetic directory, else
    <name>_evaluation beside the synthetic data (or under run.output_dir)."""
    if syn.meta.get("format") == "privimage":
        return Path(syn.name).resolve().parent / "evaluation"
    _, arg = parse_spec(synthetic) or (None, None)
    if arg is not None:  # folder: / parquet:
        src = Path(arg)
    elif syn.meta.get("format") in ("npz", "parquet"):  # a bare .npz / .parquet path
        src = Path(synthetic)
    else:  # a built-in dataset
        src = None
    if src is None or not src.exists():
        return Path(cfg.run.output_dir) / f"{Path(syn.name).stem or 'synthetic'}_evaluation"
    src = src.resolve()
    return src.parent / f"{src.stem}_evaluation"


def evaluate_dataset(synthetic: str, real: str, config: str | None = None,
                     generator: str | None = None, out_dir: str | None = None,
                     real_test: str | None = None, log=lambda s: None) -> dict:
    """Evaluate ``synthetic`` (see the module docstring for the formats)
    against ``real`` (train split) / ``real_test`` (held-out data; required
    for folder:/parquet: ``real``, else the test split of ``real``)."""
    cfg = load_config(config)
    configure_torch(cfg)  # the threads and denormal flushing the pipeline's actors use
    synthetic, real = str(synthetic).strip(), str(real).strip()
    real_test = str(real_test).strip() if real_test else None
    check_real_specs(real, real_test)  # before reading anything
    syn = read_dataset(synthetic)
    manifest = syn.meta.get("manifest")
    h, w, c = syn.shape
    if h != w:
        raise DataError(f"synthetic images are {h}x{w}; evaluation needs square images: "
                        "centre-crop them (or pass them as folder:/parquet:, which crops)")
    test_spec = real_test or real
    test = load_source(test_spec, split="test", image_size=h, channels=c, resize=True)
    syn = align_classes(syn, test.class_names, test_spec)
    ev = cfg.evaluation
    train = None
    if ev.real_ceiling or (ev.mia and generator):
        train = load_source(real, split="train", image_size=h, channels=c, resize=True)
        if list(train.class_names) != list(test.class_names):
            raise DataError(f"--real-test {test_spec}'s classes {test.class_names[:5]}... differ "
                            f"from --real {real}'s {train.class_names[:5]}...; point --real-test at "
                            "held-out data of the same classes")
        seen = image_digests(train)
        shared = sum(d in seen for d in image_digests(test))
        if shared:
            raise DataError(f"{shared} of the {len(test)} real test images ({test_spec}) are "
                            f"identical to training images of {real}; the test split must be "
                            "held-out data: remove them or pass other held-out data with "
                            "--real-test")
    family, release = (_load_generator(generator, syn.shape, syn.class_names) if generator
                       else (None, None))
    eps = (manifest or {}).get("epsilon")
    delta = (manifest or {}).get("delta")
    res = run_evaluation(ev, syn, test, seed=cfg.run.seed, real_train=train, family=family,
                         release=release, ledger_epsilon=eps, delta=delta,
                         fid_cache_dir=str(Path(cfg.run.output_dir) / "fid_cache"), log=log)
    del train
    out = Path(out_dir) if out_dir else _default_out(synthetic, syn, cfg)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "evaluation_report.html"
    unknown = "unknown (no manifest.json)" if manifest is None else "unknown (not in the manifest)"
    prov = dict(manifest or {})
    prov["epsilon"] = unknown if eps is None else eps
    prov["delta"] = unknown if delta is None else delta
    name = Path(syn.name).name or synthetic
    report.write_text(render_html(res, syn, prov,
                                  title=f"PrivImage evaluation report: {name}"))
    result = {"evaluation": "non-private: uses the real test split (and train split for the "
                            "ceiling / membership audit)",
              "synthetic": synthetic, "synthetic_format": syn.meta.get("format"),
              "real": real, "real_test": test_spec,
              "epsilon": "unknown" if eps is None else eps,
              "delta": "unknown" if delta is None else delta, **res.metrics,
              "audit_message": res.audit_message, "notes": res.notes,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "evaluation_metrics.json").write_text(json.dumps(result, indent=2, default=str))
    result["report"] = str(report)
    return result
