"""Every YAML in deploy/ validates against the schema it is written for, and they agree.

- Serve configs: Serve's own ServeDeploySchema plus our settings models (services.local.validate,
  which `latentwire serve --config` runs first);
- KubeRay manifests (RayService, RayJob): pydantic models of the CRD fields used (ray.io/v1);
  the RayService's serveConfigV2 is parsed and validated as a Serve config;
- the cluster launcher YAML: Ray's own prepare_config + validate_config (what `ray up` runs) and
  a pydantic model of the fields used.
Cross-checks: every replica's GPU and custom resources fit some worker group / node type; auth is
on with the token from a Secret; the training jobs' commands parse with the real CLI and write
the weights the Serve config loads. The control plane is closed: Ray's token auth from a Secret on
every Ray pod, the dashboard never on a public address, NetworkPolicies that admit only gRPC from
outside, read-only weights, non-root pods without privileges on a read-only root filesystem.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services import local

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALL_YAML = sorted(DEPLOY.glob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in ALL_YAML for d in docs(p) if d.get("kind") == kind]


def serve_configs() -> list[Path]:
    return [p for p in ALL_YAML if "applications" in docs(p)[0]]


# ---- pydantic models of the KubeRay CRD fields we use (ray.io/v1) --------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EnvVar(_Strict):
    name: str
    value: str | None = None
    valueFrom: dict | None = None


class Container(_Loose):
    name: str
    image: str
    resources: dict[str, dict[str, str | int]] = {}
    env: list[EnvVar] = []
    ports: list[dict] = []
    securityContext: dict = {}
    volumeMounts: list[dict] = []


class PodSpec(_Loose):
    containers: list[Container] = Field(min_length=1)
    securityContext: dict = {}
    volumes: list[dict] = []


class PodTemplate(_Strict):
    metadata: dict | None = None
    spec: PodSpec


class RayStartParams(BaseModel):
    """KubeRay passes these to `ray start` as strings; `resources` is a quoted JSON object."""

    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _strings(cls, v):
        if not isinstance(v, str):
            raise ValueError(f"rayStartParams values must be strings, got {v!r}")
        return v

    def custom_resources(self) -> dict[str, float]:
        raw = (self.model_extra or {}).get("resources")
        return json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"')) if raw else {}

    def gpus(self) -> float:
        return float((self.model_extra or {}).get("num-gpus", 0))


class HeadGroupSpec(_Strict):
    rayStartParams: RayStartParams
    template: PodTemplate
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None


class WorkerGroupSpec(_Strict):
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=1)
    rayStartParams: RayStartParams
    template: PodTemplate

    def model_post_init(self, _ctx) -> None:
        if not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"{self.groupName}: need minReplicas <= replicas <= maxReplicas")


class AuthOptions(_Strict):
    """KubeRay v1.5.1+ (`secretName` v1.6+): Ray's token authentication, managed by the operator."""

    mode: Literal["disabled", "token"]
    secretName: str | None = None
    enableK8sTokenAuth: bool | None = None


class RayClusterSpec(_Strict):
    rayVersion: str
    enableInTreeAutoscaling: bool | None = None
    authOptions: AuthOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(min_length=1)


class Metadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)  # DNS-1123 label
    namespace: str | None = None
    labels: dict[str, str] = {}


class RayServiceSpec(_Strict):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec

    @field_validator("serveConfigV2")
    @classmethod
    def _serve_config(cls, v: str) -> str:
        local.validate(yaml.safe_load(v))  # a real Serve config, with our settings
        return v


