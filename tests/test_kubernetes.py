"""The Kubernetes manifests and the compose file: valid, and in step with the image, the spec and the code.

Every manifest is checked offline against the Kubernetes schemas (kubernetes-validate ships
them), strictly, so a misspelt field fails. Then what they say is compared with what the
service is: the Dockerfile's port, user and command, the spec's x-deployment, the settings the
code reads and the commands the CLI has.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography.fernet import Fernet

from email_service.cli import build_parser
from email_service.config import load_settings
from email_service.models import TaskKind
from email_service.queue.policy import policy

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
MAIL_PORTS = {993, 995, 143, 110, 587, 465, 25}
SPEC = yaml.safe_load((REPO / "spec" / "openapi.yaml").read_text())
DEPLOYMENT = SPEC["x-deployment"]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


BASE = {
    (doc["kind"], doc["metadata"]["name"]): doc
    for path in _manifests()
    if path.parent.name == "base"
    for doc in _documents(path)
}
WORKLOADS = {name: doc for (kind, name), doc in BASE.items() if kind in ("Deployment", "Job")}
CONFIG = BASE[("ConfigMap", "email-service-config")]["data"]
SECRET = BASE[("Secret", "email-service-secrets")]["stringData"]


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _code_reads(name: str) -> bool:
    pattern = re.compile(rf"[\"']{re.escape(name)}[\"']")
    return any(pattern.search(p.read_text()) for p in (REPO / "email_service").rglob("*.py"))


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in _documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomizations_name_every_manifest_and_only_existing_ones() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        for entry in listed:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
        here = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert here <= set(listed), f"{kustomization} leaves out {here - set(listed)}"


def test_the_api_is_what_x_deployment_and_the_dockerfile_say() -> None:
    api = WORKLOADS["email-service-api"]
    container = _container(api)
    kubernetes = DEPLOYMENT["kubernetes"]
    assert api["spec"]["replicas"] == kubernetes["replicas"]
    assert container["resources"] == kubernetes["resources"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == DEPLOYMENT["docker"]["port"]
    assert f"EXPOSE {ports['http']}" in DOCKERFILE
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": DEPLOYMENT["docker"]["healthCheck"], "port": "http"}
    assert f"127.0.0.1:{ports['http']}{DEPLOYMENT['docker']['healthCheck']}" in DOCKERFILE
    # The image's own command serves the API on that port.
    assert "command" not in container and "args" not in container
    assert f'CMD ["email-service", "serve", "--host", "0.0.0.0", "--port", "{ports["http"]}"]' in DOCKERFILE
    # Graceful shutdown: out of the endpoints first, then uvicorn's SIGTERM drain.
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5
    hpa = BASE[("HorizontalPodAutoscaler", "email-service-api")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "email-service-api" and hpa["minReplicas"] == kubernetes["replicas"]
    pdb = BASE[("PodDisruptionBudget", "email-service-api")]["spec"]
    assert pdb["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    service = BASE[("Service", "email-service-api")]["spec"]
    assert service["selector"] == api["spec"]["selector"]["matchLabels"]


def test_every_workload_runs_a_command_of_the_cli_from_the_one_image_as_the_images_user() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - the parser's own list
    image = DEPLOYMENT["docker"]["image"].split(":")[0]
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1)
    expected = {
        "email-service-worker": "worker",
        "email-service-watcher": "watch",
        "email-service-webhooks": "webhooks",
        "email-service-migrate": "migrate",
    }
    for name, command in expected.items():
        args = _container(WORKLOADS[name])["args"]
        assert args == ["email-service", command] and command in commands, name
    for name, workload in WORKLOADS.items():
        pod = workload["spec"]["template"]["spec"]
        container = _container(workload)
        assert container["image"].split(":")[0] == image, name
        assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == uid
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        # What the service writes (metrics files) lies on a writable volume.
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for setting in ("PROMETHEUS_MULTIPROC_DIR", "EMAIL_SERVICE_DATA_DIR"):
            assert any(CONFIG[setting].startswith(m + "/") for m in mounts), (name, setting)
        sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
        assert sources == {"email-service-config", "email-service-secrets"}, name
        if workload["kind"] == "Deployment":
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == int(CONFIG["EMAIL_SERVICE_METRICS_PORT"]), name


def test_the_environment_is_settings_the_code_reads_and_they_load() -> None:
    for name in [*CONFIG, *SECRET]:
        assert _code_reads(name), f"{name} is set in the manifests but read nowhere"
    for required in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "CREDENTIAL_KEYS", "MINIO_ACCESS_KEY"):
        assert required in SECRET and required not in CONFIG
    real = {**SECRET, "JWT_SECRET": "j" * 40, "CREDENTIAL_KEYS": Fernet.generate_key().decode()}
    settings = load_settings({**CONFIG, **real})
    assert settings.metrics_port == 9100 and settings.log_format == "json" and settings.metrics_token
    overlay = (K8S / "overlays" / "production" / "secrets.env.example").read_text()
    assert {line.split("=", 1)[0] for line in overlay.splitlines() if line} == set(SECRET)


def _egress_ports(network_policy: dict) -> set[int]:
    return {
        p["port"] for rule in network_policy["spec"]["egress"] for p in rule.get("ports", []) if p["protocol"] == "TCP"
    }


def _compose_seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return sum(int(value or 0) * unit for value, unit in zip(parts.groups(), units.values(), strict=True))


def test_a_stopping_worker_is_given_the_time_a_send_may_take() -> None:
    # SIGTERM lets each worker process finish its job. A send cut off after its data went out
    # is ambiguous for good (its user must decide whether to send it again), so a worker is
    # killed no sooner than a send that has just begun may take; the scheduler's stop on top.
    real = {**SECRET, "JWT_SECRET": "j" * 40, "CREDENTIAL_KEYS": Fernet.generate_key().decode()}
    send_limit = policy(TaskKind.SEND, load_settings({**CONFIG, **real})).timeout
    worker = WORKLOADS["email-service-worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= send_limit + 30
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert _compose_seconds(compose["worker"].get("stop_grace_period", "10s")) >= send_limit + 30


def test_network_policies_let_only_workers_and_watchers_reach_mail_servers() -> None:
    component = "app.kubernetes.io/component"
    policies = {
        doc["spec"]["podSelector"]["matchLabels"][component]: doc
        for (kind, _), doc in BASE.items()
        if kind == "NetworkPolicy"
    }
    components = {w["spec"]["template"]["metadata"]["labels"][component] for w in WORKLOADS.values()}
    assert set(policies) == components
    for name in ("worker", "watcher"):
        assert _egress_ports(policies[name]) >= MAIL_PORTS
    for name in ("api", "webhooks", "migrate"):
        assert not MAIL_PORTS & _egress_ports(policies[name]), name
    assert _egress_ports(policies["migrate"]) == {5432, 53}
    assert {5432, 6379} <= _egress_ports(policies["api"])


def test_compose_runs_the_same_processes() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, workload in WORKLOADS.items():
        args = _container(workload).get("args")
        if workload["kind"] == "Job":
            continue
        wanted = args or ["email-service", "serve"]
        assert any(s.get("command", [])[: len(wanted)] == wanted for s in compose.values()), name
    for service in compose.values():
        if service.get("image", "").startswith(DEPLOYMENT["docker"]["image"].split(":")[0]):
            for name in service["environment"]:
                assert _code_reads(name), name
