"""Subflow results as task inputs the Prefect UI can show.

Prefect 3.8 links a finished subflow's return value, and each object one level inside it, to the subflow's run by
`id()` (prefect.utilities.engine.link_state_to_result, into FlowRunContext.run_results); a task that later gets
one of those objects, anywhere inside an argument, records a task input of type `flow_run`. The UI cannot render
that type: the flow run's Task Runs tab stays empty ("Invalid TaskInputResponse"). The objects can be strings
shared with everything else (a family name that keys the tuning flow's result is the same object as in
params.train.candidates, so every task taking `params` got a `flow_run` input), and for plain dicts and lists
the link is by `id()` alone, so a new list that reuses a freed one's address inherits it. Quoting arguments
cannot cover either case; forgetting the subflow links right after the subflow returns does. Task-to-task
lineage (`task_run` inputs) is kept.
"""

from __future__ import annotations

from prefect.client.schemas.objects import RunType
from prefect.context import FlowRunContext


def forget_subflow_results() -> int:
    """Drop this flow run's links from subflow results to their runs; return how many there were."""
    ctx = FlowRunContext.get()
    if ctx is None:
        return 0
    linked = [key for key, entry in ctx.run_results.items() if entry[1] == RunType.FLOW_RUN]
    for key in linked:
        del ctx.run_results[key]
    return len(linked)
