"""infra/ stays in step with the code: every command the compose file runs is an `agora`
sub-command with options it accepts, every AGORA_* variable is a real setting, and
Prometheus scrapes the path the API serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from coordinator.cli import COMMANDS
from coordinator.settings import CoordinatorSettings

INFRA = Path(__file__).resolve().parent.parent / "infra"


def test_compose_commands_and_settings_exist():
    doc = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = doc["services"]
    commands = [s["command"] for s in services.values() if "command" in s]
    assert len(commands) >= 5
    for cmd in commands:
        assert cmd[0] == "agora" and cmd[1] in COMMANDS, cmd
        if cmd[1] in ("serve", "worker"):
            try:
                COMMANDS[cmd[1]](cmd[2:] + ["--help"])
            except SystemExit as exc:  # argparse exits 0 after --help; 2 on an unknown option
                assert exc.code == 0, cmd
    env = doc["x-agora"]["environment"]
    fields = {f"AGORA_{name.upper()}" for name in CoordinatorSettings.model_fields}
    assert set(env) <= fields, set(env) - fields


def test_prometheus_scrapes_the_api_metrics_path():
    conf = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    targets = conf["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets and conf["scrape_configs"][0].get("metrics_path", "/metrics") == "/metrics"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_runs_migrations_first_checks_health_and_restarts():
    services = _compose()["services"]
    agora = {name: s for name, s in services.items() if s.get("command", [""])[0] == "agora"}
    for name, svc in agora.items():
        assert svc.get("restart") == ("no" if name == "migrate" else "unless-stopped"), name
        if name != "migrate":
            assert svc["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    for name in ("postgres", "redis", "api-1", "api-2"):
        assert services[name]["healthcheck"]["test"], name
    assert [n for n, s in agora.items() if "--beat" in s["command"]] == ["beat"]  # exactly one beat


def test_the_image_has_every_package_and_a_writable_home():
    docker = (INFRA / "Dockerfile").read_text()
    import tomllib

    include = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in include["include"]:
        pkg = pattern.rstrip("*")
        assert f"COPY {pkg} {pkg}" in docker, pkg
    assert "ENV AGORA_HOME=" in docker and "chown nobody" in docker  # the beat writes its schedule there


def test_docker_compose_accepts_the_file_where_docker_runs():
    import shutil
    import subprocess

    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        import pytest

        pytest.skip("no Docker engine here (tests above check the file's structure)")
    out = subprocess.run(["docker", "compose", "-f", str(INFRA / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, env={"AGORA_ADMIN_TOKEN": "x", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


def _k8s() -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / "agora.yaml").read_text()) if d]


def test_kubernetes_manifests_validate_against_the_bundled_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in _k8s():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = next(d for d in _k8s() if d["kind"] == "Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replicas": "two"}}
    import pytest

    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does bite
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_api_has_probes_an_hpa_and_one_beat_and_uses_real_commands_and_settings():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s()}
    api = docs[("Deployment", "agora-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz" and api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert docs[("HorizontalPodAutoscaler", "agora-api")]["spec"]["scaleTargetRef"]["name"] == "agora-api"
    assert docs[("Deployment", "agora-beat")]["spec"]["replicas"] == 1
    fields = {f"AGORA_{name.upper()}" for name in CoordinatorSettings.model_fields}
    env = {**docs[("ConfigMap", "agora-config")]["data"], **docs[("Secret", "agora-secrets")]["stringData"]}
    assert set(env) <= fields, set(env) - fields
    for (kind, _), d in docs.items():
        if kind in ("Deployment", "Job"):
            cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
            assert cmd[0] == "agora" and cmd[1] in COMMANDS, cmd
