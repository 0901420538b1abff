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
