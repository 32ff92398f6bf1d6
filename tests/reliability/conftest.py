"""Fixtures for fault tests: the service fixtures, plus a Redis and a PostgreSQL of the test's own
that it may kill and restart (the shared servers on 6379 / 5432 are never touched)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import (  # noqa: F401 - fixtures re-exported for this folder
    FAST_JOB_TIMINGS,
    SERVICES_REQUIRED,
    embedded_settings,
    engine_starts,
    make_client,
    pg_url,
    redis_url,
    services_settings,
    worker_factory,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, *, open_: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if open_:
                    return
        except OSError:
            if not open_:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not {'open' if open_ else 'close'} in {timeout} s")


def _missing(what: str) -> None:
    if SERVICES_REQUIRED:
        pytest.fail(f"{what} (CELLFUSE_TEST_SERVICES=required)")
    pytest.skip(what)


class OwnRedis:
    """A redis-server on a free loopback port, without persistence, that a test may SIGKILL."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        wait_port(self.port, open_=False)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class OwnPostgres:
    """A throwaway PostgreSQL cluster in a temporary folder on a free port (run as user postgres
    when the tests run as root, because initdb refuses root)."""

    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root = bindir, root
        self.datadir = root / "cluster"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/cellfuse"

    def init(self) -> None:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE cellfuse"))
        admin.dispose()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-o", options, "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start"
        )
        wait_port(self.port)

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    bindir = _pg_bin()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="cellfuse-pg-"))
    root.chmod(0o755)
    server = OwnPostgres(bindir, root)
    try:
        server.init()
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        _missing(f"could not start a throwaway PostgreSQL cluster: {exc} {detail.decode(errors='replace')[:300]}")
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        from app.db import engine_for

        engine_for(server.url).dispose()
        shutil.rmtree(root, ignore_errors=True)


def seed_minimal_zoo(client, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Cell line L, reporter R and dataset 1 with one labelled 16x16 image per split, so that
    generated requests can get past the name and id lookups."""
    import numpy as np

    from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes

    assert client.post("/api/v1/cell-lines", json={"name": "L"}).status_code == 201
    assert client.post("/api/v1/reporters", json={"name": "R"}).status_code == 201
    assert client.post("/api/v1/datasets", json={"name": "d", "cell_line": "L", "channels": ["R"]}).status_code == 201
    image = image_to_tiff_bytes(np.ones((1, 16, 16), np.uint16))
    mask = labels_to_tiff_bytes(np.eye(16, dtype=np.int32))
    for split in splits:
        response = client.post(
            "/api/v1/datasets/1/images",
            data={"split": split},
            files={"image": ("a.tif", image), "nuclei": ("n.tif", mask)},
        )
        assert response.status_code == 201, response.text