class RayService(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


class RayJobSpec(_Strict):
    entrypoint: str = Field(min_length=1)
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    shutdownAfterJobFinishes: bool = False
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    activeDeadlineSeconds: int | None = Field(None, gt=0)
    backoffLimit: int | None = Field(None, ge=0)
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    runtimeEnvYAML: str | None = None
    submitterPodTemplate: PodTemplate | None = None
    rayClusterSpec: RayClusterSpec


class RayJob(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


# ---- pydantic model of the launcher fields we use -----------------------------------------------
class NodeType(_Strict):
    node_config: dict[str, Any]
    resources: dict[str, float]
    min_workers: int = Field(0, ge=0)
    max_workers: int | None = Field(None, ge=0)


class Launcher(_Strict):
    cluster_name: str
    max_workers: int = Field(ge=0)
    upscaling_speed: float = Field(gt=0)
    idle_timeout_minutes: float = Field(gt=0)
    provider: dict[str, Any]
    auth: dict[str, str]
    available_node_types: dict[str, NodeType]
    head_node_type: str
    setup_commands: list[str]
    head_start_ray_commands: list[str]
    worker_start_ray_commands: list[str]

    def model_post_init(self, _ctx) -> None:
        if self.head_node_type not in self.available_node_types:
            raise ValueError("head_node_type must be one of available_node_types")


# ---- helpers ---------------------------------------------------------------------------------------
def replica_demands(cfg: dict) -> dict[str, dict[str, float]]:
    """app -> the GPU and custom resources one replica asks for."""
    out = {}
    for app in local.validate(cfg).applications:
        opts = app.deployments[0].ray_actor_options
        out[app.name] = {"GPU": opts.num_gpus or 0, **(opts.resources or {})}
    return out


def fits(demand: dict[str, float], supply: dict[str, float]) -> bool:
    return all(supply.get(k, 0) >= v for k, v in demand.items() if v)


def cli_commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part)[1:] for part in entrypoint.split("&&") if part.strip().startswith("latentwire ")]


def ray_manifests(kind: str) -> list[tuple[str, Any, RayClusterSpec]]:
    """(name, validated spec, its Ray cluster) of every RayService or RayJob."""
    model = RayService if kind == "RayService" else RayJob
    out = []
    for _, d in by_kind(kind):
        spec = model.model_validate(d).spec
        out.append((d["metadata"]["name"], spec, spec.rayClusterConfig if kind == "RayService" else spec.rayClusterSpec))
    return out


def pod_templates(kind: str) -> list[PodTemplate]:
    """Every pod template of the RayServices or RayJobs: head, worker groups, job submitter."""
    out = []
    for _, spec, cluster in ray_manifests(kind):
        out += [cluster.headGroupSpec.template] + [g.template for g in cluster.workerGroupSpecs]
        if getattr(spec, "submitterPodTemplate", None) is not None:
            out.append(spec.submitterPodTemplate)
    return out


CLUSTER = local.load_config(DEPLOY / "cluster-gpu.yaml")


# ---- Serve configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", serve_configs(), ids=lambda p: p.name)
def test_latentwire_serve_accepts_every_serve_config(path):
    from latentwire.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", str(path)])
    schema = local.validate(local.load_config(args.config))  # what `latentwire serve` runs before deploying
    assert {a.name for a in schema.applications} >= {"source", "target", "bridge"}
    assert local.grpc_address(local.load_config(path)).endswith(":9000")


def test_cluster_config_runs_the_production_pair_on_gpus_with_auth_on():
    apps = {a["name"]: a for a in CLUSTER["applications"]}
    assert apps["source"]["args"]["profile"] == "llama-3.1-8b"
    assert apps["target"]["args"]["profile"] == "mistral-7b-v0.3"
    demands = replica_demands(CLUSTER)
    assert demands["source"]["GPU"] == demands["target"]["GPU"] == 1
    assert 0 < demands["bridge"]["GPU"] < 1  # fractional
    assert CLUSTER["grpc_options"]["enable_reflection"] is False  # no schema for anonymous callers
    for app in CLUSTER["applications"]:
        assert app["args"]["auth"]["required"] is True
        assert app["args"]["device"] == "cuda"
        dep = app["deployments"][0]
        assert dep["max_ongoing_requests"] > 0 and dep["max_queued_requests"] > 0  # explicit concurrency limits
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and "num_replicas" not in dep
    for name in ("source", "target"):  # a burst of long prompts runs as several forwards, not one huge one
        args = apps[name]["args"]
        assert args["limits"]["max_context_tokens"] <= args["max_batch_tokens"] <= 8 * args["limits"]["max_context_tokens"]


