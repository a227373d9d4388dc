"""relay's workers: ``celery -A workers worker`` finds the app here."""

from workers import hooks  # noqa: F401  (connects the Celery signal handlers)
from workers.celery_app import app

__all__ = ["app"]
