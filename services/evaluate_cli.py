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
import sys
import time
from pathlib import Path

import numpy as np
import torch

from privimage_core.config import Config, from_dict, load_config
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import load_source
from privimage_core.data.specs import is_user_source, parse_spec, same_user_dataset
from privimage_core.device import resolve_device
from privimage_core.errors import DataError
from privimage_core.evaluation.canary_audit import CANARY_FILE, CanaryAuditInput, CanarySet
from privimage_core.evaluation.diffusion_mia import image_digests
from privimage_core.evaluation.protocol import comparability, fidelity_line
from privimage_core.evaluation.report import render_html
from privimage_core.evaluation.suite import run_evaluation
from privimage_core.models.release import load_release, read_manifest
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.synthesize import read_dataset
from services.process_setup import configure_torch
from services.progress import LineDrawer
from services.run_store import load_state
from services.stages.training import PRETRAINED_FILE, RELEASE_FILE

METRICS_FILE = "evaluation_metrics.json"

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


def _canary_input(canaries: str | None, reference: str | None, generator: str | None,
                  family, release) -> CanaryAuditInput | None:
    """The canary audit's input from a run's files: its canaries and bits,
    its release and (optional) its public pre-trained weights."""
    if canaries is None:
        return None
    if release is None:
        raise DataError("the canary audit needs the run's generator; pass --generator "
                        "runs/<run>/dp_generator.pt (or --run runs/<run>)")
    ref = None
    if reference is not None:
        man = read_manifest(generator)
        model = man.build()
        model.load_state_dict(torch.load(reference, map_location="cpu", weights_only=True))
        ref = family.release_module(model).eval()
    return CanaryAuditInput(CanarySet.load(canaries), family, release, ref)


def verdict_words(res) -> dict:
    """Every verdict of the evaluation, in words."""
    out = {k: v for k, v in (res.memorisation.get("verdicts") or {}).items()}
    if res.canary:
        out["canary_audit"] = res.canary["verdict"]
    return out


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


def evaluate_dataset(synthetic: str, real: str, config: str | Config | None = None,
                     generator: str | None = None, out_dir: str | None = None,
                     real_test: str | None = None, log=lambda s: None,
                     canaries: str | None = None, reference: str | None = None,
                     audit_epsilon: float | None = None, progress=None) -> dict:
    """Evaluate ``synthetic`` (see the module docstring for the formats)
    against ``real`` (train split) / ``real_test`` (held-out data; required
    for folder:/parquet: ``real``, else the test split of ``real``).
    ``config``: a file or a Config. ``canaries`` (a run's audit_canaries.npz,
    with ``generator``) adds the canary audit, testing ``audit_epsilon``;
    ``reference`` (the run's public pre-trained weights) calibrates it."""
    cfg = config if isinstance(config, Config) else load_config(config)
    configure_torch(cfg)  # the threads and denormal flushing the pipeline's actors use
    device = resolve_device(cfg.ray.use_gpu)  # Inception and CNNs: before any data is read
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
    canary = _canary_input(canaries, reference, generator, family, release)
    eps = (manifest or {}).get("epsilon")
    delta = (manifest or {}).get("delta")
    res = run_evaluation(ev, syn, test, seed=cfg.run.seed, real_train=train, family=family,
                         release=release, ledger_epsilon=eps, delta=delta,
                         audit_epsilon=audit_epsilon, canary=canary,
                         fid_cache_dir=str(Path(cfg.run.output_dir) / "fid_cache"), log=log,
                         progress=progress, device=str(device))
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
              "verdicts": verdict_words(res),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / METRICS_FILE).write_text(json.dumps(result, indent=2, default=str))
    result["report"] = str(report)
    return result


