"""Signed webhooks to a real local HTTP receiver: signatures verify, failures are retried with
back-off and every attempt is recorded, and private targets are refused unless an admin allows them."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app import webhooks
from app.db import session_factory
from app.models import WebhookDelivery
from tests.service.conftest import make_client, make_embedded_settings, wait_for_job

FAST_WEBHOOKS = dict(
    webhook_allow_private=True,
    webhook_backoff_s=0.2,
    webhook_backoff_max_s=1.0,
    webhook_poll_s=0.1,
    webhook_max_attempts=4,
)


class Receiver:
    """An HTTP server in a thread that checks every signature with the subscription's secret."""

    def __init__(self, fail_first: int = 0):
        self.secret: str | None = None
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.requests = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                ok = receiver.secret is not None and webhooks.verify_signature(
                    receiver.secret,
                    self.headers[webhooks.TIMESTAMP_HEADER],
                    self.headers[webhooks.SIGNATURE_HEADER],
                    body,
                )
                if not ok:
                    receiver.bad_signatures += 1
                    self.send_response(400)
                elif receiver.requests <= receiver.fail_first:
                    self.send_response(503)
                else:
                    receiver.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/cellfuse"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.events) < n:
            time.sleep(0.05)
        return self.events

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def _make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield _make
    for r in made:
        r.close()


def test_signature_round_trip_and_tampering():
    secret = webhooks.new_secret()
    body = b'{"type":"job.succeeded"}'
    now = int(time.time())
    header = webhooks.sign(secret, now, body)
    assert webhooks.verify_signature(secret, str(now), header, body)
    assert not webhooks.verify_signature(secret, str(now), header, body + b" ")
    assert not webhooks.verify_signature(webhooks.new_secret(), str(now), header, body)
    assert not webhooks.verify_signature(secret, str(now - 3600), webhooks.sign(secret, now - 3600, body), body)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.5",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
def test_private_addresses_are_refused(address):
    with pytest.raises(webhooks.WebhookTargetError, match="CELLFUSE_WEBHOOK_ALLOW_PRIVATE"):
        webhooks.resolve_target(
            "https://lims.example.org/hook", allow_private=False, resolver=lambda host, port: ["93.184.216.34", address]
        )
    assert webhooks.resolve_target(
        "https://lims.example.org/hook", allow_private=False, resolver=lambda host, port: ["93.184.216.34"]
    ) == ["93.184.216.34"]


def test_subscribing_a_loopback_url_is_a_422_unless_allowed(tmp_path, receiver):
    settings = make_embedded_settings(tmp_path)
    client, _ = make_client(settings, role="instrument", run_reaper=False)
    r = receiver()
    response = client.post("/api/v1/webhooks", json={"url": r.url})
    assert response.status_code == 422
    assert response.json()["type"].endswith("webhook-target-refused")
    assert "127.0.0.1" in response.json()["detail"]
    assert client.post("/api/v1/webhooks", json={"url": "file:///etc/passwd"}).status_code == 422


def test_delivery_rechecks_the_address_at_send_time(tmp_path, receiver):
    """A subscription made while private targets were allowed is not delivered once they are not
    (the same check that stops a DNS answer changing to a private address after subscribing)."""
    allowed = make_embedded_settings(tmp_path, **FAST_WEBHOOKS)
    client, _ = make_client(allowed, run_reaper=False)
    r = receiver()
    sub = client.post("/api/v1/webhooks", json={"url": r.url}).json()
    assert client.post(f"/api/v1/webhooks/{sub['id']}/ping").status_code == 202
    strict = allowed.model_copy(update={"webhook_allow_private": False})
    with session_factory(allowed.resolved_database_url)() as session:
        assert webhooks.deliver_due(session, strict) == 1
    assert r.requests == 0
    [delivery] = client.get(f"/api/v1/webhooks/{sub['id']}/deliveries").json()
    assert delivery["status"] == "pending" and "loopback" in delivery["attempt_log"][0]["error"]


