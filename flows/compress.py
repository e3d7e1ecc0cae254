"""The compression flow: distil, prune, fuse, quantize (built in parallel: threads or Dask workers, compress.runner),
measure (in this process, latency interleaved), report, select."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from ottimo.config import Params, load_params, project_params
from tasks import compress as t
from tasks.compress import Built, CompressionResult
from tasks.data import DataVersion, prepare_data, validate_raw
from tasks.evaluate import Evaluated, Exported
from tasks.lineage import forget_subflow_results
from tasks.runner import task_runner
from tasks.summary import fail_open_mlflow_runs
from tasks.train import Candidate


@flow(name="compression", on_failure=[fail_open_mlflow_runs])
def compression(project_dir: str = ".", params_file: str = "params.yaml", run_id: str | None = None,
                trained: list[Built] | None = None, data: DataVersion | None = None,
                parent_run_id: str | None = None, params: Params | None = None,
                champion_accuracy: float | None = None, same_data: bool = True) -> CompressionResult:
    """Compress the teacher (compress.teacher) into measured candidates and choose one. Run alone (`ottimo
    compress --run-id`) it takes the teacher from that MLflow run; inside the pipeline it gets the trained
    models, the data, the pipeline run and the champion's accuracy (the gate's constraints come first in the
    choice; `same_data`: on the champion's data revision, where the gate asks for gate.min_gain) from it."""
    root = Path(project_dir).resolve()
    params = params or project_params(root, params_file)
    cfg = params.compress
    alone = trained is None
    if alone:
        validate_raw(root, params)
        data = prepare_data(root, params)
        teacher, parent_run_id = t.resolve_teacher(root, params, run_id, data)
        trained = [teacher]
    teacher = next(b for b in trained if b.family == cfg.teacher and b.technique == "trained")

    student = t.distill_student.submit(root, params, teacher, data, parent_run_id) if cfg.distill.enabled else None
    bases = [teacher if b == "teacher" else student for b in cfg.bases]
    pruned = {(method, amount, i): t.prune_variant.submit(root, params, base, method, amount, data, parent_run_id)
              for i, base in enumerate(bases) for method, amounts in (("unstructured", cfg.prune.unstructured),
                                                                      ("structured", cfg.prune.structured))
              for amount in amounts}
    to_quantize = bases + ([f for (m, _, _), f in pruned.items() if m == "structured"]
                           if cfg.quantize.after_structured else [])
    fused = [t.fuse_variant.submit(root, params, base, data, parent_run_id) for base in bases] if cfg.fuse else []
    # with compress.fuse INT8 starts from the fused graph of each base (the fused candidate is measured as well)
    quant_from = fused + to_quantize[len(bases):] if cfg.fuse else to_quantize
    quantized = [t.quantize_variant.submit(root, params, base, option, data, parent_run_id)
                 for base in quant_from for option in cfg.quantize.options]

    futures = ([student] if student else []) + list(pruned.values()) + fused + quantized
    built = trained + [f.result() for f in futures]
    rows = t.measure_candidates(root, params, built, data)
    selection = t.report_and_select(root, params, rows, teacher.name, parent_run_id, not alone, champion_accuracy,
                                     same_data)
    return CompressionResult(built, rows, selection)


def with_runner(project_dir: str, params_file: str = "params.yaml"):
    """The compression flow with the task runner params.yaml asks for (compress.runner: threads, or Dask)."""
    root = Path(project_dir).resolve()
    return compression.with_options(task_runner=task_runner(root, load_params(root / params_file), "compress"))


def compress_stage(project_dir: str, params_file: str, params: Params, candidates: list[Candidate],
                   exported: list[Exported], data: DataVersion, parent_run_id: str,
                   champion_accuracy: float | None, same_data: bool = True) -> Evaluated:
    """The compression flow as a stage of the training pipeline: the trained models and their compressed
    variants compete under compress.select, those the gate would pass against the champion first; the chosen
    one goes on to the registry and the gate."""
    trained = [t.from_trained(params, c, e) for c, e in zip(candidates, exported, strict=True)]
    flow_ = compression.with_options(task_runner=task_runner(Path(project_dir).resolve(), params, "compress"))
    result = flow_(project_dir, params_file, None, trained, data, parent_run_id, params, champion_accuracy,
                   same_data)
    forget_subflow_results()  # the tasks after it get values, not inputs of type flow_run the UI cannot show
    return t.as_evaluated(result.built, result.rows, result.selection.chosen)