def _run_inputs(a, overrides: dict) -> dict:
    """evaluate_dataset's arguments for ``--run RUN_DIR``: the run's synthetic
    set, real data, release, canaries (with the public reference weights)
    and config, each overridden by what the command line gives."""
    run = Path(a.run).resolve()
    state = load_state(run)
    cfg = (load_config(a.config, overrides) if a.config
           else from_dict(state["config"]).with_overrides(overrides))
    d = cfg.data
    generator = a.generator or (str(run / RELEASE_FILE) if (run / RELEASE_FILE).is_file()
                                else None)
    canaries = str(run / CANARY_FILE) if generator and (run / CANARY_FILE).is_file() else None
    ledger = state.get("ledger")
    return {"synthetic": a.synthetic or str(run / "synthetic"), "real": a.real or d.sensitive,
            "real_test": a.real_test or (d.sensitive_test if a.real is None else None),
            "config": cfg, "generator": generator, "out_dir": a.out or str(run / "evaluation"),
            "canaries": canaries,
            "reference": str(run / PRETRAINED_FILE) if canaries and
            (run / PRETRAINED_FILE).is_file() else None,
            "audit_epsilon": PrivacyLedger.from_state_dict(ledger).epsilon_of("dp_sgd_")
            if ledger else None}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary_lines(res: dict) -> list[str]:
    """The evaluation in a few readable lines (every figure is in the JSON)."""
    kinds = [k for k in ("cnn", "mlp", "lr") if f"accuracy_{k}" in res]
    out = ["evaluation (non-private: it reads the real test split, and the training data "
           "for the ceiling and the diagnostics)"]
    if kinds:
        ceil = [f"{k.upper()} {_pct(res.get(f'ceiling_accuracy_{k}'))}" for k in kinds
                if f"ceiling_accuracy_{k}" in res]
        out.append("  utility      : " + " / ".join(
            f"{k.upper()} {_pct(res[f'accuracy_{k}'])}" for k in kinds) + " on the real test split"
            + (f" (train-on-real ceiling: {', '.join(ceil)})" if ceil else ""))
    fidelity = fidelity_line(res)
    if fidelity:
        out += [f"  fidelity     : {fidelity}", f"                 {comparability(res)}"]
    if "detector_accuracy" in res:
        out.append(f"  detector     : tells real from synthetic at "
                   f"{_pct(res['detector_accuracy'])} (50% = indistinguishable)")
    if res.get("audit_message"):
        out.append(f"  canary audit : {res['audit_message']}")
    if "mia_auc" in res:
        out.append(f"  membership   : diagnostic AUC {res['mia_auc']:.3f} (0.5 = chance)")
    v = res.get("verdicts") or {}
    memo = [f"{k.replace('_', ' ')} {w}" for k, w in v.items() if k != "canary_audit"]
    if memo:
        out.append("  memorisation : " + ", ".join(memo))
    return out


def evaluate_command(a, overrides: dict) -> int:
    """``privimage evaluate``: one line of progress on the long passes, then
    the readable summary (``--json``: every metric) and where the report is.
    Exit status 3 when the canary audit finds a violation."""
    if a.run:
        kw = _run_inputs(a, overrides)
    else:
        if not a.synthetic or not a.real:
            raise DataError("evaluate needs --synthetic SYN and --real SPEC, or --run RUN_DIR; "
                            "see privimage evaluate --help")
        kw = {"synthetic": a.synthetic, "real": a.real, "real_test": a.real_test,
              "config": load_config(a.config, overrides), "generator": a.generator,
              "out_dir": a.out}
    drawer = LineDrawer("evaluation: Inception features", lambda s: print(s, file=sys.stderr),
                        unit="images")
    try:
        res = evaluate_dataset(**kw, log=lambda s: print(s, file=sys.stderr), progress=drawer)
    finally:
        drawer.close()
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print("\n".join(summary_lines(res)))
    print(f"report : {res['report']}\nmetrics: {Path(res['report']).parent / METRICS_FILE}")
    return 3 if res.get("audit_ok") == 0 else 0