def test_failing_receiver_gets_retries_with_backoff(tmp_path, receiver):
    settings = make_embedded_settings(tmp_path, **FAST_WEBHOOKS)
    client, _ = make_client(settings)
    r = receiver(fail_first=2)
    sub = client.post("/api/v1/webhooks", json={"url": r.url, "description": "LIMS"}).json()
    assert sub["secret"].startswith("whsec_")
    r.secret = sub["secret"]
    with client:  # the lifespan runs the dispatcher
        client.post(f"/api/v1/webhooks/{sub['id']}/ping")
        [event] = r.wait_for(1)
    assert event["type"] == "webhook.ping" and r.bad_signatures == 0
    [delivery] = client.get(f"/api/v1/webhooks/{sub['id']}/deliveries").json()
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    log = delivery["attempt_log"]
    assert [a["status_code"] for a in log] == [503, 503, 204]
    assert all(a["duration_ms"] >= 0 for a in log) and "503" in log[0]["error"]
    # Exponential back-off: at least 0.2 s before the first retry, 0.4 s before the second (the
    # dispatcher's polling only adds to these; lower bounds hold on a loaded machine too).
    from datetime import datetime

    at = [datetime.fromisoformat(a["at"]) for a in log]
    first, second = (at[1] - at[0]).total_seconds(), (at[2] - at[1]).total_seconds()
    assert first >= 0.2 and second >= 0.4, (first, second)
    assert webhooks.backoff_s(1, 0.2, 1.0) == 0.2 and webhooks.backoff_s(2, 0.2, 1.0) == 0.4
    assert webhooks.backoff_s(10, 0.2, 1.0) == 1.0
    # Listings never show the secret again.
    assert "secret" not in client.get(f"/api/v1/webhooks/{sub['id']}").json()


def test_receiver_that_never_answers_well_ends_failed(tmp_path, receiver):
    settings = make_embedded_settings(tmp_path, **{**FAST_WEBHOOKS, "webhook_max_attempts": 2})
    client, _ = make_client(settings)
    r = receiver(fail_first=100)
    sub = client.post("/api/v1/webhooks", json={"url": r.url}).json()
    r.secret = sub["secret"]
    client.post(f"/api/v1/webhooks/{sub['id']}/ping")
    with session_factory(settings.resolved_database_url)() as session:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            webhooks.deliver_due(session, settings)
            row = session.query(WebhookDelivery).one()
            session.refresh(row)
            if row.status != "pending":
                break
            time.sleep(0.1)
    assert row.status == "failed" and row.attempts == 2 and r.requests == 2


@pytest.mark.slow
def test_job_events_reach_the_lims_signed(tmp_path, receiver, worker_factory):
    settings = make_embedded_settings(tmp_path, **FAST_WEBHOOKS)
    worker_factory(settings)
    client, _ = make_client(settings, role="instrument")
    other, _ = make_client(settings, role="instrument")
    r, r_other = receiver(), receiver()
    sub = client.post("/api/v1/webhooks", json={"url": r.url, "events": ["job.succeeded", "job.failed"]}).json()
    r.secret = sub["secret"]
    # Another instrument's subscription does not hear of this key's jobs.
    r_other.secret = other.post("/api/v1/webhooks", json={"url": r_other.url}).json()["secret"]
    with client:
        job = client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0.05}).json()
        assert wait_for_job(client, job["id"], timeout=90)["status"] == "succeeded"
        [event] = r.wait_for(1)
    assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job["id"]
    assert event["data"]["status"] == "succeeded" and event["data"]["links"]["job"].endswith(job["id"])
    assert r.bad_signatures == 0 and r_other.requests == 0


@pytest.mark.slow
def test_a_failed_field_is_announced_and_the_plate_still_succeeds(tmp_path, receiver, worker_factory):
    """One field's stored image is gone when the worker reaches it: the LIMS gets a signed
    plate.field_failed naming the field and the error, and the job succeeds with the other fields."""

    from app.client import CellFuseClient
    from app.storage import BlobStore
    from tests.service.workflow import add_ready_version_of_base, register_tiny_base, small_plate, upload_dataset

    settings = make_embedded_settings(tmp_path, **FAST_WEBHOOKS)
    worker_factory(settings)
    client, _ = make_client(settings)
    api = CellFuseClient(client)
    r = receiver()
    r.secret = client.post("/api/v1/webhooks", json={"url": r.url, "events": ["plate.field_failed"]}).json()["secret"]
    with client:  # the lifespan runs the dispatcher
        base_name = register_tiny_base(api)
        ds = upload_dataset(api, small_plate(3, size=64, n_channels=1))
        add_ready_version_of_base(session_factory(settings.resolved_database_url), base_name)
        # The second field's image vanishes from the data directory before the worker reads it.
        lost = ds["images"][1]["image_sha256"]
        BlobStore(settings.blob_dir).path_for(lost).unlink()
        response = client.post("/api/v1/jobs/segment-dataset", json={"dataset_id": ds["id"], "objects": ["nuclei"]})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
        summary = job["summary"]
        assert summary["fields_done"] == 2 and summary["fields_failed"] == 1, summary
        [failed] = summary["failed_fields"]
        assert failed["field"] not in {f["field"] for f in summary["fields"]}
        [event] = r.wait_for(1)
    assert r.bad_signatures == 0
    assert event["type"] == "plate.field_failed"
    data = event["data"]
    assert data["job_id"] == job["id"] and data["field"] == failed["field"]
    assert "missing from the data directory" in data["error"] and data["error"] == failed["error"]
    assert data["links"]["job"].endswith(job["id"])
