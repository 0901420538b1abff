"""Errors of the scheduler."""


class SchedulerError(Exception):
    pass


class TransientStoreError(SchedulerError):
    """A database or broker hiccup worth retrying (lock timeout, lost connection)."""
