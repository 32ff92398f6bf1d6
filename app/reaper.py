"""Periodic sweep for jobs whose worker died or whose message was lost; runs in API and workers."""

from __future__ import annotations

import logging
import threading

from app import jobs
from app.db import session_factory
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def reap_once(settings: Settings) -> list[jobs.ReaperAction]:
    from app.queue import send_job

    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        actions = jobs.reap_stale_jobs(session, stale_after_s=settings.job_stale_after_s,
                                       resend_after_s=settings.job_resend_after_s)
        for action in actions:
            if action.action in ("requeued", "resend"):
                job = session.get(jobs.Job, action.job_id)
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
