"""prefect-dask's DaskTaskRunner with Ottimo's pre-flight (ottimo.ops.preflight), run as tasks are submitted: first the
scheduler, when given by address, then each task (once) and its arguments (every time). Submissions happen inside
the flow function, so a refusal fails the flow run with its message; checked as the runner is entered, it would
escape the engine and leave the flow run Running. Made by tasks/runner.py's `task_runner` for `tune.runner: dask`
and `compress.runner: dask`.
"""

from __future__ import annotations

from typing import Any

from prefect.futures import PrefectFuture
from prefect_dask import DaskTaskRunner

from ottimo.ops import preflight

PREFLIGHT_SECONDS = 5.0  # to wait for a scheduler's answer, then for its first worker


class CheckedDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's DaskTaskRunner with the pre-flight at submission: the scheduler (given by address) before the
    first, each task once, its arguments every time."""

    def __init__(self, *, stage: str = "tune", source: str = "", probes: tuple[preflight.Probe, ...] = (),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.stage, self.source, self.probes = stage, source, probes
        self._checked: set[int] = set()
        self._answered = False

    def duplicate(self) -> CheckedDaskTaskRunner:
        return type(self)(stage=self.stage, source=self.source, probes=self.probes, address=self.address,
                          cluster_class=self.cluster_class, cluster_kwargs=self.cluster_kwargs,
                          adapt_kwargs=self.adapt_kwargs, client_kwargs=self.client_kwargs,
                          performance_report_path=self.performance_report_path)

    def submit(self, task, parameters: dict[str, Any], wait_for=None, dependencies=None):
        if self.address and not self._answered:  # in the flow function: a refusal fails the flow run (not Running)
            workers = preflight.check_scheduler(self.address, self.source, f"{self.stage}.runner", PREFLIGHT_SECONDS,
                                                self.probes)
            self.logger.info("Dask scheduler %s answers with %d worker(s)", self.address, len(workers))
            self._answered = True
        fn = None if id(task) in self._checked else task
        preflight.check_picklable(task.name, fn, _without_futures(parameters), f"{self.stage}.runner")
        self._checked.add(id(task))
        return super().submit(task, parameters, wait_for, dependencies)


def _without_futures(value: Any) -> Any:
    """The arguments with upstream futures (also in lists, tuples and dicts) left out: Dask hands a worker their
    results, not the futures."""
    if isinstance(value, PrefectFuture):
        return None
    if isinstance(value, dict):
        return {k: _without_futures(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_futures(v) for v in value]
    return value
