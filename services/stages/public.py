"""Stages on the public pool and the DP semantic query (Algorithm 2, lines 1-8),
run by the selector actor (services/actors.py)."""
from __future__ import annotations

import mlflow
import numpy as np
import ray

from privimage_core.errors import DataError
from privimage_core.methods import Stage
from privimage_core.privacy.ledger import MechanismRecord, PrivacyLedger
from privimage_core.privacy.query_budget import Significance, fallback_plan, selection_significance
from services.actors import SelectorActor
from services.stage_engine import RunContext


def _selector(ctx: RunContext):
    return ctx.actor("selector", SelectorActor)


def public_index(ctx: RunContext, stage: Stage) -> dict:
    info = ray.get(_selector(ctx).build_index.remote())
    ctx.values["public_names"] = info["label_names"]
    if info["index_shards"]:
        ctx.log(f"[privimage] public index: {info['num_public_images']} images; "
                f"{info['index_shards']} shards indexed, {info['index_shards_reused']} of them "
                "reused from the cache")
    return {"num_public_images": info["num_public_images"],
            "num_public_labels": info["num_public_labels"],
            "index_shards_reused": info["index_shards_reused"]}


def query_function(ctx: RunContext, stage: Stage) -> dict:
    """Lines 1-2: the semantic query function, trained on public data only."""
    if all(ctx.done(s) is not None for s in ctx.method.stages if s.kind == "semantic_query"):
        return {}  # the selection it served is saved: no need to train it again
    qm = ray.get(_selector(ctx).train_query_function.remote())
    acc = qm.get("public_val_accuracy", float("nan"))
    rate = qm.get("train_images_per_second")
    colour = qm.get("colour")
    ctx.log(f"[privimage] semantic query function: public val accuracy {acc:.3f}" +
            (f" (trained from the stream at {rate:.0f} images/s)" if rate else "") +
            (f"; images seen as: {colour} (semantic_query.colour)" if colour else ""))
    if colour:
        mlflow.set_tag("semantic_query_colour", colour)
    return {"public_val_accuracy": acc, **({"train_images_per_second": rate} if rate else {})}


def semantic_query(ctx: RunContext, stage: Stage) -> dict:
    """Lines 3-8: the DP semantic distribution query (charged to the ledger
    by the selector before it runs) and the top-k2 selection."""
    sel = ctx.cfg.selection
    sigma_q = ctx.plan.query_sigma
    q = ray.get(_selector(ctx).query.remote(ctx.ledger.state_dict(), ctx.sens_ref,
                                            len(ctx.class_names), sigma_q))
    ctx.ledger = PrivacyLedger.from_state_dict(q["ledger"])
    ctx.state["ledger"] = ctx.ledger.state_dict()
    # The released histogram is rounded to integers (post-processing of
    # the Gaussian mechanism's output: same guarantee, no float64 digits)
    noisy = np.round(np.asarray(q["noisy_histograms"], dtype=np.float64))
    sig = selection_significance(noisy, q["selection"], q["k1"], q["sigma_q"],
                                 sel.significance_alpha)
    fallback = fallback_plan(sig, sel.on_insignificant)
    saved = {"selection": q["selection"], "noisy_histograms": noisy.astype(int).tolist(),
             "k1": q["k1"], "k2": q["k2"], "sigma_q": q["sigma_q"],
             "query_epsilon_alone": _alone(ctx, q["sigma_q"]),
             "significance": sig.to_dict(), "fallback": fallback}
    if ctx.cfg.evaluation.sds:  # post-processing of DP outputs: private
        saved["sds"] = ray.get(_selector(ctx).semantic_similarity.remote(
            ctx.class_names, saved["noisy_histograms"], q["selection"]))
    ctx.finish(stage, saved)  # the budget is spent: save before anything else
    _publish_selection(ctx, saved)
    _report_significance(ctx, saved)
    return {"epsilon_after_query": ctx.ledger.epsilon(),
            "query_epsilon_alone": saved["query_epsilon_alone"],
            "selection_significant_classes": sig.num_significant,
            "selection_fallback": float(fallback is not None), **(saved.get("sds") or {})}


def _alone(ctx: RunContext, sigma_q: float) -> float:
    """What the query would cost released alone (the budget split's unit)."""
    led = PrivacyLedger(ctx.ledger.target_epsilon, ctx.ledger.target_delta,
                        ctx.ledger.accountant_name)
    return led.epsilon_if([MechanismRecord("_q", sigma_q, 1.0, 1)])


