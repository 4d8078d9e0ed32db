"""The one-page evaluation report: self-contained HTML with embedded PNGs.

What it shows: a banner saying the evaluation on real data is non-private;
the ledger's (epsilon, delta) beside the membership audit's empirical lower
bound (and, loudly, a failed audit); a sample grid per class of SYNTHETIC
images; tables of fidelity, utility and privacy figures; the attack's ROC
curve; the wall time of every metric.

Real images never enter it: ``render_html`` receives the synthetic set and
numbers only (``EvaluationResult`` holds no image). The sample grids are
exact pixels (integer nearest-neighbour upscaling), so a test can look for
any image in them. One exception, off by default: with
``evaluation.memorisation_show_pairs`` the memorisation section shows the
closest synthetic / TRAINING pairs, and the page then says so at the top.
"""
from __future__ import annotations

import base64
import html
import io
import time

import numpy as np
from PIL import Image

from privimage_core.data.imageset import ImageSet
from privimage_core.evaluation.context import NON_PRIVATE_NOTE, EvaluationResult
from privimage_core.evaluation.memorisation import CHECKS


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def class_strips(ds: ImageSet, per_class: int = 10, scale: int = 2) -> list[tuple[str, bytes]]:
    """(class name, PNG of up to ``per_class`` images of that class side by
    side, each upscaled ``scale`` x by pixel repetition) per class."""
    h, w, c = ds.shape
    out = []
    for k, name in enumerate(ds.class_names):
        idx = np.nonzero(ds.labels == k)[0][:per_class]
        row = np.zeros((h, w * per_class, c), np.uint8)
        for j, i in enumerate(idx):
            row[:, j * w:(j + 1) * w] = ds.images[i]
        row = row.repeat(scale, axis=0).repeat(scale, axis=1)
        out.append((str(name), _png(row)))
    return out


