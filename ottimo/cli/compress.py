"""`ottimo compress --run-id RUN`: the compression stage alone on an already trained model.

RUN is a pipeline run (its `compress.teacher` model is compressed) or a trained candidate's run. Candidates are
nested under the pipeline run in MLflow, with the Pareto report; nothing is registered or promoted.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ottimo.cli.common import PARAMS, PROJECT, cell, console, finish, flow_imports, params_or_exit, say

RUN_ID = typer.Option(..., "--run-id", "-r", help="MLflow run id of a pipeline run or of a trained candidate.")


def compress(run_id: str = RUN_ID, project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Compress a trained model (settings under `compress:`): distil, prune, quantize, measure side by side in
    onnxruntime, write the Pareto report and the choice to MLflow. Registers nothing."""

    root = project_dir.resolve()
    params_or_exit(root, params_file)
    with flow_imports():
        from flows.compress import with_runner

    state = with_runner(str(root), params_file)(project_dir=str(root), params_file=params_file, run_id=run_id,
                                                 return_state=True)
    result = finish(state, "Compression")
    table = Table(title=cell(f"Compression candidates (objective: {result.selection.objective})"))
    for col in ("candidate", "technique", "accuracy", "p50 ms", "p95 ms", "rows/s @64", "size kB", "params"):
        table.add_column(col)
    for r in result.rows:
        m = r.metrics
        table.add_row(cell(("* " if r.name == result.selection.chosen else "") + r.name), cell(r.technique),
                      f"{m['accuracy']:.4f}", f"{m['p50_ms']:.4f}", f"{m['p95_ms']:.4f}",
                      f"{m['throughput_rps']:,.0f}", f"{m['size_mb'] * 1e3:.1f}", f"{r.parameters:,}")
    console.print(table)
    for name, reason in result.selection.reasons.items():
        say(f"- {name}: {reason}")
    say("The Pareto plot and tables are artifacts `compression/` of the pipeline run in MLflow.")
