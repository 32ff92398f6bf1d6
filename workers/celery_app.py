"""The Celery application the worker process runs (``celery -A workers.celery_app:celery_app``).

Configuration, task names and routes live in ``app.queue`` (the producer side, shared with the API);
this module only creates the worker's app for the configured broker. Tasks are registered by
``workers.tasks`` (the app's ``include``).
"""

from __future__ import annotations

from app.queue import TASK_ROUTES, celery_for, send_job

celery_app = celery_for()

__all__ = ["celery_app", "TASK_ROUTES", "send_job"]
