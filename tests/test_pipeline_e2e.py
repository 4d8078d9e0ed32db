"""End to end on a local Ray: a tiny pipeline runs through every stage, the
ledger respects the target, and no sensitive pixel, label sequence or raw count
reaches the run's logs, MLflow store, metrics or artifacts."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from privimage_core.config import from_dict
from privimage_core.data.sources import load_source
from privimage_core.methods import METHODS
from services.run_report import run_name
from services.tracking import RUNS_VIEW_ID
from tests.helpers import tiny_config

pytestmark = pytest.mark.ray

# The method of the default suite's one end-to-end run (``finished_run``):
# the config's default. Every other registered method's run is opt-in.
DEFAULT_METHOD = from_dict({}).method
# A method's run is the tiny config plus these ("section.key" values and
# whole sections), if any.
METHOD_OVERRIDES: dict[str, tuple[dict, dict]] = {
    # the release's evaluation is the main run's (audit and memorisation off here)
    "dp_ldm": ({"evaluation.canary_audit": False, "evaluation.memorisation": False},
               {"latent": {"autoencoder_dp_steps": 2, "width": 8}}),
}


def method_config(tmp: Path, method: str):
    keys, sections = METHOD_OVERRIDES.get(method, ({}, {}))
    return from_dict({**tiny_config(tmp, **keys), **sections, "method": method})


def _e2e(methods) -> list:
    """``methods`` as test parameters: the default method's run is the
    default suite's; every other's is opt-in (-m slow), minutes each on 2
    cores."""
    return [pytest.param(m, marks=() if m == DEFAULT_METHOD else pytest.mark.slow)
            for m in methods]


def test_local_ray_binds_loopback_only(ray_local):
    """The default route (a local Ray started by the program, no address):
    every server of that Ray session listens on loopback only."""
    import os

    import psutil

    procs = psutil.Process(os.getpid()).children(recursive=True)
    listening = []
    for p in procs:
        try:
            listening += [(p.name(), c.laddr.ip, c.laddr.port)
                          for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    names = {n for n, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, names  # we really looked at Ray's servers
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    public = [x for x in listening if x[1] not in loopback]
    assert not public, f"bound beyond loopback: {public}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local):
    from services.pipeline import run_pipeline
    tmp = tmp_path_factory.mktemp("e2e")
    logs: list[str] = []
    cfg = from_dict(tiny_config(tmp))
    summary = run_pipeline(cfg, log=logs.append)
    return cfg, summary, logs, tmp


@pytest.fixture(scope="module")
def method_run(request, tmp_path_factory, ray_local):
    """``run(method) -> (cfg, summary)``: a registered method's tiny run,
    once per module, shared by the tests that read it; the default method's
    is ``finished_run``."""
    from services.pipeline import run_pipeline
    runs: dict[str, tuple] = {}

    def run(method: str):
        if method == DEFAULT_METHOD:
            return request.getfixturevalue("finished_run")[:2]
        if method not in runs:
            cfg = method_config(tmp_path_factory.mktemp(method), method)
            runs[method] = cfg, run_pipeline(cfg, log=lambda _: None)
        return runs[method]
    return run


def _stage_runs(s) -> tuple[object, list]:
    """(the MLflow client, the run's nested stage runs) of a run summary."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(s["mlflow_uri"])
    parent = client.get_run(s["mlflow_run_id"])
    return client, client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")


def test_pipeline_reports_dp_result(finished_run):
    cfg, s, logs, _ = finished_run
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    assert s["delta"] == 1e-4
    names = [r["name"] for r in s["ledger"]["records"]]
    assert names == ["semantic_distribution_query", "dp_sgd_finetune"]
    assert s["ledger"]["records"][1]["steps"] == 4
    assert (Path(s["synthetic_path"]) / "images.parquet").is_file()
    man = json.loads((Path(s["synthetic_path"]) / "manifest.json").read_text())
    assert man["num_images"] == 40 and man["epsilon"] == s["epsilon"]
    assert 0.0 <= s["accuracy"] <= 1.0
    # SDS (Eq. 5) was computed by the selector and travels with the release
    assert -1.0 <= s["sds"]["sds_selected"] <= 1.0 and -1.0 <= s["sds"]["sds_public_pool"] <= 1.0
    assert man["sds_selected"] == round(s["sds"]["sds_selected"], 4)


def test_mlflow_has_parent_and_stage_runs(finished_run):
    cfg, s, _, _ = finished_run
    client, children = _stage_runs(s)
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.data.metrics["epsilon"] == pytest.approx(s["epsilon"])
    assert parent.data.params["privacy.target_epsilon"] == "5.0"
    stages = {r.data.tags.get("stage") for r in children}
    assert {"semantic_query", "selection", "pretrain", "finetune", "synthesize",
            "evaluate"} <= stages
    ft = next(r for r in children if r.data.tags.get("stage") == "finetune")
    hist = client.get_metric_history(ft.info.run_id, "epsilon_spent")
    assert hist and max(m.value for m in hist) <= cfg.privacy.target_epsilon
    # the curve is logged when the stage is over, every point stamped with one
    # time: per-step timestamps would time the realised Poisson batches
    assert len(hist) >= 2 and len({m.timestamp for m in hist}) == 1
    assert sorted(m.value for m in hist) == [m.value for m in sorted(hist, key=lambda m: m.step)]
    # the run records the public size it used, never the true N
    assert parent.data.params["resolved.dataset_size_source"] == "subsample"
    assert "resolved.n_sensitive" not in parent.data.params
    # the experiment opens in MLflow's training view, and its saved runs view
    # shows only what the parent run carries
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{RUNS_VIEW_ID}"])
    carried = {"params": parent.data.params, "metrics": parent.data.metrics,
               "tags": parent.data.tags}
    for column in json.loads(view["state"])["selectedColumns"]:
        kind, key = column.split(".", 1)
        assert key.strip("`") in carried[kind] or (key == "`fid`" and s["fid"] is None), column
    assert parent.info.run_name == run_name(cfg)


def _all_bytes(root: Path):
    for p in root.rglob("*"):
        if p.is_file() and p.stat().st_size < 200_000_000:
            yield p, p.read_bytes()


def _used_sensitive(cfg):
    """The rows the pipeline trained on: the declared (materialised) dataset."""
    return load_source(cfg.data.sensitive, split="train")


def test_no_sensitive_data_leaves(finished_run):
    """Scan the run's outputs (artifacts, checkpoints, MLflow store, state
    files) and the driver log for sensitive pixels, labels and raw counts."""
    cfg, s, logs, _ = finished_run
    used = _used_sensitive(cfg)
    probe_imgs = [used.images[i].tobytes() for i in range(0, len(used), 50)]
    probe_labels_bin = bytes(used.labels[:48].astype(np.uint8))
    probe_labels_txt = json.dumps(used.labels[:24].tolist())[1:-1].encode()
    class_sizes = np.bincount(used.labels, minlength=10)
    sizes_txt = json.dumps(class_sizes.tolist())[1:-1].encode()
    scanned = 0
    for path, data in _all_bytes(Path(cfg.run.output_dir)):
        if "public_index" in path.parts:  # public images only
            continue
        scanned += 1
        for im in probe_imgs:
            assert im not in data, f"a sensitive image's pixels are in {path}"
        assert probe_labels_bin not in data, f"sensitive labels (binary) in {path}"
        assert probe_labels_txt not in data, f"sensitive labels (text) in {path}"
        assert sizes_txt not in data, f"sensitive class counts in {path}"
    assert scanned >= 10  # checkpoints, artifacts, state, MLflow store
    # the released histogram is rounded: integers only
    state = json.loads((Path(s["run_dir"]) / "pipeline_state.json").read_text())
    saved = state["stages"]["selection"]
    noisy = np.asarray(saved["noisy_histograms"])
    assert noisy.shape[0] == 10 and noisy.dtype.kind == "i"
    # the significance check ran on the DP output and its verdict was acted on
    sig = saved["significance"]
    assert len(sig["significant"]) == 10 and sig["threshold"] > 0
    pre = state["stages"]["pretrain"]["data"]
    assert pre == ("public_pool" if saved["fallback"] == "public_pool" else "selection")
    if saved["fallback"]:
        assert any("WARNING selection significance" in line for line in logs)
        assert s["selection_warning"]
    # and MLflow holds no metric equal to a sensitive class size
    con = sqlite3.connect(Path(cfg.run.output_dir) / "mlflow.db")
    keys = {k for (k,) in con.execute("select key from metrics")}
    assert keys and not any(k.startswith(("sensitive", "class_count", "label_count")) for k in keys)
    text = "\n".join(logs)
    assert sizes_txt.decode() not in text and probe_labels_txt.decode() not in text


@pytest.mark.parametrize("method", _e2e(METHODS))
def test_registered_method_runs_end_to_end(method_run, method):
    """Every registered method (privimage_core/methods.py), end to end on the
    local Ray: exactly its own stages ran (timings and nested MLflow runs),
    its ledger is the plan's (every mechanism's sigma, q and steps, from the
    config and N alone) under the target, the release rebuilds from its
    manifest as the method's family, and the synthetic set is the configured
    one. A new method is covered by registering it. The default method's run
    is the default suite's main run; the others are opt-in (-m slow)."""
    from privimage_core.methods import get_method
    from privimage_core.models.release import load_release
    from privimage_core.privacy.plan import planned_ledger
    from privimage_core.synthesize import read_dataset

    cfg, s = method_run(method)
    m = get_method(method)
    stages = {st.name for st in m.stages}
    assert set(s["stage_seconds"]) == stages
    client, runs = _stage_runs(s)
    assert {r.data.tags["stage"] for r in runs} == stages
    assert client.get_run(s["mlflow_run_id"]).data.params["method"] == method
    plan = planned_ledger(cfg, m, len(_used_sensitive(cfg)), s["delta"])
    assert [(r["name"], r["noise_multiplier"], r["sample_rate"], r["steps"])
            for r in s["ledger"]["records"]] == \
        [(r.name, r.noise_multiplier, r.sample_rate, r.steps) for r in plan.records]
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    assert s["epsilon"] == pytest.approx(plan.epsilon(), rel=1e-9)
    fam, release, man = load_release(s["run_dir"])
    assert fam.name == man.family == m.family and man.method == method
    syn = read_dataset(s["synthetic_path"])
    size, ch = cfg.data.image_size, cfg.data.channels
    assert syn.images.shape == (cfg.sampling.num_images, size, size, ch)
    assert syn.images.dtype == np.uint8 and set(syn.labels.tolist()) <= set(range(10))


# Every method without the semantic query: opt-in (-m slow) to keep the
# default suite short (DPGAN's took 54 s of a 20-minute suite on 2 cores).
# DPDM's stages (fine-tuning, release) are the main run's without
# pre-training; PDP-Diffusion's whole-pool pre-training is what the main
# run's significance fallback runs too; DPGAN's objective and its one-ledger
# step have unit tests (tests/test_gan_family.py).
@pytest.mark.parametrize("method", [pytest.param(n, marks=pytest.mark.slow)
                                    for n, m in METHODS.items() if not m.has("semantic_query")])
def test_baselines_run_their_own_stages_and_spend_only_dp_sgd(method_run, method):
    """DPDM (no public data) and PDP-Diffusion (whole pool, no query): no
    semantic-query mechanism in the ledger, all of epsilon to DP-SGD (that
    only their own stages ran, as nested MLflow runs too, is
    test_registered_method_runs_end_to_end's check of the same run)."""
    cfg, s = method_run(method)
    assert [r["name"] for r in s["ledger"]["records"]] == ["dp_sgd_finetune"]
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    state = json.loads((Path(s["run_dir"]) / "pipeline_state.json").read_text())
    if method == "pdp_diffusion":  # the whole public pool, not a selection
        assert state["stages"]["pretrain"]["data"] == "public_pool"
        assert state["stages"]["pretrain"]["images"] > 20 * 10
        assert list((Path(cfg.run.output_dir) / "cache").glob("pretrain-*.pt"))


@pytest.mark.slow
def test_public_pretraining_is_reused_across_runs(method_run):
    """Public pre-training is budget-free: a second run with other DP settings
    reuses it (cached by a digest of what it depends on). The first run is
    the module's pdp_diffusion run (the first in its output directory)."""
    import torch

    from services.pipeline import run_pipeline

    cfg, s = method_run("pdp_diffusion")
    state = json.loads((Path(s["run_dir"]) / "pipeline_state.json").read_text())
    again = run_pipeline(cfg.with_overrides({"finetune.steps": 2}), log=lambda _: None)
    st2 = json.loads((Path(again["run_dir"]) / "pipeline_state.json").read_text())
    assert "cached" in st2["stages"]["pretrain"] and "cached" not in state["stages"]["pretrain"]
    a = torch.load(Path(s["run_dir"]) / "pretrained_generator.pt")
    b = torch.load(Path(again["run_dir"]) / "pretrained_generator.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_during_finetuning_continues_the_ledger(finished_run):
    """A driver that died after DP fine-tuning had checkpointed, resumed with
    ``--resume``: the saved state still says 'fine-tuning started' (its plan
    is saved, its ledger holds only the query), the checkpoints hold the DP
    steps. The resumed run continues the checkpoints' ledger: it takes no
    step twice and reports the same epsilon, not a restarted ledger, and
    releases the same DP model. Ray Train's own restore-by-name is disabled
    (its snapshot removed), so the driver's checkpoint lookup is what counts.
    (Runs last in this module: it rewrites the finished run's state.)"""
    import torch

    from services.pipeline import run_pipeline

    cfg, s, _, _ = finished_run
    run_dir = Path(s["run_dir"])
    released = torch.load(run_dir / "dp_generator.pt", map_location="cpu")
    snapshots = list((run_dir / "ray_train").glob("*-finetune/checkpoint_manager_snapshot.json"))
    assert len(snapshots) == 1
    snapshots[0].unlink()
    state_path = run_dir / "pipeline_state.json"
    state = json.loads(state_path.read_text())
    assert state["dp_plans"]["finetune"]["total_steps"] == 4
    for stage in ("finetune", "done"):
        state["stages"].pop(stage, None)
    state["ledger"]["records"] = [r for r in state["ledger"]["records"]
                                  if r["name"] != "dp_sgd_finetune"]
    state_path.write_text(json.dumps(state))
    logs: list[str] = []
    resumed = run_pipeline(cfg, resume_dir=s["run_dir"], log=logs.append)
    assert [r["steps"] for r in resumed["ledger"]["records"]] == [1, 4]
    assert resumed["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
    assert any("DP-SGD (finetune):" in line and "4 steps" in line for line in logs), logs
    again = torch.load(run_dir / "dp_generator.pt", map_location="cpu")
    assert released.keys() == again.keys()
    assert all(torch.equal(released[k], again[k]) for k in released)  # no step retaken


def test_progress_line_shows_steps_rate_and_eta(ray_local, monkeypatch):
    """A worker's posts reach the driver's line (services/progress.py): in a
    log (not a terminal) a plain line with steps, steps/s and ETA."""
    import time

    from services import progress

    monkeypatch.setattr(progress, "POST_SECONDS", 0.0)
    lines: list[str] = []
    # Post until the line appears (or a minute passes): on a loaded CI box the
    # board actor can take seconds to start, so a fixed few seconds of posts
    # made this test flaky without showing anything about the line itself.
    deadline = time.time() + 60
    with progress.progress_line("test", "pretrain", "pre-training", lines.append,
                                tty=False) as name:
        post = progress.ProgressPoster(name)
        step = 0
        while not lines and time.time() < deadline:
            step += 1
            post(step, 40)
            time.sleep(0.3)
    assert lines, "no progress line was drawn in 60 s"
    assert "pre-training:" in lines[0] and "/40 steps" in lines[0]
    assert "steps/s" in lines[0] and "ETA" in lines[0] and "ETA ?" not in lines[-1]
    assert progress.progress_text("x", 50, 100, 10.0) == \
        "[privimage] x: 50/100 steps (50%), 5.00 steps/s, ETA 0m10s"


# Opt-in (-m slow): 143 s of a 20-minute default suite on 2 cores (two DP-SGD
# Ray Train runs); the two-stage budget split is unit-tested in
# tests/test_latent_family.py.
@pytest.mark.slow
def test_dp_ldm_runs_two_dp_sgd_stages_in_one_ledger(method_run):
    """dp_ldm (seed 003): the autoencoder's DP stage (its share of epsilon
    alone), then the latent model's, composed with the query into one
    ledger under the target; the latent stage starts from the DP
    autoencoder and leaves it unchanged; synthesis decodes to pixels."""
    import torch

    from privimage_core.privacy.ledger import MechanismRecord, PrivacyLedger

    # the module's dp_ldm run (METHOD_OVERRIDES: 2 autoencoder DP steps,
    # width 8, audit and memorisation off)
    cfg, s = method_run("dp_ldm")
    recs = s["ledger"]["records"]
    assert [r["name"] for r in recs] == ["semantic_distribution_query",
                                         "dp_sgd_finetune_autoencoder", "dp_sgd_finetune"]
    assert [r["steps"] for r in recs[1:]] == [2, 4]
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    alone = PrivacyLedger(cfg.privacy.target_epsilon, s["delta"])
    alone.records.append(MechanismRecord(**{k: recs[1][k] for k in
                                            ("name", "noise_multiplier", "sample_rate", "steps")}))
    assert alone.epsilon() <= cfg.latent.autoencoder_epsilon_share * cfg.privacy.target_epsilon
    run = Path(s["run_dir"])
    pre, ae, rel = (torch.load(run / f, map_location="cpu") for f in
                    ("pretrained_generator.pt", "dp_finetune_autoencoder.pt", "dp_generator.pt"))
    ae_keys = [k for k in rel if k.startswith("autoencoder.")]
    assert ae_keys and all(torch.equal(ae[k], rel[k]) for k in ae_keys)
    assert not all(torch.equal(pre[k], ae[k]) for k in ae_keys)
    assert not all(torch.equal(ae[k], rel[k]) for k in rel if k.startswith("diffusion."))
    man = json.loads((Path(s["synthetic_path"]) / "manifest.json").read_text())
    assert man["num_images"] == 40 and man["epsilon"] == s["epsilon"]
