"""One retry policy for the tasks that talk to MLflow or the DVC remote: transient errors only, with backoff.

A server that went away, a 5xx or 429, a timeout, a DVC remote out of reach: retried. A gate that failed, bad
data, a bad config, a refused promotion, a tampered file: never (the answer would be the same). MLflow's own
HTTP client retries each request first (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, BACKOFF_FACTOR=2: about 4 minutes);
this policy is the second line, for errors that outlast it or come from elsewhere (DVC, SQLite locks).
"""

from __future__ import annotations

import sqlite3

import requests
from mlflow.exceptions import MlflowException, RestException
from prefect.states import State

from ottimo.config import ConfigError
from ottimo.data.intake import DataValidationError
from ottimo.data.versioning import RemoteUnavailable
from ottimo.registry.gate import GateFailed
from ottimo.registry.promotion import PromotionError

# never retried, even when caused by a transient error; anything not recognised as transient is not retried either
NEVER = (GateFailed, DataValidationError, ConfigError, PromotionError)
TRANSIENT_TYPES = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout, RemoteUnavailable)
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
CONNECTION_WORDS = ("failed with exception", "failed with timeout exception", "max retries exceeded",
                    "connection refused", "database is locked")


def is_transient(err: BaseException | None) -> bool:
    """Whether retrying could help: connection errors, timeouts, 5xx/429, an unreachable DVC remote, a locked
    SQLite store, looked for along the exception's cause chain; never one of NEVER."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, NEVER):
            return False
        if isinstance(err, TRANSIENT_TYPES):
            return True
        if isinstance(err, RestException) and err.get_http_status_code() in TRANSIENT_STATUS:
            return True  # the server answered with an error of its own
        text = str(err).lower()
        if isinstance(err, MlflowException) and text.startswith("api request to") and (
                any(w in text for w in CONNECTION_WORDS) or any(f"error code {s}" in text for s in TRANSIENT_STATUS)):
            return True
        if isinstance(err, sqlite3.OperationalError) or type(err).__name__ == "OperationalError":
            return "database is locked" in text
        err = err.__cause__ or err.__context__
    return False


def transient(task, task_run, state: State) -> bool:
    """Prefect retry_condition_fn: retry the task only when its failure is transient (is_transient)."""
    err = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(err if isinstance(err, BaseException) else None)


# @task(**RETRY_TRANSIENT): three more attempts, 2, 5 and 15 s apart (±50%), for transient errors only
RETRY_TRANSIENT = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_jitter_factor": 0.5,
                   "retry_condition_fn": transient}
