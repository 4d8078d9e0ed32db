"""Fine-tuning settings vs downstream utility, in-process (no Ray), on a
VALIDATION split: train images 55,000-59,999 of the sensitive dataset
(``--dataset``: mnist or fashion_mnist) are held out, the first 55,000 are
the sensitive set. The real test split is never read, so the defaults chosen
from this table are not selected on it (selecting on the test split is
leakage: DPImageBench holds out a validation set the same way).

Starts from a pre-trained (public-only) checkpoint, e.g. the cache a
quickstart run leaves in <output_dir>/cache/pretrain-*.pt, charges the
semantic query's cost as the pipeline would, then DP-SGD fine-tunes,
samples and trains the CNN on the synthetic set; with ``--fid-images N``
also FID and KID of N synthetic images against N of the 5,000 validation
images (5,000 is the protocol's size; the validation side's Inception
features are cached in ``--fid-cache``). One JSON line per run:

  python benchmarks/quality_explore.py --init runs/cache/pretrain-X.pt \
      --steps 60 --batch 512 --lr 1e-3 --num-images 3000 >> results.jsonl
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--dataset", default="mnist",
                    help="mnist, fashion_mnist, or folder:DIR (an ImageFolder, e.g. the "
                         "coloured digits of scripts/make_coloured_digits.py)")
    ap.add_argument("--size", type=int, default=28, help="image size (a folder's is resized)")
    ap.add_argument("--channels", type=int, default=1, choices=(1, 3))
    ap.add_argument("--val-per-class", type=int, default=50,
                    help="folder datasets: the last N images of each class are the "
                         "validation split, the rest the sensitive set")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--query-sigma", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--physical", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=1, help="noise multiplicity")
    ap.add_argument("--p-mean", type=float, default=None,
                    help="fine-tuning's log-normal noise-level mean (EDM's -1.2 if unset)")
    ap.add_argument("--grad-mode", default=None)
    ap.add_argument("--num-images", default="3000",
                    help="comma-separated: every value is sampled from the same DP model")
    ap.add_argument("--sampler-steps", default="18", help="comma-separated")
    ap.add_argument("--solver", default="euler", help="comma-separated: euler, heun")
    ap.add_argument("--guidance", default="0", help="comma-separated guidance scales")
    ap.add_argument("--label-dropout", type=float, default=0.0,
                    help="as the checkpoint was pre-trained (enables guidance)")
    ap.add_argument("--cls-epochs", default="8", help="comma-separated CNN epochs")
    ap.add_argument("--save-release", default=None,
                    help="write the DP model's EMA weights here (for --release runs)")
    ap.add_argument("--release", default=None,
                    help="skip DP fine-tuning: sample from these saved weights (a model "
                         "fine-tuned on the same 55,000 images, e.g. by --save-release)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-params", default=None,
                    help="regex: fine-tune only the parameters whose names match it "
                         "(re.search), the rest frozen at the pre-trained weights")
    ap.add_argument("--fid-images", type=int, default=0,
                    help="FID/KID on this many synthetic vs validation images (0: off; "
                         "5000 for the protocol's size)")
    ap.add_argument("--fid-cache", default="runs/fid_cache",
                    help="where the validation side's Inception features are cached")
    ap.add_argument("--grid", default=None,
                    help="write a sample grid (10 per class) of each setting's images to "
                         "this PNG path (the setting's values appended to the name)")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)

    from privimage_core.data.sources import load_source
    from privimage_core.models.ema import EMA
    from privimage_core.dp_sgd.finetune import dp_finetune, make_private, restrict_trainable
    from privimage_core.privacy.plan import plan_noise
    from privimage_core.evaluation.downstream import accuracy, train_classifier
    from privimage_core.models import get_family
    from privimage_core.privacy.ledger import PrivacyLedger
    from privimage_core.selection.distribution import QUERY_MECHANISM
    from privimage_core.synthesize import generate

    t0 = time.time()
    full = load_source(a.dataset, split="train", image_size=a.size, channels=a.channels)
    sens, val = validation_split(full, a.dataset, a.val_per_class)
    fam = get_family("diffusion")
    shape = (a.size, a.channels, full.num_classes)
    model = fam.make(a.preset, {}, *shape, label_dropout=a.label_dropout)
    model.load_state_dict(torch.load(a.init, map_location="cpu"))
    ledger = PrivacyLedger(a.epsilon, 1e-5)
    ledger.record_gaussian(QUERY_MECHANISM, a.query_sigma)
    sigma, q, total = plan_noise(ledger, len(sens), a.batch, a.steps)
    t_ft = 0.0
    release = fam.make(a.preset, {}, *shape, label_dropout=a.label_dropout)
    if a.release:
        release.load_state_dict(torch.load(a.release, map_location="cpu"))
    else:
        x, y = sens.to_tensor(), torch.from_numpy(sens.labels).long()
        if a.train_params:  # the pipeline's finetune.trainable
            print(json.dumps({"trainable": restrict_trainable(model, a.train_params)}),
                  flush=True)
        ema = EMA(model, decay=a.ema)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=a.lr)
        mp = {"grad_sample_mode": a.grad_mode} if a.grad_mode else {"grad_sample_mode": "vmap"}
        dp = make_private(model, opt, x, y, batch_size=a.batch, noise_multiplier=sigma,
                          max_grad_norm=a.clip, ledger=ledger, **mp)
        kw = {}
        params = inspect.signature(dp_finetune).parameters
        if "noise_multiplicity" in params:
            kw["noise_multiplicity"] = a.k
        if "objective" in params:
            kw["objective"] = fam.dp_objective(model)
            if a.p_mean is not None:
                kw["objective"].p_mean = a.p_mean
        t1 = time.time()
        dp_finetune(dp, ema, model, total, a.physical, **kw)
        t_ft = time.time() - t1
        release.load_state_dict(ema.shadow)
        if a.save_release:
            torch.save(ema.shadow, a.save_release)
    release.eval()
    grid = [(w, n, st, so) for w in (float(v) for v in a.guidance.split(","))
            for n in (int(v) for v in a.num_images.split(","))
            for st in (int(v) for v in a.sampler_steps.split(","))
            for so in a.solver.split(",")]
    for w, n, st, so in grid:
        t2 = time.time()
        syn = generate(fam, release, n, full.class_names, st, so, seed=0, batch_size=500,
                       guidance=w)
        t_s = time.time() - t2
        fidelity = _fidelity(syn, val, a.fid_images, a.fid_cache) if a.fid_images else {}
        if a.grid:
            from services.stages.release import sample_grid_png  # lazy: only for --grid
            g = Path(a.grid)
            sample_grid_png(syn, g.with_name(f"{g.stem}-w{w}-n{n}-{so}{st}{g.suffix}"))
        for ep in (int(v) for v in a.cls_epochs.split(",")):
            clf = train_classifier("cnn", syn, seed=0, epochs=ep)
            acc = accuracy(clf.predict_images(val), val.labels)
            print(json.dumps({
                "val_accuracy_cnn": round(acc, 4), "epsilon": round(ledger.epsilon(), 4),
                "sigma": round(sigma, 4), "q": round(q, 6), "steps": total,
                "finetune_s": round(t_ft, 1), "sample_s": round(t_s, 1),
                "total_s": round(time.time() - t0, 1),
                **{k: v for k, v in vars(a).items() if k not in ("init",)},
                "guidance": w, "num_images": n, "sampler_steps": st, "solver": so,
                "cls_epochs": ep, **fidelity}), flush=True)


def validation_split(full, dataset: str, val_per_class: int):
    """(sensitive, validation): MNIST-family train images 55,000-59,999 are
    the validation split; a folder holds out the last ``val_per_class`` of
    each class. The test split is never read."""
    if not dataset.startswith("folder:"):
        return full.subset(np.arange(55000)), full.subset(np.arange(55000, 60000))
    val = np.concatenate([np.flatnonzero(full.labels == c)[-val_per_class:]
                          for c in range(full.num_classes)])
    keep = np.setdiff1d(np.arange(len(full)), val)
    return full.subset(keep), full.subset(np.sort(val))


def _fidelity(syn, val, n: int, cache_dir: str) -> dict:
    """FID and KID (mean, std) of ``n`` synthetic images (a seeded random
    subset: the synthetic set is ordered by class) against the first ``n``
    validation images: no test image is read."""
    from privimage_core.evaluation import fid as fidlib
    from privimage_core.evaluation.kid import kernel_inception_distance

    n = min(n, len(syn), len(val))
    t = time.time()
    model = fidlib.load_fid_inception(None)
    f_real, _, _ = fidlib.FIDCache(cache_dir).features(val.images[:n], model)
    pick = np.sort(np.random.default_rng(0).choice(len(syn), n, replace=False))
    f_syn = fidlib.extract_features(syn.images[pick], model)
    kid, kid_std = kernel_inception_distance(f_syn, f_real, seed=0)
    return {"val_fid": round(fidlib.frechet_distance_from_features(f_syn, f_real), 2),
            "val_kid": round(kid, 4), "val_kid_std": round(kid_std, 4), "fid_images": n,
            "fid_s": round(time.time() - t, 1)}


if __name__ == "__main__":
    main()
