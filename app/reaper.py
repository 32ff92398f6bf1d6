"""Periodic sweep for jobs whose worker died or whose message was lost; runs in API and workers."""

from __future__ import annotations

import logging
import re
import threading

from app import jobs
from app.db import session_factory
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


_JOB_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: The queues jobs are sent to (see TASK_ROUTES).
JOB_QUEUES = ("gpu", "cpu")


def queued_job_ids(settings: Settings) -> set[str] | None:
    """Ids of jobs whose message is waiting in the broker; None when the broker cannot be inspected.

    A job whose message is still queued must not be sent again: under a burst that only multiplies
    the backlog. Ids are found in the raw messages (the message names its job id in its arguments).
    """
    url = settings.resolved_broker_url
    try:
        if url.startswith("sqla+"):
            from sqlalchemy import text

            from app.db import engine_for

            engine = engine_for(url.removeprefix("sqla+"))
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT payload FROM kombu_message WHERE visible")).scalars()
                found: set[str] = set()
                for payload in rows:
                    raw = payload.encode() if isinstance(payload, str) else bytes(payload or b"")
                    found.update(m.decode() for m in _JOB_ID.findall(raw))
                return found
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=5)
            try:
                found = set()
                for queue in JOB_QUEUES:
                    for message in client.lrange(queue, 0, -1):
                        raw = message if isinstance(message, bytes) else str(message).encode()
                        found.update(m.decode() for m in _JOB_ID.findall(raw))
                return found
            finally:
                client.close()
    except Exception:  # an uninspectable broker: fall back to re-sending (duplicates are skipped)
        log.warning("could not inspect the broker's queues", exc_info=True)
    return None


def reap_once(settings: Settings) -> list[jobs.ReaperAction]:
    from app.queue import send_job
    from app.storage import BlobStore

    BlobStore(settings.blob_dir).clean_tmp(settings.tmp_max_age_s)

    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        actions = jobs.reap_stale_jobs(
            session, stale_after_s=settings.job_stale_after_s, resend_after_s=settings.job_resend_after_s
        )
        waiting = queued_job_ids(settings) if any(a.action == "resend" for a in actions) else None
        for action in actions:
            if action.action == "resend" and waiting is not None and action.job_id in waiting:
                # Its message is still in the queue, only behind others: wait another period.
                jobs.mark_enqueued(session, action.job_id)
                session.commit()
                continue
            if action.action in ("requeued", "resend"):
                job = session.get(jobs.Job, action.job_id)
                if job is None:  # deleted since the sweep
                    continue
                try:
                    send_job(job.id, job.kind, settings)
                    jobs.mark_enqueued(session, job.id)
                    session.commit()
                except Exception:  # broker down: the next sweep tries again
                    log.warning("could not re-send job %s", job.id, exc_info=True)
            log.info("reaper: job %s %s (%s)", action.job_id, action.action, action.reason)
    return actions


def reaper_loop(stop: threading.Event, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    while not stop.wait(settings.reaper_interval_s):
        try:
            reap_once(settings)
        except Exception:
            log.warning("job reaper sweep failed; retrying next interval", exc_info=True)
