"""Deployment files stay valid and consistent with the code and the pins.

Offline only: Ray's own launcher schema, YAML/JSON parsing, the live metrics
registry and the installed ray package's source. Nothing here talks to a
cloud, a Kubernetes API or Docker.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCHER_YAMLS = [ROOT / "ray_cluster.yaml", DEPLOY / "gcp" / "ray_cluster_gcp.yaml"]
KUBERAY = DEPLOY / "kuberay"
DASHBOARD = DEPLOY / "grafana" / "privimage-dashboard.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
MLFLOW_DIR = DEPLOY / "mlflow"
MLFLOW_K8S = MLFLOW_DIR / "k8s"
PODMONITOR = DEPLOY / "prometheus" / "podmonitor.yaml"
PINNED = ("ray", "torch", "torchvision", "mlflow", "opacus")


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


REQ = _requirements()


# ----------------------------------------------------------- launcher YAMLs
def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_schema(path):
    cfg = _prepared(path)
    assert cfg["cluster_name"] == "privimage"
    nodes = cfg["available_node_types"]
    # CPU:0 head: nothing but the driver (and Train's 0-CPU controller) runs there.
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [n for k, n in nodes.items()
                 if k != cfg["head_node_type"] and n["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(n.get("min_workers", 0) == 0 for n in gpu_types)
    assert all(n["max_workers"] >= 1 for n in gpu_types)

    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "--metrics-export-port=8080" in head and "--metrics-export-port=8080" in worker
    assert "--dashboard-host=127.0.0.1" in head
    for cmds in (head, worker):
        assert "export MLFLOW_TRACKING_URI=" in cmds and "export RAY_AUTH_MODE=token" in cmds
        assert "export PRIVIMAGE_DATA_DIR=/home/ray/privimage_data" in cmds

    docker = cfg["docker"]
    assert docker["image"] == f"rayproject/ray:{REQ['ray']}-py311-gpu"
    assert any("--shm-size" in o for o in docker["head_run_options"])
    for n in gpu_types:
        assert any("--shm-size" in o for o in n["docker"]["worker_run_options"])

    setup = " ".join(cfg["setup_commands"])
    # scripts/setup.sh (pins, project, Debian packages, MNIST) into the image's Python
    assert "bash scripts/setup.sh" in setup and "PRIVIMAGE_VENV=" in setup
    assert "PRIVIMAGE_DATA_DIR=/home/ray/privimage_data" in setup
    assert cfg["file_mounts"]["/home/ray/privimage"] == "."
    assert ".venv" in cfg["rsync_exclude"]


def test_launcher_schema_check_is_not_vacuous():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_1x"]["resourcez"] = {"GPU": 1}
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_1x"]["resources"] = {"GPU": 0.5}  # integers only
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))


def test_aws_security_group_opens_nothing_extra():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    # Metrics, dashboard, GCS and MLflow stay intra-cluster (see the comments).
    assert cfg["provider"]["security_group"]["IpPermissions"] == []


def test_aws_strict_groups_open_metrics_to_the_head_only():
    """deploy/aws/security_groups.sh: the workers group never opens 8080 to
    anything but the head group; the head group takes SSH from SSH_CIDR only."""
    import re

    script = (DEPLOY / "aws" / "security_groups.sh").read_text()
    rules = {}
    for group, body in re.findall(r'--group-id "\$(\w+)" --ip-permissions((?:\s*\\?\s*"[^"]+")+)',
                                  script):
        rules[group] = re.findall(r'"([^"]+)"', body)
    assert set(rules) == {"HEAD", "WORKERS"}

    def opens_8080(rule: str) -> bool:
        if "IpProtocol=-1" in rule:
            return True
        m = re.search(r"IpProtocol=tcp,FromPort=(\d+),ToPort=(\d+)", rule)
        return bool(m) and int(m[1]) <= 8080 <= int(m[2])

    to_8080 = [r for r in rules["WORKERS"] if opens_8080(r)]
    assert to_8080 and all(re.search(r"UserIdGroupPairs=\[\{GroupId=\$HEAD\}\]$", r)
                           for r in to_8080), to_8080
    assert not any("0.0.0.0/0" in r for rs in rules.values() for r in rs)
    assert any("FromPort=22" in r and "$SSH_CIDR" in r for r in rules["HEAD"])
    # the launcher config points at the script where the groups go
    launcher = (ROOT / "ray_cluster.yaml").read_text()
    assert launcher.count("# SecurityGroupIds: [sg-HEAD]") == 1
    assert launcher.count("# SecurityGroupIds: [sg-WORKERS]") == 2


# ----------------------------------------------------------------- KubeRay
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _cluster_spec(name: str) -> dict:
    (doc,) = _docs(name)
    assert doc["apiVersion"] == "ray.io/v1"
    if name == "rayjob.yaml":
        assert doc["kind"] == "RayJob"
        return doc["spec"]["rayClusterSpec"]
    assert doc["kind"] == "RayCluster"
    return doc["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_spec(name):
    spec = _cluster_spec(name)
    assert spec["rayVersion"] == REQ["ray"]
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert head["rayStartParams"]["dashboard-host"] in {"0.0.0.0", "127.0.0.1"}

    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if any(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
        for c in g["template"]["spec"]["containers"])]
    assert gpu, "no worker group with nvidia.com/gpu limits"
    for g in gpu:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1

    for tmpl in [head["template"]] + [g["template"] for g in groups]:
        pod = tmpl["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        pvc = [n for n, v in vols.items()
               if v.get("persistentVolumeClaim", {}).get("claimName") == "privimage-checkpoints"]
        shm = [n for n, v in vols.items() if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert pvc and shm
        for c in pod["containers"]:
            assert c["image"] == "privimage:0.1.0"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/mnt/checkpoints") in pvc
            assert mounts.get("/dev/shm") in shm
            env = {e["name"]: e for e in c["env"]}
            uri = env["MLFLOW_TRACKING_URI"]
            # from a ConfigMap/Secret reference, never a literal in the manifest
            assert "value" not in uri and set(uri["valueFrom"]) & {"configMapKeyRef",
                                                                   "secretKeyRef"}
            for e in c["env"]:
                if "PASSWORD" in e["name"] or "TOKEN" in e["name"]:
                    assert "secretKeyRef" in e.get("valueFrom", {}), e["name"]


def test_rayjob_entrypoint_and_same_spec_as_raycluster():
    (job,) = _docs("rayjob.yaml")
    assert "python -m services.entrypoint" in job["spec"]["entrypoint"]
    assert "--config /app/configs/cluster.yaml" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"] == _cluster_spec("raycluster.yaml")


def test_pvc_and_configmap():
    docs = {d["kind"]: d for d in _docs("pvc.yaml")}
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "privimage-checkpoints"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node writes checkpoints
    ref = _cluster_spec("raycluster.yaml")["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"][0]["valueFrom"]["configMapKeyRef"]
    cm = docs["ConfigMap"]
    assert cm["metadata"]["name"] == ref["name"] and ref["key"] in cm["data"]


# ------------------------------------------------------ Grafana / Prometheus
def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            exprs.append(var["definition"])
    assert exprs
    return exprs


def _exported_privimage_names() -> set[str]:
    """Sample names the metrics facade records (after one update of each
    metric), named as Ray exports them; tests/test_live_metrics.py checks
    the same set against a real scrape of Ray's metrics export port."""
    from services import metrics

    m = metrics.PipelineMetrics("deploy-test-names", export_nonprivate_loss=True)
    m.train_step("pretrain", n_samples=1, loss=1.0, samples_per_second=1.0)
    m.epsilon(0.0, 1.0)
    m.public_images(1)
    m.selected(0)
    m.stage_done("pretrain", 0.0)
    m.eval_metric("fid", 0.0)
    return {n for n, labels, _ in metrics.snapshot() if labels["run_id"] == "deploy-test-names"}