def test_cluster_config_typos_and_bad_placements_are_refused():
    bad = yaml.safe_load(yaml.safe_dump(CLUSTER))
    bad["applications"][2]["args"]["auth"]["requird"] = True
    with pytest.raises(ValidationError, match="requird"):
        local.validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(CLUSTER))
    bad["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = -1
    with pytest.raises(ValidationError):
        local.validate(bad)


# ---- KubeRay ---------------------------------------------------------------------------------------
def test_rayservice_validates_and_serves_exactly_the_cluster_config():
    (path, doc), = by_kind("RayService")
    svc = RayService.model_validate(doc)
    assert yaml.safe_load(svc.spec.serveConfigV2) == CLUSTER  # no drift between the two files


def test_rayservice_worker_groups_can_place_every_replica():
    (_, doc), = by_kind("RayService")
    cluster = RayService.model_validate(doc).spec.rayClusterConfig
    head = cluster.headGroupSpec.rayStartParams
    supplies = {g.groupName: {"GPU": g.rayStartParams.gpus(), **g.rayStartParams.custom_resources()}
                for g in cluster.workerGroupSpecs}
    for g in cluster.workerGroupSpecs:  # Ray's GPU count matches the pod's nvidia.com/gpu limit
        limit = g.template.spec.containers[0].resources["limits"].get("nvidia.com/gpu", 0)
        assert float(limit) == g.rayStartParams.gpus(), g.groupName
    for app, demand in replica_demands(CLUSTER).items():
        assert not fits(demand, {"GPU": head.gpus(), **head.custom_resources()}), f"{app} would land on the head"
        assert [n for n, s in supplies.items() if fits(demand, s)], f"no worker group fits {app}: {demand}"


def test_every_pod_gets_both_tokens_from_separate_secrets_and_the_proxy_message_cap():
    (_, doc), = by_kind("RayService")
    cluster = RayService.model_validate(doc).spec.rayClusterConfig
    auths = [a["args"]["auth"] for a in CLUSTER["applications"]]
    assert all(a == auths[0] for a in auths)  # every app checks the same two variables
    token_env, internal_env = auths[0]["token_env"], auths[0]["internal_token_env"]
    assert token_env != internal_env
    max_bytes = max(a["args"]["limits"]["max_message_bytes"] for a in CLUSTER["applications"])
    for tmpl in [cluster.headGroupSpec.template] + [g.template for g in cluster.workerGroupSpecs]:
        env = {e.name: e for e in tmpl.spec.containers[0].env}
        refs = []
        for name in (token_env, internal_env):
            assert env[name].value is None and "secretKeyRef" in env[name].valueFrom  # never inline
            refs.append(env[name].valueFrom["secretKeyRef"]["name"])
        # the internal token is a Secret of its own: whoever may read the clients' token cannot call
        # the bridge and target, nor sign packets
        assert refs[0] != refs[1] and cluster.authOptions.secretName not in refs
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"].value) >= max_bytes
        assert env["HF_HUB_OFFLINE"].value == "1"


def test_grpc_service_exposes_port_9000_of_the_serve_pods():
    (_, svc), = by_kind("Service")
    selector = svc["spec"]["selector"]
    assert svc["apiVersion"] == "v1" and selector["ray.io/serve"] == "true"
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [CLUSTER["grpc_options"]["port"]]
    # tight: it selects the RayService's pods (once KubeRay marks their proxy healthy) and no job's pod
    serving = [{**t.metadata["labels"], "ray.io/serve": "true"} for t in pod_templates("RayService")]
    assert serving and all(selector.items() <= labels.items() for labels in serving)
    assert not [t for t in pod_templates("RayJob")
                if {k: v for k, v in selector.items() if k != "ray.io/serve"}.items() <= t.metadata["labels"].items()]


@pytest.mark.parametrize("name", ["latentwire-train-bridge", "latentwire-train-sidecar"])
def test_rayjobs_validate_and_their_commands_parse_with_the_real_cli(name):
    from latentwire.cli import build_parser

    (_, doc), = [(p, d) for p, d in by_kind("RayJob") if d["metadata"]["name"] == name]
    job = RayJob.model_validate(doc)
    commands = cli_commands(job.spec.entrypoint)
    assert commands and all(c[0] in ("train", "collect-trajectories") for c in commands)
    parser, parsed = build_parser(), []
    for argv in commands:
        try:
            parsed.append(parser.parse_args(argv))
        except SystemExit:
            if argv[:2] == ["train", "sidecar"] or argv[0] == "collect-trajectories":
                pytest.skip("compression's commands are not importable in this checkout")
            raise AssertionError(f"the CLI refuses: latentwire {shlex.join(argv)}") from None
    train = [a for a in parsed if a.command == "train"]
    assert train and all(a.use_gpu for a in train)  # GPU training on the cluster
    gpus = sum(g.rayStartParams.gpus() * g.replicas for g in job.spec.rayClusterSpec.workerGroupSpecs)
    for a in train:
        workers = getattr(a, "num_workers", None) or getattr(a, "workers", None)
        assert workers and gpus >= workers + (job.spec.entrypointNumGpus or 0) - 1e-9


def test_bridge_job_writes_the_bridge_the_cluster_serves_and_the_target_accepts():
    from latentwire.cli import build_parser

    (_, doc), = [(p, d) for p, d in by_kind("RayJob") if d["metadata"]["name"] == "latentwire-train-bridge"]
    a = build_parser().parse_args(cli_commands(doc["spec"]["entrypoint"])[0])
    apps = {x["name"]: x["args"] for x in CLUSTER["applications"]}
    assert (a.source, a.target) == (apps["source"]["profile"], apps["target"]["profile"])
    assert a.out == apps["bridge"]["weights"]
    assert a.layer == apps["source"]["source_layer"]
    assert f"{a.source}@{a.layer}->{a.target}/K{a.num_queries}" in apps["target"]["accepted_bridges"]


def test_a_manifest_with_a_wrong_kind_or_missing_field_is_refused():
    (_, doc), = by_kind("RayService")
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(ValidationError, match="apiVersion"):
        RayService.model_validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(doc))
    del bad["spec"]["rayClusterConfig"]["headGroupSpec"]
    with pytest.raises(ValidationError, match="headGroupSpec"):
        RayService.model_validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["serveConfigV2"] = bad["spec"]["serveConfigV2"].replace("profile: llama-3.1-8b", "profle: x")
    with pytest.raises(ValidationError, match="profle"):
        RayService.model_validate(bad)


