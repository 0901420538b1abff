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


# ---------------------------------------------------------------- Grafana from code
GRAFANA = INFRA / "grafana"


def _grafana_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _registered_names() -> set[str]:
    """Every series name the code exposes: the process registry's samples (histogram
    _bucket/_sum/_count, counter _total) and the market collector's families, read from a
    fresh database with per-node series on."""
    import tempfile

    from prometheus_client.parser import text_string_to_metric_families

    from coordinator import metrics
    from coordinator.db import create_all, make_engine
    from coordinator.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        settings = CoordinatorSettings(home=Path(tmp), database_url=f"sqlite:///{tmp}/m.db",
                                       run_worker_in_process=False, metrics_per_node=True)
        engine = make_engine(settings.effective_database_url)
        create_all(engine)
        rt = Runtime(settings, engine=engine)
        try:
            text = metrics.render(rt).decode()
        finally:
            rt.stop()
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name + ("_total" if fam.type == "counter" else ""))  # a family without samples yet
        names.update(s.name for s in fam.samples)
    return names


def test_grafana_dashboards_are_generated_from_code():
    build = _grafana_build()
    committed = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert build.render() == committed, "run `python infra/grafana/build.py` and commit the result"


def test_grafana_dashboards_query_only_series_the_code_registers_and_have_grafana_shape():
    import json
    import re

    names = _registered_names()
    functions = {"sum", "max", "min", "rate", "by", "without", "histogram_quantile", "clamp_min", "le", "instance",
                 "job", "increase", "avg"}
    seen = set()
    uids = set()
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["uid"] not in uids, path
        uids.add(d["uid"])
        assert d["panels"], path
        for p in d["panels"]:
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["title"] and p["type"], (path, p)
            assert p["datasource"]["uid"] == "prometheus" and p["targets"], (path, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "prometheus" and t["refId"]
                expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", t["expr"])  # label matchers, strings, ranges
                for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                    if ident in functions or ident in ("e9", "e6"):
                        continue
                    if ident.startswith(("agora_", "process_")):
                        assert ident in names, (path.name, p["title"], ident)
                        seen.add(ident)
                    else:  # a label in by/without (...)
                        assert ident in {"model", "side", "quantile", "verdict", "reason", "status", "outcome",
                                         "engine", "region", "state", "kind", "path", "task", "result"}, ident
    for required in ("agora_ttft_seconds_bucket", "agora_inter_token_seconds_bucket", "agora_ask_price_nano_usd",
                     "agora_dispatch_batch_size_bucket", "agora_audits_total", "agora_nodes_routable",
                     "agora_ledger_volume_nano_usd_total", "agora_requests_total", "agora_task_failures_total",
                     "agora_queue_wait_seconds_bucket", "agora_settle_batch_size_bucket"):
        assert required in seen, required


def test_grafana_is_provisioned_next_to_prometheus_and_prometheus_scrapes_the_workers():
    services = _compose()["services"]
    volumes = " ".join(services["grafana"]["volumes"])
    for f in ("grafana/provisioning/datasources/prometheus.yml", "grafana/provisioning/dashboards/agora.yml",
              "grafana/dashboards"):
        assert f"./{f}:" in volumes and (INFRA / f).exists(), f
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/agora.yml").read_text())["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    conf = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    worker = next(j for j in conf["scrape_configs"] if j["job_name"] == "agora-worker")
    sd = worker["dns_sd_configs"][0]
    assert set(sd["names"]) == {"worker", "beat"} <= set(services)
    assert sd["port"] == CoordinatorSettings().worker_metrics_port