# Ray's exporter prefixes application metrics with "ray_" too.
_OURS = re.compile(r"\b(ray_privimage_[a-z0-9_]+)")
_RAYS = re.compile(r"\b(ray_(?!privimage_)[a-z0-9_]+)")


def test_metric_name_list_matches_registry():
    from services import metrics

    assert _exported_privimage_names() == set(metrics.METRIC_NAMES)


def test_dashboard_privimage_metrics_exist():
    used = {n for e in _dashboard_exprs() for n in _OURS.findall(e)}
    exported = _exported_privimage_names()
    assert {"ray_privimage_train_steps_total", "ray_privimage_train_samples_per_second",
            "ray_privimage_epsilon_spent", "ray_privimage_epsilon_target",
            "ray_privimage_train_loss"} <= used
    assert used <= exported, f"dashboard uses unknown metrics: {sorted(used - exported)}"
    # no leftover name of the old per-process exporter
    assert not any(re.search(r"(?<!ray_)\bprivimage_", e) for e in _dashboard_exprs())


def test_dashboard_ray_metrics_exist_in_ray_source():
    import ray

    used = {n for e in _dashboard_exprs() for n in _RAYS.findall(e)}
    assert {"ray_node_cpu_utilization", "ray_node_gpus_utilization",  # per node
            "ray_component_cpu_percentage", "ray_component_gpu_percentage"} <= used  # per worker
    pkg = Path(ray.__file__).parent
    # Ray declares gauges without the "ray_" prefix its exporter adds; look
    # for the quoted declaration in the agent code (not in Ray's dashboards).
    sources = [p.read_text(errors="ignore")
               for p in (pkg / "dashboard" / "modules" / "reporter").glob("*.py")]
    sources += [(pkg / "dashboard" / "consts.py").read_text()]
    for name in used:
        short = name[len("ray_"):]
        assert any(f'"{short}"' in s for s in sources), f"{name} not declared by Ray {ray.__version__}"


