"""The one error type the HTTP edge turns into a JSON answer `{"error": ..., "detail": ...}`."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal with its HTTP status, a short machine-readable code and a message that says why."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


LISTED_TASKS = 20  # an unknown-task answer names at most this many loaded tasks


def unknown_task_detail(task: str, first: list[str], total: int) -> str:
    """Why a task is unknown, naming the first loaded tasks in name order (`first`, at least LISTED_TASKS of them
    when there are) of the `total` loaded, rather than all of them."""
    shown = ", ".join(first[:LISTED_TASKS]) or "none"
    more = f", ... ({total:,} in all: GET /tasks)" if total > LISTED_TASKS else ""
    return f"unknown task {task!r}; loaded tasks: {shown}{more}"


def version_not_served_detail(task: str, served: list[str], version: str) -> str:
    """Why a request pinned to `version` is refused (409): the versions the task does serve."""
    return f"task {task!r} serves version{'s' if len(served) > 1 else ''} {' and '.join(served)}, not {version[:80]!r}"