# ---- cluster launcher -----------------------------------------------------------------------------
def launcher() -> dict:
    return local.load_config(DEPLOY / "cluster-launcher.yaml")


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))
    Launcher.model_validate(launcher())


def test_launcher_node_types_can_place_every_replica_and_carry_the_token():
    cfg = Launcher.model_validate(launcher())
    head = cfg.available_node_types[cfg.head_node_type].resources
    workers = {n: t.resources for n, t in cfg.available_node_types.items() if n != cfg.head_node_type}
    for app, demand in replica_demands(CLUSTER).items():
        assert not fits(demand, head), f"{app} would land on the head"
        assert any(fits(demand, s) for s in workers.values()), f"no node type fits {app}"
    auth = CLUSTER["applications"][0]["args"]["auth"]
    for cmds in (cfg.head_start_ray_commands, cfg.worker_start_ray_commands):
        start = next(c for c in cmds if "ray start" in c)
        for env in (auth["token_env"], auth["internal_token_env"]):  # inherited by every replica
            assert f"{env}=$(cat " in start
        assert "HF_HUB_OFFLINE=1" in start
    fetched = " ".join(cfg.setup_commands)  # each token from its own secret into its own file
    assert "latentwire/auth-token" in fetched and "latentwire/internal-token" in fetched
    assert "--autoscaling-config" in next(c for c in cfg.head_start_ray_commands if "ray start" in c)


def test_launcher_typo_is_refused_by_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = launcher()
    bad["available_node_types"]["llm_gpu"]["min_workrs"] = 1
    with pytest.raises(Exception, match="min_workrs"):
        validate_config(prepare_config(bad))


