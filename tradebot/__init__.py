"""tradebot: the Django project (settings, Celery app, pipeline, replay)."""
from __future__ import annotations

# Load the Celery app whenever Django starts so @shared_task binds to it.
from tradebot.celery import app as celery_app

__all__ = ["celery_app"]