def _fig_png(fig) -> bytes:
    # lazy: matplotlib only for the report's figures (Agg chosen in _plt first)
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _plt():
    # lazy: matplotlib only for the report's figures; Agg before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above
    return plt


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auc: float | None = None) -> bytes:
    """The attack's ROC, linear and log-log (low-FPR regime, Carlini et al. 2022)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    lab = f"loss-threshold attack (AUC {auc:.3f})" if auc is not None else "attack"
    for ax, log in zip(axes, (False, True)):
        ax.plot(fpr, tpr, lw=1.5, label=lab)
        lo = 1e-3 if log else 0.0
        ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC (log-log)" if log else "ROC")
    axes[0].legend(loc="lower right", fontsize=7)
    return _fig_png(fig)


def privacy_utility_png(m: dict) -> bytes | None:
    """Left: ledger epsilon vs the audit's empirical bounds. Right: accuracy
    of each classifier trained on synthetic vs on real (ceiling)."""
    eps_bars = [(k, m[key]) for k, key in (("ledger ε", "ledger_epsilon"),
                                           ("canary audit ε lower bound", "canary_eps_lb"),
                                           ("canary audit: most it can show", "canary_eps_max"),
                                           ("diagnostic ε lower bound", "mia_eps_lb"),
                                           ("diagnostic ε point est.", "mia_eps_point"),
                                           ("diagnostic: max. detectable", "mia_eps_lb_max"))
                if m.get(key) is not None]
    kinds = [k for k in ("lr", "mlp", "cnn") if f"accuracy_{k}" in m]
    if len(eps_bars) < 2:  # the ledger alone: nothing to compare it with
        eps_bars = []
    if not eps_bars and not kinds:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ax = axes[0]
    if eps_bars:
        colors = ["tab:blue", "tab:purple", "tab:pink", "tab:red", "tab:orange",
                  "tab:gray"][:len(eps_bars)]
        ax.barh([b[0] for b in eps_bars], [b[1] for b in eps_bars], color=colors)
        for i, (_, v) in enumerate(eps_bars):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("epsilon")
        ax.set_title("privacy: proven vs empirical")
    else:
        ax.axis("off")
    ax = axes[1]
    if kinds:
        x = np.arange(len(kinds))
        ax.bar(x - 0.2, [m[f"accuracy_{k}"] for k in kinds], 0.4, label="trained on synthetic")
        if any(f"ceiling_accuracy_{k}" in m for k in kinds):
            ax.bar(x + 0.2, [m.get(f"ceiling_accuracy_{k}", 0.0) for k in kinds], 0.4,
                   label="trained on real (non-private ceiling)", color="tab:gray")
        ax.set_xticks(x, [k.upper() for k in kinds])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy on real test split")
        ax.set_title("utility")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.axis("off")
    return _fig_png(fig)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">')


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and np.isfinite(v)
                                             and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"  # counts: 60,000, not 6e+04
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return html.escape(str(v))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


# Rows shown as percentages (accuracies), the way README and the log give them.
_PERCENT_KEYS = {f"{p}accuracy_{k}" for p in ("", "ceiling_") for k in ("lr", "mlp", "cnn")} | {
    "utility_real_to_real", "utility_synthetic_to_real", "utility_real_to_synthetic",
    "utility_synthetic_to_synthetic", "utility_accuracy_loss", "detector_accuracy"}


_ROWS = {
    "Fidelity (vs real test split)": [
        ("fid", "FID (FID-InceptionV3 pool3; biased upward at small N)"),
        ("fid_images", "images per side"),
        ("kid", "KID (unbiased MMD^2, cubic kernel)"), ("kid_std", "KID std over subsets"),
        ("precision", "precision (k-NN manifold, same features)"),
        ("recall", "recall"),
        ("detector_accuracy", "detector: accuracy telling real from synthetic (50% = "
                              "indistinguishable)"),
        ("detector_privacy_loss", "detector advantage (accuracy - 0.5) / 0.5"),
    ],
    "Utility (trained on synthetic, tested on the real test split)": [
        ("accuracy_lr", "logistic regression"), ("accuracy_mlp", "MLP"), ("accuracy_cnn", "CNN"),
        ("ceiling_accuracy_lr", "ceiling: LR trained on real [non-private]"),
        ("ceiling_accuracy_mlp", "ceiling: MLP trained on real [non-private]"),
        ("ceiling_accuracy_cnn", "ceiling: CNN trained on real [non-private]"),
        ("ceiling_images", "real training images for the ceiling"),
    ],
    "Utility matrix (headline classifier; train -> test)": [
        ("utility_real_to_real", "real -> real (p1) [non-private]"),
        ("utility_synthetic_to_real", "synthetic -> real (p2)"),
        ("utility_real_to_synthetic", "real -> synthetic (p3) [non-private]"),
        ("utility_synthetic_to_synthetic", "synthetic -> synthetic (p4)"),
        ("utility_accuracy_loss", "accuracy loss p1 - p2"),
        ("utility_holdout", "synthetic images held out as test set"),
    ],
    "Privacy": [
        ("ledger_epsilon", "ledger epsilon (proven, accountant)"), ("ledger_delta", "ledger delta"),
        ("mia_eps_lb", "diagnostic, train-vs-test attack (not an audit): epsilon lower bound"),
        ("mia_eps_point", "diagnostic: point estimate (no confidence)"),
        ("mia_eps_lb_max", "largest bound this diagnostic can show (perfect attack, this n)"),
        ("mia_auc", "diagnostic: AUC"),
        ("mia_tpr_at_1pct_fpr", "TPR at 1% FPR"), ("mia_tpr_at_0_1pct_fpr", "TPR at 0.1% FPR"),
        ("mia_members", "members (sensitive training images)"),
        ("mia_nonmembers", "non-members (held-out real test images)"),
    ],
}


# ------------------------------------------------------------ canary audit
_ROWS["Privacy audit: canaries, one run (Steinke et al. 2023) [non-private, operator only]"] = [
    ("canary_eps_lb", "canary audit: epsilon lower bound (confidence 1 - beta)"),
    ("canary_eps_max", "most it could show with these guesses (all correct)"),
    ("canary_eps_max_all", "most it could show with these canaries (all guessed, all correct)"),
    ("canary_canaries", "canaries (public images; half choose the guesses, half give the bound)"),
    ("canary_beta", "beta (1 - confidence)"),
]


def _audit_banner(result: EvaluationResult) -> str:
    """The privacy check's verdict: red for a violation, green for
    consistent, neutral for inconclusive (never 'passed')."""
    if not result.audit_message:
        return ""
    cls = {False: "fail", True: "ok"}.get(result.audit_ok, "banner")
    label = "" if result.audit_ok is False else "Canary audit [non-private, operator only]: "
    return f"<div class={cls} id=audit>{html.escape(label + result.audit_message)}</div>"


def _canary_line(m: dict) -> str:
    if "canary_eps_lb" not in m:
        return ""
    return (f"; canary audit lower bound = {_fmt(m['canary_eps_lb'])} (at most "
            f"{_fmt(m.get('canary_eps_max'))} could be shown with "
            f"{_fmt(int(m.get('canary_canaries', 0)))} canaries)")
# ------------------------------------------------------------ end canary audit


def _table(title: str, rows, m: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(label)}</td><td class=num>"
                   f"{_pct(m[key]) if key in _PERCENT_KEYS else _fmt(m[key])}</td></tr>"
                   for key, label in rows if key in m)
    if not body:
        return ""
    return f"<h3>{html.escape(title)}</h3><table>{body}</table>"


_MEMO_ROWS = [(f"memorisation_dcr_{sp}_{k}", f"DCR {sp} space: {lab}")
              for sp in ("pixel", "feature") for k, lab in (
                  ("share", "share of synthetic images nearer a training image (chance 0.5)"),
                  ("p_value", "permutation p-value (one-sided, vs 0.5)"),
                  ("binom_p_value", "binomial p-value (assumes independent images)"),
                  ("min_detectable_share", "share detectable with 80% power"),
                  ("median_ratio", "median DCR(train) / DCR(held-out)"),
                  ("share_raw", "raw share (before class weighting)"),
                  ("share_raw_expected", "raw share expected without memorisation"),
                  ("images", "synthetic images"), ("references_train", "training images"),
                  ("references_heldout", "held-out images"))] + [
    ("memorisation_recon_auc", "reconstruction: AUC, members reconstructed better (chance 0.5)"),
    ("memorisation_recon_p_value", "reconstruction: Mann-Whitney p-value (Bonferroni)"),
    ("memorisation_recon_sigma", "reconstruction: strongest noise level (sigma)"),
    ("memorisation_recon_median_ratio", "reconstruction: median error members / held-out"),
    ("memorisation_recon_min_detectable_auc", "reconstruction: AUC detectable with 80% power"),
    ("memorisation_recon_members", "reconstruction: members = held-out images")]


def memorisation_section(result: EvaluationResult) -> str:
    """The memorisation checks: verdicts, numbers and (only when
    ``memorisation_show_pairs`` put one there) the closest-pair grid, which
    shows SENSITIVE training images and says so."""
    info, m = result.memorisation, result.metrics
    if not info:
        return ""
    out = ["<h2 id=memorisation>Memorisation checks [NON-PRIVATE: reads the sensitive training "
           "set]</h2><p>Distance to closest record and a one-step reconstruction attack "
           "(Carlini et al. 2023): training images vs class-matched held-out test images. Not "
           "covered by the release's (epsilon, delta).</p><ul>"]
    out += [f"<li{' class=fail' if 'MEMORISATION' in line else ''}>{html.escape(line)}</li>"
            for line in info.get("messages", [])]
    out.append("</ul>" + _table("Memorisation figures", _MEMO_ROWS, m))
    alpha = (info.get("config") or {}).get("memorisation_alpha")
    out.append(_settings_table("Settings", info.get("config") or {}))
    out.append("<p>Verdict 'memorisation' = significant and share / AUC >= 0.5 + effect; "
               "'inconclusive' = too few images for 80% power against that effect. "
               + (f"The {CHECKS} checks share a family-wise level alpha = {_fmt(alpha)}: each is "
                  f"tested at alpha / {CHECKS} = {_fmt(alpha / CHECKS)} (Bonferroni), so a run "
                  "without memorisation raises no alarm with probability at least "
                  f"{_pct(1 - alpha)}." if alpha is not None else "") + "</p>")
    if info.get("grid_png"):
        out.append("<div class=fail>THE GRID BELOW SHOWS SENSITIVE TRAINING IMAGES "
                   "(evaluation.memorisation_show_pairs): operator only, do not share this "
                   "report.</div><p>Columns: the closest synthetic / training pairs in pixel space."
                   " Rows: synthetic image, nearest TRAINING image, nearest held-out image.</p>")
        out.append(_img(info["grid_png"], "closest synthetic / training pairs"))
    else:
        out.append("<p>Closest-pair grid not shown: it would show sensitive training images "
                   "(set evaluation.memorisation_show_pairs: true for an operator-only report)."
                   "</p>")
    return "".join(out)


def _settings_table(title: str, settings: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td class=num>"
                   f"{html.escape(', '.join(map(_fmt, v)) if isinstance(v, (list, tuple)) else _fmt(v))}"
                   "</td></tr>" for k, v in settings.items())
    return f"<h3>{html.escape(title)}</h3><table>{body}</table>" if body else ""


def _failure_banner(result: EvaluationResult) -> str:
    if not result.failure:
        return ""
    return f"<div class=fail id=failure>RUN FAILED: {html.escape(result.failure)}</div>"


def render_html(result: EvaluationResult, synthetic: ImageSet, provenance: dict | None = None,
                title: str = "PrivImage evaluation report", per_class: int = 10) -> str:
    """The report as one HTML string (images embedded as base64 PNG)."""
    m = result.metrics
    prov = provenance or {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:1em auto;font-size:14px}"
             "table{border-collapse:collapse;margin-bottom:.5em}td{border:1px solid #ccc;"
             "padding:2px 8px}td.num{text-align:right;font-family:monospace}"
             ".banner{background:#fff3cd;border:2px solid #e0a800;padding:8px;margin:8px 0}"
             ".fail{background:#f8d7da;border:3px solid #c00;padding:10px;font-size:18px;"
             "font-weight:bold;color:#900}.ok{background:#d4edda;border:1px solid #3c763d;"
             "padding:6px}img{image-rendering:pixelated}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<div class=banner id=nonprivate><b>NON-PRIVATE EVALUATION.</b> "
             f"{html.escape(NON_PRIVATE_NOTE)}</div>"]
    if result.memorisation.get("grid_png"):
        parts.append("<div class=fail id=shows_training>EXCEPT: this report shows sensitive "
                     "training images (memorisation pair grid); operator only.</div>")
    parts.append(_failure_banner(result))
    parts.append(_audit_banner(result))
    if prov.get("selection_warning"):  # the query's answer could not be told from noise
        parts.append(f"<div class=banner id=selection>{html.escape(prov['selection_warning'])}</div>")
    eps, delta = m.get("ledger_epsilon", prov.get("epsilon")), m.get("ledger_delta", prov.get("delta"))
    line = f"Release guarantee (privacy ledger): epsilon = {_fmt(eps)}, delta = {_fmt(delta)}"
    line += _canary_line(m)
    if "mia_eps_lb" in m:
        line += (f"; diagnostic train-vs-test empirical lower bound = {_fmt(m['mia_eps_lb'])} "
                 f"({int(round(100 * result.config.get('mia_confidence', 0.95)))}% confidence; "
                 f"point estimate {_fmt(m.get('mia_eps_point'))}, at most "
                 f"{_fmt(m.get('mia_eps_lb_max'))} "
                 f"detectable with {m.get('mia_members')} + {m.get('mia_nonmembers')} images)")
    parts.append(f"<p><b>{line}</b></p>")
    meta = {k: prov[k] for k in ("accountant", "generator_preset", "mlflow_run_id") if k in prov}
    meta["synthetic images"] = len(synthetic)
    meta["generated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    parts.append("<p>" + "; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}"
                                   for k, v in meta.items()) + "</p>")

    parts.append(f"<h2>Synthetic samples per class</h2><p>Up to {per_class} SYNTHETIC images per "
                 "class (DP output); no real image is shown.</p><table>")
    for name, png in class_strips(synthetic, per_class=per_class):
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{_img(png, 'synthetic ' + name)}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Figures</h2>")
    for key_title, rows in _ROWS.items():
        parts.append(_table(key_title, rows, m))
    fig = privacy_utility_png(m)
    if fig is not None:
        parts.append(_img(fig, "privacy and utility"))
    if result.roc is not None:
        parts.append("<h2>Membership-inference attack: ROC</h2>"
                     "<p>Loss-threshold attack on the DP generator: score = -(mean EDM denoising "
                     f"loss at sigma in {html.escape(str(result.config.get('mia_noise_levels')))}, "
                     "same noise draws for members and non-members).</p>")
        parts.append(_img(roc_png(result.roc[0], result.roc[1], m.get("mia_auc")), "ROC"))
    parts.append(memorisation_section(result))
    if result.notes:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>"
                                                         for n in result.notes) + "</ul>")
    secs = {k[:-len("_seconds")]: v for k, v in m.items() if k.endswith("_seconds")}
    if secs:
        parts.append("<h2>Wall time per metric (seconds)</h2><table>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td class=num>{v:.1f}</td></tr>" for k, v in secs.items())
            + "</table>" + ("<p>FID includes the Inception feature pass that precision/recall "
                            "reuses.</p>" if "fid" in secs else ""))
    parts.append("<h2>Settings</h2>" + _settings_table("What each metric read", result.config))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
