"""Label public images that have no labels by a pre-trained classifier's
predictions, writing them as `shards:` data (docs/data.md, "Public data
without labels"):

    .venv/bin/python scripts/label_public_shards.py --src DIR --out DIR \\
        --weights FILE --architecture resnet18 --classes imagenet \\
        [--image-size 32 --channels 3 --input-size 224]

--src: Parquet shards with an `image` column and no `label`, or a tree of
image files. The images are read at the run's --image-size / --channels (as
the pipeline will read them) and shown to the classifier at --input-size.
Only the classes it predicted are kept; the labels are the classifier's
semantics, and each shard's metadata names the classifier. Public data
only: never point it at the sensitive data. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from privimage_core.config.sections import QUERY_ARCHITECTURES  # noqa: E402 (after sys.path)
from privimage_core.data.label_shards import label_shards  # noqa: E402
from privimage_core.selection.pretrained import classifier_predictor  # noqa: E402


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", required=True, help="a local state dict; nothing is downloaded")
    ap.add_argument("--architecture", required=True,
                    choices=[a for a in QUERY_ARCHITECTURES if a != "small_resnet"])
    ap.add_argument("--classes", required=True,
                    help="imagenet, or a text file naming output i on line i")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--input-size", type=int, default=224)
    a = ap.parse_args(argv)
    predict, names = classifier_predictor(a.weights, a.architecture, a.classes, a.input_size)
    note = (f"predicted by {a.architecture} {Path(a.weights).name} (sha256 "
            f"{_sha256(a.weights)[:16]}), classes {a.classes}, input {a.input_size}")
    info = label_shards(a.src, a.out, predict, names, note, a.image_size, a.channels)
    print(json.dumps({**info, "labels": note}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
