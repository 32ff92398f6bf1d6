"""docker-compose.yml and the Dockerfiles are consistent with the CLI and the settings.

Docker cannot run here; what can be checked is checked: the compose file parses, every command it
and the images run exists in the `cellfuse` CLI with those options, every CELLFUSE_ variable it
sets is a real setting, services restart and report health, .env.example covers every setting, and
the images install the locked versions.
"""

import re

import pytest
import yaml
from pydantic import ValidationError
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
        for key in service.get("environment") or {}:
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


def test_compose_services_restart_and_report_health():
    services = _compose()["services"]
    for name in ("postgres", "redis", "api", "worker-gpu"):
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["restart"] == "no"  # a one-shot step, not a daemon
    _cli_accepts(services["worker-gpu"]["healthcheck"]["test"][1:])


def test_env_example_lists_every_setting_and_its_placeholder_secret_is_refused():
    text = (REPO_ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#? ?(CELLFUSE_[A-Z0-9_]+)=", text, flags=re.M))
    assert named == {f"CELLFUSE_{name.upper()}" for name in Settings.model_fields}
    # Every variable docker compose insists on is there.
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (REPO_ROOT / "docker-compose.yml").read_text()))
    assert required and all(re.search(rf"^{var}=", text, flags=re.M) for var in required), required
    [placeholder] = re.findall(r"^CELLFUSE_BOOTSTRAP_ADMIN_KEY=(.*)$", text, flags=re.M)
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(bootstrap_admin_key=placeholder)


def test_secrets_and_data_stay_out_of_git_and_images():
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    dockerignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".env", "cellfuse-data"} <= set(dockerignore)


def test_images_install_the_locked_versions():
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (REPO_ROOT / "docker" / dockerfile).read_text()
        torch_at = text.index("torch==2.13.0")
        assert text.index("requirements.lock") > torch_at, dockerfile  # torch first, then the lock
        assert re.search(r"^RUN pip install -c \S+ \.", text, flags=re.M), dockerfile  # non-editable
    worker = (REPO_ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "whl/cu128" in worker and "grep -v '^torch=='" in worker  # the CUDA torch is kept


def test_worker_health_reports_a_fresh_worker_on_this_host_only(tmp_path, monkeypatch):
    import socket
    from datetime import timedelta

    from app.db import session_factory
    from app.migrations import upgrade
    from app.models import WorkerHeartbeat, utcnow
    from app.settings import get_settings

    monkeypatch.setenv("CELLFUSE_DATA_DIR", str(tmp_path / "data"))
    for name in ("CELLFUSE_DATABASE_URL", "CELLFUSE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        url = get_settings().resolved_database_url
        upgrade(url)
        runner = CliRunner()
        assert runner.invoke(cli, ["worker-health"]).exit_code == 1  # no worker at all
        host = socket.gethostname()
        with session_factory(url)() as session:
            session.add(
                WorkerHeartbeat(name=f"{host}:1", queues=["gpu"], info={}, last_seen=utcnow() - timedelta(seconds=300))
            )
            session.add(WorkerHeartbeat(name=f"other-{host}:2", queues=["gpu"], info={}, last_seen=utcnow()))
            session.commit()
        stale = runner.invoke(cli, ["worker-health", "--max-age", "60"])
        assert stale.exit_code == 1 and "no worker" in stale.output  # old row here, fresh one elsewhere
        fresh = runner.invoke(cli, ["worker-health", "--max-age", "600"])
        assert fresh.exit_code == 0 and f"{host}:1" in fresh.output and "other-" not in fresh.output
    finally:
        get_settings.cache_clear()
