"""``privimage evaluate --synthetic DIR --real SPEC``: score any synthetic
dataset (ours or made elsewhere, as images.parquet + manifest.json) against a
real dataset's TEST split. Non-private evaluation: it reads real data."""
from __future__ import annotations

from pathlib import Path

from privimage_core.config import load_config
from privimage_core.data.sources import load_source
from privimage_core.errors import DataError


def evaluate_dataset(synthetic: str, real: str, config: str | None = None) -> dict:
    from privimage_core.evaluation.downstream import train_eval_classifier
    from privimage_core.synthesize import read_dataset

    cfg = load_config(config)
    if not (Path(synthetic) / "manifest.json").is_file():
        raise DataError(f"'{synthetic}' has no manifest.json; pass the directory a run wrote "
                        "(runs/<run>/synthetic) or one with images.parquet + manifest.json")
    syn = read_dataset(synthetic)
    h, w, c = syn.shape
    test = load_source(real, split="test", image_size=h, channels=c, resize=True)
    if list(test.class_names) != list(syn.class_names):
        raise DataError(f"synthetic classes {syn.class_names[:5]}... differ from {real}'s "
                        f"{test.class_names[:5]}...; evaluate against the matching dataset")
    ev = cfg.evaluation
    out = {"evaluation": "non-private: uses the real test split", "num_synthetic": len(syn),
           f"accuracy_{ev.classifier}": train_eval_classifier(ev.classifier, syn, test,
                                                               seed=cfg.run.seed,
                                                               epochs=ev.classifier_epochs)}
    if ev.fid:
        from privimage_core.evaluation.fid import compute_fid
        n = min(ev.fid_images, len(syn), len(test))
        out["fid"] = compute_fid(syn.images[:n], test.images[:n])
        out["fid_images"] = n
    return out