def test_the_manifests_run_the_image_the_dockerfile_builds_with_the_pinned_ray():
    import ray

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")  # the cluster runs the Ray we test with
    built = next(line.split()[-2] for line in dockerfile.splitlines() if "docker build" in line)
    images = {c.image for _, d in by_kind("RayService") + by_kind("RayJob")
              for tmpl in [d["spec"].get("rayClusterConfig") or d["spec"]["rayClusterSpec"]]
              for g in [tmpl["headGroupSpec"], *tmpl["workerGroupSpecs"]]
              for c in PodTemplate.model_validate(g["template"]).spec.containers}
    assert images == {built}
    versions = {(d["spec"].get("rayClusterConfig") or d["spec"]["rayClusterSpec"])["rayVersion"]
                for _, d in by_kind("RayService") + by_kind("RayJob")}
    assert versions == {ray.__version__}


# ---- the control plane is closed (docs/deploy.md, "Control plane") ------------------------------------
RAY_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions reads from its Secret


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_every_ray_pod_runs_rays_token_auth_with_the_token_from_a_secret(kind):
    clients_secret = {e.valueFrom["secretKeyRef"]["name"] for t in pod_templates("RayService")
                      for e in t.spec.containers[0].env if e.name == "LATENTWIRE_AUTH_TOKEN"}
    for name, _, cluster in ray_manifests(kind):
        auth = cluster.authOptions
        assert auth is not None and auth.mode == "token" and auth.secretName, name  # the operator knows the token
        assert auth.secretName not in clients_secret  # Ray's admin token is not the clients' token
        for tmpl in pod_templates(kind):
            for c in tmpl.spec.containers:
                env = {e.name: e for e in c.env}
                assert env["RAY_AUTH_MODE"].value == "token", (name, c.name)
                ref = env["RAY_AUTH_TOKEN"].valueFrom or {}
                assert env["RAY_AUTH_TOKEN"].value is None and ref.get("secretKeyRef") == {
                    "name": auth.secretName, "key": RAY_SECRET_KEY}, (name, c.name)


def test_launcher_runs_rays_token_auth_and_keeps_the_dashboard_on_localhost():
    cfg = Launcher.model_validate(launcher())
    fetch = next(c for c in cfg.setup_commands if "~/.ray/auth_token" in c)
    assert "secretsmanager get-secret-value" in fetch and "chmod 600 ~/.ray/auth_token" in fetch
    for cmds in (cfg.head_start_ray_commands, cfg.worker_start_ray_commands):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN=" not in start  # the token stays in the file
    head = next(c for c in cfg.head_start_ray_commands if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_launcher_weights_are_read_only_to_the_ray_processes():
    cfg = Launcher.model_validate(launcher())
    sync = next(c for c in cfg.setup_commands if "/mnt/models" in c and "s3 sync" in c)
    assert "chown -R root:root /mnt/models" in sync and "go-w" in sync  # Ray runs as ubuntu


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_the_dashboard_is_set_explicitly_and_never_exposed_by_a_service(kind):
    for name, _, cluster in ray_manifests(kind):
        head = cluster.headGroupSpec
        host = (head.rayStartParams.model_extra or {}).get("dashboard-host")
        # 127.0.0.1 would lock out the KubeRay operator, which drives the cluster through the
        # dashboard: it stays on the pod network, behind token auth and the NetworkPolicy below
        assert host in ("127.0.0.1", "0.0.0.0"), name
        assert head.serviceType in (None, "ClusterIP"), name
    for _, svc in by_kind("Service"):
        assert 8265 not in {p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]}


