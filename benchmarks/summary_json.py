"""benchmarks/results/summary.json: the headline figures, machine-readable
rewritten by the benchmark scripts that measure them.
Every update stamps date, commit and machine on the whole file (the last
write) and on each key it writes (``provenance``: a figure keeps the machine
that measured it when another machine writes other keys later); a key no
script has measured yet stays null rather than being filled by hand."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from machine import cpu_name, git_commit

PATH = Path(__file__).parent / "results" / "summary.json"
KEYS = ("dp_step_ratio_tiny", "dp_step_ratio_small",
        # the K = 4 noise-multiplicity step against a non-private step on the same rows
        "dp_step_ratio_tiny_k4", "dp_step_ratio_small_k4", "quickstart_driver_seconds",
        "quickstart_cnn_accuracy", "quickstart_fid_5k",
        # the quickstart's own KID [mean, std] and its images per side
        "quickstart_kid", "quickstart_kid_images", "fmnist_cnn_accuracy",
        "folder400_relative_accuracy", "quality_cpu_cnn_accuracy", "quality_cpu_driver_seconds",
        "quality_cpu_fid_5k",
        # the quickstart's defaults at a target epsilon of 1 (one entry per run)
        "eps1_cnn_accuracy",
        # the committed methods x budgets x seeds table (benchmarks/merge_compare.py)
        "compare_table",
        # bench_public_scale.py: the public side on the full 1,281,167 x 1,000 pool,
        # and the 1-minute load average at its start and end
        "public_scale_images", "public_scale_load_average", "public_index_seconds",
        "public_index_images_per_second",
        "public_index_peak_rss_gb", "public_max_process_peak_rss_gb", "public_selection_seconds",
        "public_selected_read_seconds", "public_stream_images_per_second_1_worker",
        "public_stream_images_per_second_2_workers",
        "public_query_train_images_per_second_1_worker",
        "public_query_train_images_per_second_2_workers",
        # benchmarks/bench_gpu.py on CUDA: the default preset's DP step (ghost) / non-private
        "gpu_dp_step_ratio",
        # coloured digits against the grayscale public pool (benchmarks/rgb_folder.py)
        "rgb_folder_relative_accuracy", "rgb_folder_significant_classes")


def update(values: dict, append: tuple[str, ...] = (), new_series: bool = False,
           machine: str | None = None) -> dict:
    """Set ``values`` (keys of KEYS); keys in ``append`` are lists that
    gain the value (one entry per run) instead of being replaced, unless
    ``new_series`` starts them anew (runs of earlier defaults are dropped).
    ``machine`` names what measured them (default: this host's CPU; a GPU
    benchmark names its card)."""
    unknown = set(values) - set(KEYS)
    if unknown:
        raise KeyError(f"not a summary key: {sorted(unknown)}; known: {', '.join(KEYS)}")
    cur = json.loads(PATH.read_text()) if PATH.is_file() else {}
    stamp = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
             "machine": machine or cpu_name()}
    out = dict(stamp)
    out.update({k: cur.get(k) for k in KEYS})
    provenance = dict(cur.get("provenance") or {})
    for k, v in values.items():
        out[k] = (list([] if new_series else out[k] or []) + [v]) if k in append else v
        provenance[k] = stamp
    out["provenance"] = {k: provenance[k] for k in KEYS if k in provenance}
    PATH.write_text(json.dumps(out, indent=2) + "\n")
    return out
