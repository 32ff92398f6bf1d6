"""docker-compose.yml and the Dockerfiles are consistent with the CLI and the settings.

Docker cannot run here; what can be checked is checked: the compose file parses, every command it
and the images run exists in the `cellfuse` CLI with those options, and every CELLFUSE_ variable it
sets is a real setting.
"""

import re

import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.settings import Settings
from tests.service.conftest import REPO_ROOT


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _cli_accepts(args: list[str]) -> None:
    assert args[0] == "cellfuse", args
    # --help after the real options: click parses the options first, so an unknown one fails.
    result = CliRunner().invoke(cli, [*args[1:], "--help"])
    assert result.exit_code == 0, (args, result.output)


def test_compose_has_the_services_and_dependencies():
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-gpu"} <= set(services)
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker-gpu"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_commands_exist_in_the_cli():
    for service in _compose()["services"].values():
        command = service.get("command")
        if command and command[0] == "cellfuse":
            _cli_accepts(command)


def test_compose_environment_names_real_settings():
    fields = {f"CELLFUSE_{name.upper()}" for name in Settings.model_fields}
    for service in _compose()["services"].values():
        for key in (service.get("environment") or {}):
            if key.startswith("CELLFUSE_"):
                assert key in fields, key


def test_dockerfile_commands_exist_in_the_cli():
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (REPO_ROOT / "docker" / dockerfile).read_text()
        [cmd] = re.findall(r"^CMD (\[.*\])$", text, flags=re.M)
        _cli_accepts(yaml.safe_load(cmd))
        assert "torch==2.13.0" in text
        for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
            assert (REPO_ROOT / copied).exists(), copied
