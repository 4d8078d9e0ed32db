"""Public pre-training settings, in-process (no Ray, no sensitive data):
re-runs step 4 of a finished run on the public images its DP selection
chose, with other settings, and saves the EMA weights at chosen steps, so
that ``benchmarks/quality_explore.py --init/--release`` can score each one
on a validation split. Public data only: it costs no privacy budget (the
selection it reads is the run's DP output).

  python benchmarks/pretrain_explore.py --run runs/<run> --save-at 900,1800 \
      --preset tiny --out /tmp/pre            # writes /tmp/pre/pre-<steps>.pt
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True,
                    help="a finished run's directory (its config and DP selection)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save-at", default="900", help="comma-separated steps to save at")
    ap.add_argument("--preset", default=None, help="default: the run's generator preset")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--recolour", choices=("on", "off"), default=None,
                    help="default: as the run resolved it")
    ap.add_argument("--label-dropout", type=float, default=None,
                    help="classifier-free guidance's null-label share (default: the run's)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from these weights (a pre-trained checkpoint of the same "
                         "preset and classes) instead of a fresh model; steps count from 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from privimage_core.data.sources import build_public_pool
    from privimage_core.models import get_family
    from privimage_core.models.ema import EMA
    from privimage_core.pretrain import pretrain
    from privimage_core.selection.distribution import relabel_selection

    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    state = json.loads((a.run / "pipeline_state.json").read_text())["stages"]
    d, p = cfg["data"], cfg["pretrain"]
    selection = {int(k): v for k, v in state["selection"]["selection"].items()}
    recolour = (a.recolour == "on") if a.recolour else state["pretrain"].get("recolour") is True
    pool = build_public_pool(d["public"], d["image_size"], d["channels"],
                             d.get("public_max_per_class"), cfg["run"]["seed"],
                             glyph_opts={"max_fonts": d.get("glyph_max_fonts"),
                                         "per_font": d.get("glyph_copies_per_font", 1)})
    # the pipeline's relabelling (services/actors.py PublicSelector.selected_images)
    rows, labels = relabel_selection(pool.labels, selection)
    x, y = pool.subset(rows).to_tensor(), torch.from_numpy(labels)

    fam = get_family("diffusion")
    preset = a.preset or cfg["generator"]["preset"]
    dropout = cfg["generator"].get("label_dropout", 0.0) if a.label_dropout is None \
        else a.label_dropout
    model = fam.make(preset, {}, d["image_size"], d["channels"], len(selection),
                     label_dropout=dropout)
    if a.init:
        model.load_state_dict(torch.load(a.init, map_location="cpu"))
    trainer = fam.public_trainer(model, a.lr or p["lr"])
    ema = EMA(model, decay=p["ema_decay"])
    a.out.mkdir(parents=True, exist_ok=True)
    step, t0 = 0, time.time()
    for stop in sorted(int(s) for s in a.save_at.split(",")):
        step = pretrain(trainer, lambda: ema.update(model), x, y, stop, a.batch or p["batch_size"],
                        seed=a.seed, start_step=step, recolour=recolour)
        path = a.out / f"pre-{stop}.pt"
        torch.save(ema.shadow, path)
        print(json.dumps({"steps": stop, "path": str(path), "preset": preset,
                          "images": len(x), "recolour": recolour, "lr": a.lr or p["lr"],
                          "label_dropout": dropout, "init": str(a.init) if a.init else None,
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
