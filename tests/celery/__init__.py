"""Celery, unchanged except for its broker URL, against roost."""
