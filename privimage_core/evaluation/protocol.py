"""The comparable fidelity protocol and how a figure says whether it meets
it. FID is biased upward at small sample sizes, by an amount that depends on
the model, so an FID on fewer images than published ones use compares with
nothing published; KID is unbiased at any size, with a standard deviation
that shrinks as the images grow (DPImageBench's protocol and the field's
figures: FID on at least 5,000 images, KID beside it)."""
from __future__ import annotations

# Images per side for an FID that compares with published ones.
PROTOCOL_IMAGES = 5000
# How to get the comparable figures for a finished run.
PROTOCOL_COMMAND = ("privimage evaluate --run <run dir> --config configs/eval-fid5k.yaml "
                    "(or run with configs/benchmark.yaml)")


def meets_protocol(m: dict) -> bool:
    return "fid" in m and int(m.get("fid_images", 0)) >= PROTOCOL_IMAGES


def fidelity_line(m: dict) -> str | None:
    """One line of FID / KID / precision-recall from an evaluation's metrics,
    saying what it compares with; None when no fidelity was computed."""
    if m.get("fid") is None:
        return None
    n = int(m.get("fid_images", 0))
    kid = f"KID {m['kid']:.4f} ± {m['kid_std']:.4f}" if "kid" in m else None
    pr = (f", precision {m['precision']:.3f}, recall {m['recall']:.3f}"
          if "precision" in m else "")
    if meets_protocol(m):
        return (f"FID {m['fid']:.2f}" + (f", {kid}" if kid else "")
                + f" ({n:,} vs {n:,} images: the protocol's size, comparable){pr}")
    return ((f"{kid}, " if kid else "") + f"FID {m['fid']:.2f} on {n:,} vs {n:,} images{pr}"
            f" (below the protocol's {PROTOCOL_IMAGES:,} per side: the FID compares only with "
            f"FIDs at {n:,}, the KID is unbiased but noisier; comparable figures: "
            f"{PROTOCOL_COMMAND})")
