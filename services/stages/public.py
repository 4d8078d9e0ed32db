"""Stages on the public pool and the DP semantic query (Algorithm 2, lines 1-8),
run by the selector actor (services/actors.py)."""
from __future__ import annotations

import numpy as np

from privimage_core.methods import Stage
from privimage_core.privacy_ledger import PrivacyLedger
from services.stage_engine import RunContext


def _selector(ctx: RunContext):
    from services.actors import SelectorActor
    return ctx.actor("selector", SelectorActor)


def public_index(ctx: RunContext, stage: Stage) -> dict:
    import ray

    info = ray.get(_selector(ctx).build_index.remote())
    ctx.values["public_names"] = info["label_names"]
    return {"num_public_images": info["num_public_images"],
            "num_public_labels": info["num_public_labels"]}


def query_function(ctx: RunContext, stage: Stage) -> dict:
    """Lines 1-2: the semantic query function, trained on public data only."""
    import ray

    if all(ctx.done(s) is not None for s in ctx.method.stages if s.kind == "semantic_query"):
        return {}  # the selection it served is saved: no need to train it again
    qm = ray.get(_selector(ctx).train_query_function.remote())
    acc = qm.get("public_val_accuracy", float("nan"))
    ctx.log(f"[privimage] semantic query function: public val accuracy {acc:.3f}")
    return {"public_val_accuracy": acc}


def semantic_query(ctx: RunContext, stage: Stage) -> dict:
    """Lines 3-8: the DP semantic distribution query (charged to the ledger
    by the selector before it runs) and the top-k2 selection."""
    import ray

    q = ray.get(_selector(ctx).query.remote(ctx.ledger.state_dict(), ctx.sens_ref,
                                            len(ctx.class_names)))
    ctx.ledger = PrivacyLedger.from_state_dict(q["ledger"])
    ctx.state["ledger"] = ctx.ledger.state_dict()
    saved = {"selection": q["selection"], "noisy_histograms": q["noisy_histograms"],
             "k1": q["k1"], "k2": q["k2"], "sigma_q": q["sigma_q"]}
    if ctx.cfg.evaluation.sds:  # post-processing of DP outputs: private
        saved["sds"] = ray.get(_selector(ctx).semantic_similarity.remote(
            ctx.class_names, q["noisy_histograms"], q["selection"]))
    ctx.finish(stage, saved)  # the budget is spent: save before anything else
    _publish_selection(ctx, saved)
    return {"epsilon_after_query": ctx.ledger.epsilon(), **(saved.get("sds") or {})}


def restore_semantic_query(ctx: RunContext, stage: Stage, saved: dict) -> None:
    saved = dict(saved, selection={int(k): v for k, v in saved["selection"].items()})
    ctx.state["stages"][stage.name] = saved
    _publish_selection(ctx, saved, log_artifacts=False)


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


def pretrain_images(ctx: RunContext, stage: Stage) -> tuple[np.ndarray, np.ndarray]:
    """The public images a pre-training stage trains on, labelled with
    sensitive class ids: the selection relabelled (PrivImage), or the whole
    pool (PDP-Diffusion) with class ids drawn uniformly from a public seed,
    so the class embedding carries no public semantics and DP fine-tuning
    teaches it the sensitive classes."""
    import ray

    sel = _selector(ctx)
    if stage.options["data"] == "selection":
        images, labels = ray.get(sel.selected_images.remote(ctx.values["selection"]))
    else:
        images, labels = ray.get(sel.pool_images.remote(len(ctx.class_names), ctx.cfg.run.seed))
    ctx.kill_actors("selector")  # frees its CPU for the trainers
    return images, labels


def histogram_png(noisy: np.ndarray, class_names: list[str], public_names: list[str],
                  path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(8, len(public_names) * 0.18), 0.45 * len(class_names) + 1.5))
    im = ax.imshow(noisy, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xticks(range(len(public_names)), public_names, rotation=90, fontsize=6)
    ax.set_title("Noisy semantic distribution per sensitive class (DP output)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
