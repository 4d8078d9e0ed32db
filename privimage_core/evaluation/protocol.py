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
    """FID / KID / precision-recall from an evaluation's metrics, KID first
    when below the protocol's size; None when no fidelity was computed."""
    if m.get("fid") is None:
        return None
    n = int(m.get("fid_images", 0))
    fid = f"FID {m['fid']:.2f}"
    kid = f"KID {m['kid']:.4f} ± {m['kid_std']:.4f}" if "kid" in m else None
    first = [fid, kid] if meets_protocol(m) else [kid, fid]
    pr = (f", precision {m['precision']:.3f}, recall {m['recall']:.3f}"
          if "precision" in m else "")
    return ", ".join(x for x in first if x) + f" on {n:,} vs {n:,} images{pr}"


def comparability(m: dict) -> str | None:
    """What a fidelity line compares with; None when no fidelity was computed."""
    if m.get("fid") is None:
        return None
    if meets_protocol(m):
        return (f"the protocol's size ({PROTOCOL_IMAGES:,} per side): comparable with "
                "published FIDs")
    n = int(m.get("fid_images", 0))
    return (f"below the protocol's {PROTOCOL_IMAGES:,} per side: the FID compares only with "
            f"FIDs at {n:,}, the KID is unbiased but noisier; comparable figures: "
            f"{PROTOCOL_COMMAND}")