def _report_significance(ctx: RunContext, saved: dict, log: bool = True) -> None:
    sig = Significance(**{k: v for k, v in saved["significance"].items()
                          if k != "num_significant"})
    fallback = saved.get("fallback")
    msg = sig.message(ctx.class_names)
    if fallback == "public_pool":
        msg += ("; fewer than half the classes are significant: pre-training falls back to "
                "the whole public pool, as PDP-Diffusion does")
    elif fallback == "drop_classes":
        msg += "; those classes get no pre-training images (random semantics are worse)"
        ctx.values["selection"] = {c: ps for c, ps in ctx.values["selection"].items()
                                   if sig.significant[c]}
    elif not sig.all_significant:
        msg += f" (selection.on_insignificant: {ctx.cfg.selection.on_insignificant})"
    ctx.values["selection_note"] = None if sig.all_significant else msg
    ctx.values["selection_fallback"] = fallback
    if log:
        ctx.log(("[privimage] WARNING " if not sig.all_significant else "[privimage] ") + msg)
        ctx.tracker.params({"selection.sigma_q_resolved": saved["sigma_q"],
                            "selection.fallback": fallback or "none"})
    if fallback == "fail":
        raise DataError("[privimage] " + msg + "; stopped before pre-training (the query's "
                        "budget is recorded in the ledger)")


def restore_semantic_query(ctx: RunContext, stage: Stage, saved: dict) -> None:
    saved = dict(saved, selection={int(k): v for k, v in saved["selection"].items()})
    ctx.state["stages"][stage.name] = saved
    _publish_selection(ctx, saved, log_artifacts=False)
    if "significance" in saved:
        _report_significance(ctx, saved, log=False)


def _publish_selection(ctx: RunContext, saved: dict, log_artifacts: bool = True) -> None:
    """DP outputs only: the noisy histograms, the selection, its SDS."""
    selection = {int(k): v for k, v in saved["selection"].items()}
    ctx.values["selection"] = selection
    public = ctx.values.get("public_names") or []
    names = ctx.class_names
    named = {names[c]: [public[p] for p in ps] for c, ps in selection.items()} if public else {}
    sds = saved.get("sds")
    if sds:
        ctx.values["sds"] = sds
    if not log_artifacts:
        return
    t = ctx.tracker
    t.params({"selection.k1_resolved": saved["k1"], "selection.k2_resolved": saved["k2"]})
    t.json_artifact(named, "selected_public_labels.json")
    t.json_artifact({"noisy_histograms": np.asarray(saved["noisy_histograms"]).tolist(),
                     "class_names": names, "public_labels": public, "k1": saved["k1"],
                     "sigma_q": saved["sigma_q"]}, "noisy_histogram.json")
    png = ctx.run_dir / "noisy_histogram.png"
    histogram_png(np.asarray(saved["noisy_histograms"]), names, public, png)
    t.file_artifact(png)
    if ctx.pm:
        ctx.pm.epsilon(ctx.ledger.epsilon(), ctx.ledger.target_epsilon)
    ctx.log("[privimage] selection: " + "; ".join(f"{k} <- {', '.join(v)}"
                                                  for k, v in named.items()))
    if sds:
        ctx.log(f"[privimage] semantic distribution similarity (Eq. 5): selection "
                f"{sds['sds_selected']:.3f}, whole public pool {sds['sds_public_pool']:.3f}")


def pretrain_data(ctx: RunContext, stage: Stage) -> str:
    """'selection' or 'public_pool': the stage's choice, unless the selection
    cannot be told from noise and the run falls back (query_budget.py)."""
    data = stage.options["data"]
    if data == "selection" and ctx.values.get("selection_fallback") == "public_pool":
        return "public_pool"
    return data


def pretrain_images(ctx: RunContext, stage: Stage) -> tuple[np.ndarray, np.ndarray]:
    """The public images a pre-training stage trains on, labelled with
    sensitive class ids: the selection relabelled (PrivImage), or the whole
    pool (PDP-Diffusion) with class ids drawn uniformly from a public seed,
    so the class embedding carries no public semantics and DP fine-tuning
    teaches it the sensitive classes. Only those images are read: the
    selection's rows from their shards, and of a pool larger than
    data.public_pool_pretrain_max a uniform subsample from the public seed
    (services/actors.py PublicSelector.pool_images)."""
    sel = _selector(ctx)
    if pretrain_data(ctx, stage) == "selection":
        images, labels = ray.get(sel.selected_images.remote(ctx.values["selection"]))
    else:
        images, labels = ray.get(sel.pool_images.remote(len(ctx.class_names), ctx.cfg.run.seed))
    ctx.kill_actors("selector")  # frees its CPU for the trainers
    return images, labels


def histogram_png(noisy: np.ndarray, class_names: list[str], public_names: list[str],
                  path) -> None:
    # lazy: matplotlib only for this figure; Agg before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above
    fig, ax = plt.subplots(figsize=(max(8, len(public_names) * 0.18), 0.45 * len(class_names) + 1.5))
    im = ax.imshow(noisy, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xticks(range(len(public_names)), public_names, rotation=90, fontsize=6)
    ax.set_title("Noisy semantic distribution per sensitive class (DP output)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
