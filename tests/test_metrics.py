"""The live exporter: values move, it binds loopback, it is idempotent."""
from __future__ import annotations

import importlib
import re
import socket
import urllib.request
import uuid

import pytest

from services import metrics


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    """Value of one sample line, matching all given labels (any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body = line[len(name) + 1:line.rindex("}")]
        got = dict(re.findall(r'(\w+)="([^"]*)"', body))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _local_non_loopback_ip() -> str | None:
    """An address of this host other than 127.x, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def port():
    p = metrics.start_metrics_server(port=0)
    yield p
    metrics.stop_metrics_server()


def test_values_move(port):
    run = f"run-{uuid.uuid4().hex[:8]}"
    m = metrics.PipelineMetrics(run)
    m.train_step("pretrain", n_samples=64, loss=0.9, samples_per_second=120.0, worker=0)
    m.train_step("pretrain", n_samples=64, loss=0.7, samples_per_second=130.0, worker=0)
    m.epsilon(spent=1.5, target=10.0)
    m.selected(1234)
    m.stage_done("pretrain", 12.5)
    m.eval_metric("fid", 42.0)
    m.eval_metric("accuracy", 0.81)
    t1 = _scrape(port)
    assert _value(t1, "privimage_train_steps_total", run_id=run, stage="pretrain") == 2
    assert _value(t1, "privimage_train_samples_total", run_id=run, stage="pretrain") == 128
    assert _value(t1, "privimage_train_samples_per_second",
                  run_id=run, stage="pretrain", worker="0") == 130.0
    assert _value(t1, "privimage_train_loss", run_id=run, stage="pretrain") == pytest.approx(0.7)
    assert _value(t1, "privimage_epsilon_spent", run_id=run) == 1.5
    assert _value(t1, "privimage_epsilon_target", run_id=run) == 10.0
    assert _value(t1, "privimage_selector_selected_images", run_id=run) == 1234
    assert _value(t1, "privimage_stage_seconds", run_id=run, stage="pretrain") == 12.5
    assert _value(t1, "privimage_eval_metric", run_id=run, metric="fid") == 42.0
    assert _value(t1, "privimage_eval_metric", run_id=run, metric="accuracy") == pytest.approx(0.81)

    m.train_step("pretrain", n_samples=32)
    m.epsilon(spent=2.5, target=10.0)
    t2 = _scrape(port)
    assert _value(t2, "privimage_train_steps_total", run_id=run, stage="pretrain") == 3
    assert _value(t2, "privimage_train_samples_total", run_id=run, stage="pretrain") == 160
    assert _value(t2, "privimage_epsilon_spent", run_id=run) == 2.5


def test_finetune_loss_not_exported_by_default(port):
    run = f"run-{uuid.uuid4().hex[:8]}"
    metrics.PipelineMetrics(run).train_step("finetune", n_samples=256, loss=0.3)
    text = _scrape(port)
    assert _value(text, "privimage_train_steps_total", run_id=run, stage="finetune") == 1
    # loss on sensitive mini-batches is not DP: absent unless explicitly enabled
    assert _value(text, "privimage_train_loss", run_id=run, stage="finetune") is None
    metrics.PipelineMetrics(run, export_nonprivate_loss=True).train_step(
        "finetune", n_samples=256, loss=0.3)
    assert _value(_scrape(port), "privimage_train_loss", run_id=run, stage="finetune") == 0.3


def test_bad_labels_rejected():
    m = metrics.PipelineMetrics("r")
    with pytest.raises(ValueError):
        m.train_step("sample", n_samples=1)
    with pytest.raises(ValueError):
        m.eval_metric("class cat accuracy", 1.0)
    with pytest.raises(ValueError):
        metrics.PipelineMetrics("")


def test_idempotent_and_reload_safe(port):
    assert metrics.start_metrics_server() == port
    assert metrics.start_metrics_server(port=0) == port
    reg = metrics.REGISTRY
    importlib.reload(metrics)  # must not raise "Duplicated timeseries"
    assert metrics.REGISTRY is reg
    assert metrics.start_metrics_server() == port
    # several facades for the same run share the same series
    run = f"run-{uuid.uuid4().hex[:8]}"
    metrics.PipelineMetrics(run).selected(3)
    metrics.PipelineMetrics(run).selected(5)
    assert _value(_scrape(port), "privimage_selector_selected_images", run_id=run) == 5


def test_binds_loopback_only(port):
    host, bound = metrics.metrics_server_address()
    assert (host, bound) == ("127.0.0.1", port)
    httpd = metrics._SERVER["httpd"]
    assert httpd.socket.getsockname()[0] == "127.0.0.1"  # not 0.0.0.0 / ::
    ip = _local_non_loopback_ip()
    if ip is None:
        pytest.skip("host has no non-loopback IPv4 address to probe")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        assert s.connect_ex((ip, port)) != 0, f"exporter reachable on {ip}:{port}"