def test_prometheus_scrapes_ray_service_discovery():
    from ray._private import ray_constants

    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert files == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    targets = jobs["privimage-local"]["static_configs"][0]["targets"]
    assert all(t.startswith("127.0.0.1:") for t in targets)


# -------------------------------------------------------- MLflow compose
def test_mlflow_compose():
    comp = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yaml").read_text())
    svc = comp["services"]
    assert svc["postgres"]["image"] == "postgres:15"
    assert svc["mlflow"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert svc["mlflow"]["image"] == f"privimage-mlflow:{REQ['mlflow']}"
    assert all(str(p).startswith("127.0.0.1:") for p in svc["mlflow"]["ports"])
    assert "ports" not in svc["postgres"]
    assert "--allowed-hosts" in svc["mlflow"]["command"]
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    example = (DEPLOY / "mlflow" / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=changeme" in example


def test_mlflow_env_file_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "deploy/mlflow/.env"], cwd=ROOT)
    assert r.returncode == 0, "deploy/mlflow/.env would be committable"


# ----------------------------------------------------- MLflow on Kubernetes
def _mlflow_k8s() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object for every document under deploy/mlflow/k8s/."""
    objs: dict[tuple[str, str], dict] = {}
    files = sorted(MLFLOW_K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/mlflow/k8s/"
    for f in files:
        for d in yaml.safe_load_all(f.read_text()):
            if not d:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(d), f
            key = (d["kind"], d["metadata"]["name"])
            assert key not in objs, f"{key} defined twice"
            objs[key] = d
    return objs


def _tracking_uris() -> set[str]:
    """MLFLOW_TRACKING_URI of every Ray container, resolved through pvc.yaml's ConfigMap."""
    cms = {d["metadata"]["name"]: d for d in _docs("pvc.yaml") if d["kind"] == "ConfigMap"}
    uris = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        spec = _cluster_spec(name)
        tmpls = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in tmpls:
            for c in t["spec"]["containers"]:
                ref = {e["name"]: e for e in c["env"]}["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
                uris.add(cms[ref["name"]]["data"][ref["key"]])
    return uris


def _expand_env(env: list[dict], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: secretKeyRef values
    from `secrets`, then $(VAR) replaced by variables defined earlier in the list."""
    out: dict[str, str] = {}
    for e in env:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            out[e["name"]] = re.sub(r"\$\((\w+)\)",
                                    lambda m: out.get(m.group(1), m.group(0)), str(e["value"]))
    return out


def _arg(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} in {cmd}"
    return cmd[cmd.index(flag) + 1]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_mlflow_k8s_manifests_parse():
    objs = _mlflow_k8s()
    assert {("Namespace", "mlflow"), ("Service", "mlflow"), ("Deployment", "mlflow"),
            ("PersistentVolumeClaim", "mlflow-artifacts"), ("StatefulSet", "postgres"),
            ("Service", "postgres")} <= set(objs)
    for (kind, name), d in objs.items():
        if kind != "Namespace":
            assert d["metadata"].get("namespace") == "mlflow", (kind, name)
    # The database password is created with kubectl, never shipped as a Secret.
    assert not [k for k in objs if k[0] == "Secret"]
    for kind in ("Deployment", "StatefulSet"):
        for (k, name), d in objs.items():
            if k == kind:
                assert d["spec"]["selector"]["matchLabels"].items() <= \
                    d["spec"]["template"]["metadata"]["labels"].items(), name


def test_mlflow_service_matches_ray_tracking_uri():
    from urllib.parse import urlsplit

    uris = _tracking_uris()
    assert uris == {"http://mlflow.mlflow.svc.cluster.local:5000"}
    (uri,) = uris
    u = urlsplit(uri)
    svc_name, namespace, *rest = u.hostname.split(".")
    assert rest == ["svc", "cluster", "local"]
    objs = _mlflow_k8s()
    svc = objs[("Service", svc_name)]
    assert svc["metadata"]["namespace"] == namespace
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"   # no LoadBalancer/NodePort
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == u.port]

    # The Service reaches the server's container port, and that is --port.
    dep = objs[("Deployment", "mlflow")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = _pod_spec(dep)["containers"]
    target = port.get("targetPort", port["port"])
    (cport,) = [p for p in c["ports"] if target in (p.get("name"), p["containerPort"])]
    cmd = c.get("command", []) + c.get("args", [])
    assert int(_arg(cmd, "--port")) == cport["containerPort"]
    assert _arg(cmd, "--host") == "0.0.0.0"


# Importing MLflow's CLI loads its SQLAlchemy store, which warns about its own code.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_server_args_hosts_backend_and_artifacts(monkeypatch):
    import click
    from mlflow.cli import cli as mlflow_cli
    from mlflow.server.security_utils import is_allowed_host_header, is_health_endpoint

    objs = _mlflow_k8s()
    dep = objs[("Deployment", "mlflow")]
    pod = _pod_spec(dep)
    (c,) = pod["containers"]
    cmd = c.get("command", []) + c.get("args", [])
    assert cmd[:2] == ["mlflow", "server"]

    # Host headers: the in-cluster name the Ray pods use, and port-forward's.
    allowed = _arg(cmd, "--allowed-hosts").split(",")
    assert "*" not in allowed
    (uri,) = _tracking_uris()
    in_cluster = uri.split("://", 1)[1].rstrip("/")
    for host in (in_cluster, "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    # kubelet probes send the pod IP as Host: only MLflow's exempt paths work.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert is_health_endpoint(c[probe]["httpGet"]["path"]), probe

    # Artifacts served by the server from a PVC: jobs need no cloud credentials.
    assert "--serve-artifacts" in cmd and "--no-serve-artifacts" not in cmd
    dest = _arg(cmd, "--artifacts-destination")
    vols = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == dest]
    claim = vols[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objs
    assert dep["spec"]["strategy"]["type"] == "Recreate"   # RWO volume, one writer

    # Backend: PostgreSQL; the password only through a secretKeyRef.
    env = c["env"]
    names = [e["name"] for e in env]
    pw = env[names.index("POSTGRES_PASSWORD")]
    assert "value" not in pw
    ref = pw["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("mlflow-postgres", "password") and not ref.get("optional")
    raw = env[names.index("MLFLOW_BACKEND_STORE_URI")]["value"]
    assert raw.startswith("postgresql://") and ":$(POSTGRES_PASSWORD)@" in raw
    # Kubernetes expands $(VAR) only from variables listed before it.
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    resolved = _expand_env(env, {("mlflow-postgres", "password"): "0123abcd"})
    backend = resolved["MLFLOW_BACKEND_STORE_URI"]
    m = re.fullmatch(r"postgresql://(\w+):0123abcd@([\w.-]+):(\d+)/(\w+)", backend)
    assert m, backend
    user, host, pg_port, db = m.groups()

    # ... and it points at the PostgreSQL the manifests create, with its user/db/secret.
    pg_svc_name, pg_ns = host.split(".")[:2]
    assert (pg_svc_name, pg_ns) == ("postgres", "mlflow")
    pg_svc = objs[("Service", pg_svc_name)]
    assert int(pg_port) in [p["port"] for p in pg_svc["spec"]["ports"]]
    sts = objs[("StatefulSet", "postgres")]
    assert pg_svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (pg,) = _pod_spec(sts)["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == user and pg_env["POSTGRES_DB"]["value"] == db
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert sts["spec"]["volumeClaimTemplates"]

    # The pinned MLflow's own CLI accepts the arguments and reads the backend
    # URI from that variable (parsing only, nothing starts).
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", backend)
    ctx = mlflow_cli.commands["server"].make_context("server", list(cmd[2:]))
    assert ctx.params["backend_store_uri"] == backend
    assert ctx.params["port"] == 5000 and ctx.params["serve_artifacts"] is True
    assert ctx.params["artifacts_destination"] == dest
    # A Service named `mlflow` makes Kubernetes inject MLFLOW_PORT=tcp://...,
    # which this CLI reads as --port: service links must be off.
    port_opt = [p for p in mlflow_cli.commands["server"].params if p.name == "port"][0]
    assert port_opt.envvar == "MLFLOW_PORT" and isinstance(port_opt.type, click.types.IntParamType)
    assert pod["enableServiceLinks"] is False


def test_mlflow_k8s_images_match_pins_and_compose():
    objs = _mlflow_k8s()
    comp = yaml.safe_load((MLFLOW_DIR / "docker-compose.yaml").read_text())["services"]
    (c,) = _pod_spec(objs[("Deployment", "mlflow")])["containers"]
    assert c["image"] == comp["mlflow"]["image"] == f"privimage-mlflow:{REQ['mlflow']}"
    dockerfile = (MLFLOW_DIR / "Dockerfile").read_text()
    assert re.search(rf"^FROM ghcr\.io/mlflow/mlflow:v{re.escape(REQ['mlflow'])}\s*$", dockerfile, re.M)
    assert re.search(r"pip install [^\n]*psycopg2-binary==\d", dockerfile)
    # The build context holds .env (real credentials): keep it out.
    ignore = (MLFLOW_DIR / ".dockerignore").read_text().split()
    assert "*" in ignore or ".env" in ignore
    # PostgreSQL: the compose file's major version everywhere.
    pg_images = {x["image"] for (kind, _), d in objs.items() if kind in ("Deployment", "StatefulSet")
                 for x in _pod_spec(d)["containers"] + _pod_spec(d).get("initContainers", [])
                 if x["image"].startswith("postgres")}
    assert pg_images == {comp["postgres"]["image"]} == {"postgres:15"}


# ------------------------------------------------------ PodMonitor (KubeRay)
def _kuberay_pod_labels(template_labels: dict, node_type: str, cluster: str, group: str) -> dict:
    """The labels KubeRay puts on a Ray pod (labelPod in KubeRay's
    ray-operator/controllers/ray/common/pod.go): its own, with the template's
    labels on top except ray.io/node-type, ray.io/group and ray.io/cluster."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    fixed = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    labels.update({k: v for k, v in (template_labels or {}).items() if k not in fixed})
    return labels


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions)."""
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in vals,
              "NotIn": key not in labels or labels[key] not in vals,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_label_selector_helper():
    sel = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "t", "operator": "In",
                                                          "values": ["head", "worker"]}]}
    assert _selects(sel, {"a": "1", "t": "head"})
    assert not _selects(sel, {"a": "1"}) and not _selects(sel, {"a": "2", "t": "worker"})
    assert _kuberay_pod_labels({"ray.io/node-type": "x", "k": "v"}, "head", "c", "headgroup")[
        "ray.io/node-type"] == "head"


def test_podmonitor_selects_kuberay_pods_on_declared_metrics_port():
    docs = [d for d in yaml.safe_load_all(PODMONITOR.read_text()) if d]
    (pm,) = docs
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    # Same namespace as the Ray pods (the KubeRay manifests set none either).
    assert "namespace" not in pm["metadata"] and "namespaceSelector" not in pm["spec"]
    sel = pm["spec"]["selector"]
    keys = set(sel.get("matchLabels", {})) | {e["key"] for e in sel.get("matchExpressions", [])}
    assert keys & {"ray.io/node-type", "ray.io/cluster"}, "select by KubeRay's labels"
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e.get("path", "/metrics") == "/metrics" for e in endpoints)

    # RayCluster `privimage`; a RayJob's cluster is `<rayjob name>-<5 random chars>`.
    (job,) = _docs("rayjob.yaml")
    for name, cluster in (("raycluster.yaml", "privimage"),
                          ("rayjob.yaml", f"{job['metadata']['name']}-x7k2p")):
        spec = _cluster_spec(name)
        groups = [("head", "headgroup", spec["headGroupSpec"])] + [
            ("worker", g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for node_type, group, g in groups:
            tmpl = g["template"]
            labels = _kuberay_pod_labels(tmpl["metadata"].get("labels"), node_type, cluster, group)
            assert _selects(sel, labels), (name, node_type)
            metrics_port = int(g["rayStartParams"]["metrics-export-port"])
            declared = {p.get("name"): p["containerPort"]
                        for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
            for e in endpoints:
                port = e.get("port", e.get("targetPort"))
                number = declared.get(port) if isinstance(port, str) else port
                assert number == metrics_port == 8080, (name, node_type, port)

    # Not the MLflow/PostgreSQL pods, not the RayJob submitter (no node type),
    # not Ray pods of some other KubeRay cluster.
    for (kind, _), d in _mlflow_k8s().items():
        if kind in ("Deployment", "StatefulSet"):
            assert not _selects(sel, d["spec"]["template"]["metadata"]["labels"])
    assert not _selects(sel, {"app.kubernetes.io/name": "privimage", "batch.kubernetes.io/job-name": "x"})
    assert not _selects(sel, _kuberay_pod_labels({}, "worker", "other", "gpu"))

    relabel = {r["targetLabel"]: r["sourceLabels"] for e in endpoints for r in e.get("relabelings", [])}
    assert relabel.get("ray_io_cluster") == ["__meta_kubernetes_pod_label_ray_io_cluster"]


# --------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_exact_requirements():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*requirements\.txt", text, re.M)
    assert re.search(r"pip install [^\n]*-r requirements\.txt", text)
    assert re.search(r"pip install [^\n]*--no-deps -e \.", text)
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py311-gpu", text, re.M)
    assert base and base.group(1) == REQ["ray"]
    # Packages pinned outside requirements.txt would fight its pins.
    for m in re.finditer(r"\b([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([0-9][^\s'\"]*)", text):
        name = m.group(1).lower()
        if name in REQ:
            assert m.group(3) == REQ[name], f"Dockerfile pins {name}=={m.group(3)}"
        assert name not in PINNED or name in REQ


def test_dockerfile_has_setup_sh_debian_packages():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    block = re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1)
    pkgs = block.split()
    assert "dataset-fashion-mnist" in pkgs
    text = DOCKERFILE.read_text()
    missing = [p for p in pkgs if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]
    assert not missing, f"Dockerfile lacks {missing}"


def _pin_mentions() -> list[tuple[Path, str, str]]:
    files = [ROOT / "ray_cluster.yaml", ROOT / "README.md"]
    files += [p for p in DEPLOY.rglob("*") if p.is_file()]
    out = []
    for f in files:
        if not f.exists():
            continue
        for m in re.finditer(r"\b(ray|torch|torchvision|mlflow|opacus)(\[[^\]]*\])?==([0-9][\w.+-]*)",
                             f.read_text(errors="ignore")):
            out.append((f, m.group(1), m.group(3)))
    return out


def test_version_mentions_agree_with_requirements():
    for f, pkg, ver in _pin_mentions():
        assert ver == REQ[pkg], f"{f.relative_to(ROOT)} says {pkg}=={ver}, requirements.txt {REQ[pkg]}"
    # image tags that carry versions
    for f in DEPLOY.rglob("*"):
        if f.is_file():
            for ver in re.findall(r"rayproject/ray:([0-9][\w.]*?)-py", f.read_text(errors="ignore")):
                assert ver == REQ["ray"], f
            for ver in re.findall(r"ghcr\.io/mlflow/mlflow:v([0-9][\w.]*)", f.read_text(errors="ignore")):
                assert ver == REQ["mlflow"], f
            for ver in re.findall(r"privimage-mlflow:([0-9][\w.]*[0-9])", f.read_text(errors="ignore")):
                assert ver == REQ["mlflow"], f


# ------------------------------------------------------------------ secrets
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                          # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*\S+"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),              # GitHub tokens
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),              # Slack tokens
    re.compile(r"\"type\"\s*:\s*\"service_account\""),        # GCP key file
]
# `$(...)`: a shell command substitution or a Kubernetes $(VAR) reference.
PLACEHOLDER = re.compile(r"^(\$\{[^}]*\}|\$\$?\{?\w+\}?|\$\(.*|changeme|\.\.\.|<[^>]*>|)$")
# `${NAME:?msg}` is an interpolation, not an assignment: skip keys after "{".
ASSIGN = re.compile(r"(?i)(?<!\{)\b(\w*(?:password|passwd|secret|token|api_key|apikey)\w*)\s*[:=]\s*['\"]?([^\s'\"#,]*)")
URL_CRED = re.compile(r"://([^:/@\s]+):([^@\s]+)@")


def _scanned_files() -> list[Path]:
    files = [ROOT / "ray_cluster.yaml"] + [p for p in DEPLOY.rglob("*") if p.is_file()]
    # A local, git-ignored .env is where real credentials belong.
    return [f for f in files if f.name != ".env"]


def test_no_secrets_in_deploy_files():
    problems = []
    for f in _scanned_files():
        text = f.read_text(errors="ignore")
        rel = f.relative_to(ROOT)
        for pat in SECRET_PATTERNS:
            if pat.search(text):
                problems.append(f"{rel}: matches {pat.pattern}")
        for m in ASSIGN.finditer(text):
            key, val = m.group(1), m.group(2)
            if key.lower().endswith(("_ref", "keyref")) or val.endswith(":"):
                continue
            if val.startswith(("~/", "/")):  # a path to a file kept outside the repo
                continue
            if val.lower() in {"true", "false"}:  # a switch (automountServiceAccountToken: false)
                continue
            if not PLACEHOLDER.match(val) and not val.startswith("${"):
                problems.append(f"{rel}: {key} = {val!r}")
        for m in URL_CRED.finditer(text):
            if not m.group(2).startswith(("${", "$(")):
                problems.append(f"{rel}: credentials in URL ({m.group(1)}:***)")
    assert not problems, "\n".join(problems)


def test_secret_scan_catches_examples(tmp_path):
    """The scanner itself flags the obvious cases."""
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert SECRET_PATTERNS[0].search(f"key: {fake_key}")
    for line in ("POSTGRES_PASSWORD=hunter2", "password: hunter", "api_token: 'abc123'"):
        m = ASSIGN.search(line)
        assert m and not PLACEHOLDER.match(m.group(2)), line
    assert not ASSIGN.search("${POSTGRES_PASSWORD:?set it in .env}")
    assert PLACEHOLDER.match("changeme") and PLACEHOLDER.match("${POSTGRES_PASSWORD}")
    assert URL_CRED.search("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert PLACEHOLDER.match("$(POSTGRES_PASSWORD)") and not PLACEHOLDER.match("hunter2$(X)")