def policies_for(labels: dict[str, str]) -> list[dict]:
    return [d["spec"] for _, d in by_kind("NetworkPolicy")
            if d["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]


def rule_ports(rule: dict) -> set[int] | None:
    """The ports a rule admits; None: every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_network_policies_admit_only_grpc_from_outside_and_ray_traffic_between_ray_pods(kind):
    grpc_port = CLUSTER["grpc_options"]["port"]
    for d in (d for _, d in by_kind("NetworkPolicy")):
        assert d["apiVersion"] == "networking.k8s.io/v1" and "Ingress" in d["spec"]["policyTypes"]
    for tmpl in pod_templates(kind):
        labels = (tmpl.metadata or {}).get("labels", {})
        policies = policies_for(labels)
        assert policies, f"no NetworkPolicy selects the {kind} pods {labels}"
        for spec in policies:
            for rule in spec["ingress"]:
                peers, ports = rule.get("from"), rule_ports(rule)
                if not peers:  # open to every source: the gRPC port of the serving pods only
                    assert kind == "RayService" and ports == {grpc_port}, rule
                    continue
                for peer in peers:
                    if "namespaceSelector" in peer or "ipBlock" in peer:
                        # from another namespace: one named port each (operator -> dashboard, Prometheus -> metrics)
                        assert ports and len(ports) == 1 and grpc_port not in ports, rule
                    else:  # all ports only between the Ray pods of this kind
                        assert peer["podSelector"]["matchLabels"] == labels, rule
        dashboard_from = [p for s in policies for r in s["ingress"] if r.get("from") and rule_ports(r) == {8265}
                          for p in r["from"]]
        assert dashboard_from and all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                                      for p in dashboard_from)


def model_mounts(tmpl: PodTemplate) -> tuple[list[dict], dict]:
    pvc = {v["name"]: v for v in tmpl.spec.volumes if "persistentVolumeClaim" in v}
    return [m for c in tmpl.spec.containers for m in c.volumeMounts if m["name"] in pvc], pvc


def test_serving_pods_mount_the_weights_read_only():
    for tmpl in pod_templates("RayService"):
        mounts, pvc = model_mounts(tmpl)
        assert mounts and all(m.get("readOnly") is True for m in mounts)
        assert all(v["persistentVolumeClaim"].get("readOnly") is True for v in pvc.values())


def test_training_pods_write_only_their_outputs():
    for name, spec, cluster in ray_manifests("RayJob"):
        for tmpl in [cluster.headGroupSpec.template] + [g.template for g in cluster.workerGroupSpecs]:
            mounts, _ = model_mounts(tmpl)
            env = {e.name: e.value for e in tmpl.spec.containers[0].env}
            hf = [m for m in mounts if m["mountPath"] == env["HF_HOME"]]
            assert hf and hf[0].get("readOnly") is True, name  # the frozen models
            writable = [m["mountPath"] for m in mounts if not m.get("readOnly")]
            assert writable == ["/mnt/models/latentwire"], name
        outs = [a for argv in cli_commands(spec.entrypoint) for a in argv if a.startswith("/mnt/models/")]
        assert outs and all(o.startswith(("/mnt/models/latentwire/", "/mnt/models/hf")) for o in outs)


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_every_pod_runs_as_non_root_without_privileges_on_a_read_only_root(kind):
    for tmpl in pod_templates(kind):
        pod = tmpl.spec.securityContext
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0
        empty = {v["name"] for v in tmpl.spec.volumes if "emptyDir" in v}
        for c in tmpl.spec.containers:
            sc = c.securityContext
            assert sc.get("allowPrivilegeEscalation") is False, c.name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), c.name
            assert sc.get("readOnlyRootFilesystem") is True and not sc.get("privileged"), c.name
            # Ray's session dir, sockets and spilled objects live under /tmp: a writable emptyDir
            assert [m for m in c.volumeMounts if m["mountPath"] == "/tmp" and m["name"] in empty], c.name


def test_serves_grpc_options_cannot_choose_a_host():
    """Serve 2.60's gRPC proxy binds [::]:port (docs/deploy.md says so, and deploy/local.yaml's
    loopback binding holds for HTTP only): fail here once Serve can bind the gRPC proxy elsewhere,
    so that the local config then binds it to loopback."""
    from ray.serve.config import gRPCOptions

    assert "host" not in gRPCOptions.model_fields
    assert local.load_config()["http_options"]["host"] == "127.0.0.1"
