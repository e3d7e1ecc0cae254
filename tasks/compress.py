"""Compression tasks: distil a student, prune and quantize variants (built in parallel), measure them one after
another in this process, report them side by side and choose the one that goes to the gate.

Tasks pass `Built` records (paths, ids, the Recipe that rebuilds a checkpoint), never live models, so that they
run on threads or on Dask worker processes alike (compress.runner). Exports and quantizer calls hold one
process-wide lock: both redirect stdout and the dynamo exporter is not made for concurrent tracing; fine-tuning and
distillation run concurrently. The lock is reached as `export.export_guard`: a task's function travels to a Dask
worker by value with the globals it names, and a module travels by name, so each worker uses its own lock.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from mlflow.artifacts import download_artifacts
from mlflow.entities import Param
from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from ottimo import vocab
from ottimo.compress import fusion, pareto, quantize, sensitivity, techniques
from ottimo.config import Params
from ottimo.data.tables import Splits, load_splits
from ottimo.models.family import Recipe, count_parameters, rebuild, recipe
from ottimo.onnx import export, latency
from ottimo.onnx.export import export_onnx, parity_check, sha256, verify_sha256
from ottimo.onnx.measure import Metrics, measure
from ottimo.ops.dask_cluster import current_worker
from ottimo.ops.faults import checkpoint
from ottimo.registry import report
from ottimo.registry.gate import GateFailed
from ottimo.registry.logged_model import log_onnx_model
from ottimo.registry.tracking import connect, flatten, run_model_uri, stamped, work_dir
from ottimo.spec import InputSpec
from tasks.data import DataVersion
from tasks.evaluate import Evaluated, Exported
from tasks.train import RECIPE_FILE, Candidate

MEASURED = tuple(f.name for f in fields(Metrics))  # a skipped candidate's figures are all NaN


@dataclass(frozen=True)
class Built:
    """A candidate ready to measure: its ONNX file, and for PyTorch-made ones the checkpoint that later
    techniques (prune → quantize) start from."""

    name: str
    technique: str  # trained | distill | prune-unstructured | prune-structured | fuse | int8-dyn, int8-qdq-...
    base: str
    family: str
    run_id: str  # its MLflow run (a trained model's own run)
    onnx_path: str
    sha256: str
    model_uri: str
    spec: InputSpec  # one input row
    n_classes: int
    checkpoint: str | None = None  # state_dict, loaded with weights_only=True
    recipe: Recipe | None = None  # what rebuilds the checkpoint's model (None: structurally pruned or quantized)
    parameters: int = 0
    sparsity: float = 0.0
    settings: dict = field(default_factory=dict)
    error: str | None = None  # e.g. quantized predictions that disagree with the FP32 model


def load_model(b: Built) -> torch.nn.Sequential:
    if b.recipe is None or b.checkpoint is None:
        raise ValueError(f"{b.name} ({b.technique}) is not rebuilt from a recipe; start from its ONNX file")
    return rebuild(b.recipe, b.spec, b.n_classes, b.checkpoint)


def _open_run(root: Path, params: Params, parent_run_id: str, name: str, technique: str, base: Built,
              settings: dict, data: DataVersion, family: str | None = None) -> str:
    client, exp = connect(root, params.mlflow)
    run = client.create_run(exp, run_name=name, tags={
        **report.inherited(client, parent_run_id), vocab.CANDIDATE_NAME: name,
        vocab.PARENT: parent_run_id, vocab.FLOW_RUN: str(runtime.flow_run.id), vocab.KIND: vocab.COMPRESSED,
        vocab.DATA_REVISION: data.revision, vocab.FAMILY_RUN: family or base.family, vocab.TECHNIQUE: technique,
        "compress.base": base.name, "teacher": params.compress.teacher, vocab.WORKER: current_worker()})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(
        {"technique": technique, "base": base.name, **settings}).items()])
    return run.info.run_id


def _log_onnx(root: Path, params: Params, run_id: str, path: Path, X: np.ndarray,
              classes: list | None = None) -> tuple[str, str]:
    """Log a candidate's ONNX file as its run's model, named after the candidate (the run's name) and tagged with
    its family, technique and data revision; return (model URI, sha256)."""
    client = connect(root, params.mlflow)[0]
    tags = client.get_run(run_id).data.tags
    return log_onnx_model(client, run_id, path, X, tags.get(vocab.RUN_NAME) or run_id,
                          {k: tags[k] for k in (vocab.FAMILY_RUN, vocab.TECHNIQUE, vocab.DATA_REVISION) if k in tags},
                          classes)


def _finish_torch(root: Path, params: Params, model: torch.nn.Module, name: str, technique: str, base: Built,
                  recipe: Recipe | None, settings: dict, splits: Splits, data: DataVersion, parent_run_id: str
                  ) -> Built:
    """Checkpoint, ONNX export with parity check, MLflow run with the model: a PyTorch-made candidate."""
    run_id = _open_run(root, params, parent_run_id, name, technique, base, settings, data,
                       recipe.family if recipe else None)
    out = work_dir(root, run_id)
    torch.save(model.state_dict(), out / "checkpoint.pt")
    with export.export_guard.exclusive():
        path = export_onnx(model, base.spec, out / "model.onnx")
        diff = parity_check(model, path, splits.X_test, params.evaluate.parity_atol)
        uri, digest = _log_onnx(root, params, run_id, path, splits.X_test, splits.labels)
    client = connect(root, params.mlflow)[0]
    client.log_metric(run_id, "parity_max_abs_diff", diff)
    client.log_artifact(run_id, str(out / "checkpoint.pt"))
    return Built(name, technique, base.name, recipe.family if recipe else base.family, run_id, str(path), digest,
                 uri, base.spec, base.n_classes, str(out / "checkpoint.pt"), recipe, count_parameters(model),
                 techniques.sparsity(model), settings)


def _skipped(root: Path, params: Params, name: str, technique: str, base: Built, settings: dict, data: DataVersion,
             parent_run_id: str, reason: str, run_id: str | None = None) -> Built:
    """A candidate that could not be made: its run (`run_id`, when the attempt had opened one) records why; the
    report shows it with that reason."""
    run_id = run_id or _open_run(root, params, parent_run_id, name, technique, base, settings, data)
    connect(root, params.mlflow)[0].set_tag(run_id, "compress.skipped", vocab.clip(reason))
    get_run_logger().warning("%s skipped: %s", name, reason)
    return Built(name, technique, base.name, base.family, run_id, "", "", "", base.spec, base.n_classes,
                 parameters=base.parameters, settings=settings, error=f"skipped: {reason}")


def _prune_name(base: str, method: str, amount: float) -> str:
    return f"{base}+prune-{method[0]}{round(amount * 100)}"  # u: unstructured, s: structured


def _finetune_spec(params: Params, epochs: int, lr: float) -> techniques.FinetuneSpec:
    return techniques.FinetuneSpec(epochs=epochs, lr=lr, batch_size=params.train.batch_size, seed=params.project.seed)


@task(task_run_name="distill_student[student-{params.compress.distill.student}]")
def distill_student(root: Path, params: Params, teacher: Built, data: DataVersion, parent_run_id: str) -> Built:
    """Train the configured student on the teacher's temperature-softened logits plus the hard labels."""
    cfg = params.compress.distill
    splits = load_splits(Path(data.prepared))
    student_recipe = recipe(params.families, params.train, cfg.student, {
        "hparams": cfg.hparams, "train": {"lr": cfg.lr} if cfg.lr else {}})
    with export.export_guard.training():
        student = techniques.distill(load_model(teacher), splits, student_recipe,
                                     _finetune_spec(params, cfg.epochs, student_recipe.lr), cfg.temperature, cfg.alpha)
    name = f"student-{cfg.student}"
    settings = {"temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.epochs,
                "student": {"family": cfg.student, **student_recipe.hparams}}
    built = _finish_torch(root, params, student, name, "distill", teacher, student_recipe, settings, splits, data,
                          parent_run_id)
    get_run_logger().info("%s distilled from %s: val acc %.4f, %d parameters (teacher %d)", name, teacher.name,
                          techniques.accuracy(student, splits.rows(splits.X_val), splits.y_val), built.parameters,
                          teacher.parameters)
    return built


@task(task_run_name=lambda parameters: "prune_variant[{}]".format(_prune_name(
    parameters["base"].name, parameters["method"], parameters["amount"])))
def prune_variant(root: Path, params: Params, base: Built, method: str, amount: float, data: DataVersion,
                  parent_run_id: str) -> Built:
    """Unstructured global magnitude pruning (zeros) or structured neuron pruning (smaller matrices) of `base`,
    then `prune.finetune_epochs` of fine-tuning."""
    cfg = params.compress.prune
    splits = load_splits(Path(data.prepared))
    name = _prune_name(base.name, method, amount)
    settings = {"method": method, "amount": amount, "finetune_epochs": cfg.finetune_epochs, "lr": cfg.lr}
    model = load_model(base)
    if method == "unstructured":
        model, rebuilt_by = techniques.magnitude_prune(copy.deepcopy(model), amount), base.recipe
    else:
        try:
            model, rebuilt_by = techniques.structured_prune(model, base.spec, base.n_classes, amount), None
        except techniques.NotPrunable as err:
            return _skipped(root, params, name, f"prune-{method}", base, settings, data, parent_run_id, str(err))
    with export.export_guard.training():
        spec = _finetune_spec(params, cfg.finetune_epochs, cfg.lr)
        techniques.make_permanent(techniques.finetune(model, splits, spec))
    built = _finish_torch(root, params, model, name, f"prune-{method}", base, rebuilt_by, settings, splits, data,
                          parent_run_id)
    get_run_logger().info("%s: sparsity %.2f, %d parameters (base %d), %.1f kB ONNX", name, built.sparsity,
                          built.parameters, base.parameters, Path(built.onnx_path).stat().st_size / 1e3)
    return built


def _accuracy_aware(params: Params, src: Path, dst: Path, option: quantize.QuantOption, calib: np.ndarray | None,
                    splits: Splits, out: Path) -> tuple[dict, str | None]:
    """`quantize.accuracy_aware`: quantize keeping the fewest most-sensitive nodes in FP32 until the validation
    accuracy is within select.max_drop_vs_teacher of the FP32 source; (settings to log, error or None)."""
    cfg = params.compress
    result = sensitivity.accuracy_aware(src, dst, option, calib, splits.rows(splits.X_val), splits.y_val,
                                        cfg.select.max_drop_vs_teacher, max_excluded=cfg.quantize.max_fp32_nodes)
    (out / "accuracy_aware.json").write_text(json.dumps(result.as_dict(), indent=2))
    settings = {"fp32_nodes": len(result.excluded), "fp32_node_names": ",".join(s.node for s in result.excluded)}
    return settings, None if result.success else f"accuracy-aware quantization failed: {result.summary}"


@task(task_run_name="quantize_variant[{base.name}+{option}]")
def quantize_variant(root: Path, params: Params, base: Built, option: str, data: DataVersion,
                     parent_run_id: str) -> Built:
    """INT8 by `option` (compress.quantize.options: int8-dyn, int8-qdq-<calibration>, -pc, -rr) with
    onnxruntime.quantization after quant_pre_process; static options calibrate on a seeded train sample. With
    `quantize.accuracy_aware`, the most sensitive nodes stay FP32 until the validation accuracy is within
    `select.max_drop_vs_teacher` of the FP32 source. Its test predictions must agree with the FP32 file's on at
    least `quantize.min_agreement` of the rows."""
    cfg = params.compress.quantize
    opt = quantize.QuantOption.parse(option)
    splits = load_splits(Path(data.prepared))
    name = f"{base.name}+{opt.name}"
    settings = {"option": opt.name, "mode": opt.mode, "per_channel": opt.per_channel,
                "reduce_range": opt.reduce_range, "calibration": opt.calibration if opt.needs_calibration else "none",
                "calibration_rows": cfg.calibration_rows if opt.needs_calibration else 0,
                "format": "QDQ" if opt.needs_calibration else "QOperator", "accuracy_aware": cfg.accuracy_aware}
    if not base.onnx_path:
        return _skipped(root, params, name, opt.name, base, settings, data, parent_run_id,
                        f"its base {base.name} was skipped")
    run_id = _open_run(root, params, parent_run_id, name, opt.name, base, settings, data)
    out = work_dir(root, run_id)
    dst, src = out / "model.onnx", Path(base.onnx_path)
    calib = (quantize.calibration_sample(splits, cfg.calibration_rows, params.project.seed)
             if opt.needs_calibration else None)
    error = None
    with export.export_guard.exclusive():
        if cfg.accuracy_aware:
            extra, error = _accuracy_aware(params, src, dst, opt, calib, splits, out)
            connect(root, params.mlflow)[0].log_batch(run_id, params=[Param(k, vocab.clip(v, vocab.PARAM_LIMIT))
                                                                      for k, v in extra.items()])
            settings = {**settings, **extra}
        if not dst.is_file():  # plain, or accuracy-aware that ended without a file: measure plain INT8
            quantize.quantize(src, dst, opt, calib)
        uri, digest = _log_onnx(root, params, run_id, dst, splits.X_test, splits.labels)
    agreement = quantize.agreement(dst, src, splits.X_test)
    client = connect(root, params.mlflow)[0]
    if (out / "accuracy_aware.json").is_file():
        client.log_artifact(run_id, str(out / "accuracy_aware.json"))
    client.log_batch(run_id, metrics=stamped({"agreement_with_fp32": agreement,
                                              "integer_ops": quantize.integer_ops(dst)}))
    error = error or quantize.disagreement(agreement, cfg.min_agreement)
    get_run_logger().info("%s: %.1f kB (FP32 %.1f kB), agreement with FP32 %.4f%s", name, dst.stat().st_size / 1e3,
                          src.stat().st_size / 1e3, agreement, f", {settings['fp32_nodes']} node(s) kept FP32"
                          if cfg.accuracy_aware else "")
    return Built(name, opt.name, base.name, base.family, run_id, str(dst), digest, uri, base.spec,
                 base.n_classes, None, None, base.parameters, base.sparsity, settings, error)


@task(task_run_name="fuse_variant[{base.name}+fused]")
def fuse_variant(root: Path, params: Params, base: Built, data: DataVersion, parent_run_id: str) -> Built:
    """`compress.fuse`: the base's ONNX graph with attention, LayerNorm and GELU fused (ottimo.compress.fusion),
    checked against the base's logits on test rows; an FP32 candidate of its own and the file INT8 starts from.
    What fused and what did not is logged (fusion.json, tag compress.fusion)."""
    splits = load_splits(Path(data.prepared))
    name = f"{base.name}+fused"
    if not base.onnx_path:
        return _skipped(root, params, name, "fuse", base, {}, data, parent_run_id, f"its base {base.name} was skipped")
    run_id = _open_run(root, params, parent_run_id, name, "fuse", base, {}, data)
    out = work_dir(root, run_id)
    dst = out / "model.onnx"
    with export.export_guard.exclusive():
        try:
            rep = fusion.optimize(Path(base.onnx_path), dst, check_rows=splits.X_test[:32])
        except fusion.FusionError as err:
            return _skipped(root, params, name, "fuse", base, {}, data, parent_run_id, str(err), run_id)
        uri, digest = _log_onnx(root, params, run_id, dst, splits.X_test, splits.labels)
    (out / "fusion.json").write_text(json.dumps(rep.as_dict(), indent=2))
    client = connect(root, params.mlflow)[0]
    client.log_artifact(run_id, str(out / "fusion.json"))
    client.set_tag(run_id, "compress.fusion", vocab.clip(rep.summary))
    client.log_batch(run_id, metrics=stamped({"nodes_before": rep.nodes_before, "nodes_after": rep.nodes_after,
                                              "attention_fused": rep.attention_fused,
                                              "fusion_max_abs_diff": rep.max_abs_diff or 0.0}))
    get_run_logger().info("%s: %s", name, rep.summary)
    settings = {"nodes_before": rep.nodes_before, "nodes_after": rep.nodes_after,
                "fused": ",".join(f"{k}x{v}" for k, v in rep.fused.items()) or "nothing"}
    return Built(name, "fuse", base.name, base.family, run_id, str(dst), digest, uri, base.spec, base.n_classes,
                 None, None, base.parameters, base.sparsity, settings)


@task
def measure_candidates(root: Path, params: Params, built: list[Built], data: DataVersion) -> list[pareto.Row]:
    """Every candidate (sha256 checked first) measured in this process: accuracy, macro-F1, throughput and size one
    file at a time; latency interleaved round-robin across all of them on each of `evaluate.targets`, with p50/p95
    95% intervals (ottimo.onnx.latency.figures). Figures logged to the compressed candidates' runs, which are then
    closed."""
    log = get_run_logger()
    client, _ = connect(root, params.mlflow)
    splits = load_splits(Path(data.prepared))
    paths = {b.name: verify_sha256(Path(b.onnx_path), b.sha256) for b in built if b.onnx_path}
    timed = latency.figures(paths, splits.X_test, params.evaluate)
    rows = []
    for b in built:
        if not b.onnx_path:  # skipped: shown in the report with its reason, never measured or chosen
            rows.append(pareto.Row(b.name, b.technique, b.base, dict.fromkeys(MEASURED, float("nan")), b.parameters,
                                   0.0, b.run_id, b.error, b.settings))
            client.set_terminated(b.run_id, "FINISHED")
            continue
        metrics, _ = measure(paths[b.name], splits.X_test, splits.y_test, params.evaluate, latency=False)
        m = metrics.as_dict() | timed[b.name]
        rows.append(pareto.Row(b.name, b.technique, b.base, m, b.parameters, b.sparsity, b.run_id, b.error,
                               b.settings))
        log.info("%-40s acc %.4f p50 %.4f ms p95 %s ms (%s) %7.1f kB %7d params sparsity %.2f%s", b.name,
                 m["accuracy"], m["p50_ms"], latency.interval_of(m), params.evaluate.target, m["size_mb"] * 1e3,
                 b.parameters, b.sparsity, f" ({b.error})" if b.error else "")
        if b.technique != "trained":  # a trained model's run already has the pipeline's test figures
            client.log_batch(b.run_id, metrics=stamped({**{f"test_{k}": v for k, v in m.items()},
                                                        "parameters": b.parameters, "sparsity": b.sparsity}))
            client.set_terminated(b.run_id, "FINISHED")
            checkpoint("mid-compression")  # some variants measured and closed, the rest still RUNNING
    return rows


@task
def report_and_select(root: Path, params: Params, rows: list[pareto.Row], teacher: str,
                      parent_run_id: str, gate: bool = True, champion_accuracy: float | None = None,
                      same_data: bool = True) -> pareto.Selection:
    """Selection policy against the FP32 teacher (with `gate`, candidates the gate would pass against the champion
    of `champion_accuracy` first, held to gate.min_gain when `same_data`: the champion's data revision); Pareto
    PNG, markdown and HTML tables on the parent run and as a Prefect artifact; the choice and every loser's
    reason written to the runs. No candidate qualifying raises GateFailed (the flow run fails, nothing is
    registered); with `gate` the pipeline run's gate tags say so (run alone, the pipeline run's earlier verdict
    is left as it was)."""
    client, _ = connect(root, params.mlflow)
    by_name = {r.name: r for r in rows}
    selection = pareto.select(rows, by_name[teacher].metrics["accuracy"], params.compress.select,
                              params.gate if gate else None, champion_accuracy, same_data)
    out = work_dir(root, parent_run_id) / "compression"
    out.mkdir(exist_ok=True)
    title = f"Compression of {teacher}: {len(rows)} candidates"
    md = pareto.markdown(rows, selection, title)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(pareto.html(rows, selection, title))
    pareto.pareto_png(rows, selection, out / "pareto.png")
    client.log_artifacts(parent_run_id, str(out), "compression")
    create_markdown_artifact(markdown=md, key="compression-report", description=title)
    for r in rows:
        client.set_tag(r.run_id, "compress.selection", selection.reasons[r.name][:5000])
    client.set_tag(parent_run_id, "compress.selected", selection.chosen or "none")
    client.set_tag(parent_run_id, "compress.reasons", vocab.clip("; ".join(f"{k}: {v}" for k, v in
                                                                selection.reasons.items())))
    get_run_logger().info("compression: %s", selection.summary)
    if selection.chosen is None:
        if gate:
            client.set_tag(parent_run_id, vocab.GATE_VERDICT, "failed")
            client.set_tag(parent_run_id, vocab.GATE_REASONS, vocab.clip(selection.summary))
        raise GateFailed(f"gate failed: {selection.summary}. champion unchanged. Relax compress.select "
                         "(max_drop_vs_teacher, min_accuracy) in params.yaml or the compression settings.")
    return selection


def as_evaluated(built: list[Built], rows: list[pareto.Row], chosen: str) -> Evaluated:
    """The chosen candidate as the gate and registry take it: its model URI, sha256 and measured figures."""
    b = next(x for x in built if x.name == chosen)
    r = next(x for x in rows if x.name == chosen)
    return Evaluated(b.name, b.run_id, b.model_uri, b.sha256, b.parameters, dict(r.metrics), b.family, b.onnx_path)


@dataclass(frozen=True)
class CompressionResult:
    built: list[Built]
    rows: list[pareto.Row]
    selection: pareto.Selection


def from_trained(params: Params, cand: Candidate, exp: Exported) -> Built:
    """A trained candidate (its checkpoint and ONNX file) as the starting point of compression."""
    return Built(cand.family, "trained", "", cand.family, cand.run_id, exp.onnx_path, exp.sha256, exp.model_uri,
                 cand.spec, cand.n_classes, cand.checkpoint, cand.recipe, cand.parameters)


@task
def resolve_teacher(root: Path, params: Params, run_id: str, data: DataVersion) -> tuple[Built, str]:
    """`ottimo compress --run-id`: the teacher (compress.teacher's training run under a pipeline run, or the
    training run itself) rebuilt from its logged checkpoint and params, exported again; and its pipeline run."""
    client, exp = connect(root, params.mlflow)
    run = client.get_run(run_id)
    kind = run.data.tags.get(vocab.KIND)
    if kind == vocab.PIPELINE:
        family = params.compress.teacher
        found = client.search_runs([exp], f"tags.`{vocab.PARENT}` = '{run_id}' and tags.`{vocab.KIND}` = "
                                   f"'{vocab.CANDIDATE}' and tags.`model.family` = '{family}'",
                                   order_by=["start_time DESC"])
        if not found:
            raise ValueError(f"pipeline run {run_id} has no trained {family!r} model; set compress.teacher to a "
                             "family it trained, or pass that training run's id")
        run, parent = found[0], run_id
    elif kind == vocab.CANDIDATE:
        parent = run.data.tags.get(vocab.PARENT, run_id)
    else:
        raise ValueError(f"run {run_id} is a {kind!r} run; pass a pipeline run or a trained candidate's run "
                         "(ottimo.kind 'pipeline' or 'candidate')")
    rev = run.data.tags.get(vocab.DATA_REVISION)
    if rev != data.revision:
        raise ValueError(f"run {run.info.run_id} was trained on data revision {str(rev)[:12]}, the project's data "
                         f"is at {data.revision[:12]}; check that data out (git + dvc checkout) and run again")
    family = run.data.tags[vocab.FAMILY_RUN]
    out = work_dir(root, run.info.run_id)
    ckpt = Path(download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint.pt", dst_path=str(out)))
    r = Recipe.from_json(Path(download_artifacts(run_id=run.info.run_id, artifact_path=RECIPE_FILE,
                                                 dst_path=str(out))).read_text())
    splits = load_splits(Path(data.prepared))
    model = rebuild(r, splits.input, len(splits.labels), ckpt)
    path = export_onnx(model, splits.input, out / "model.onnx")
    parity_check(model, path, splits.X_test, params.evaluate.parity_atol)
    uri = run_model_uri(client, run.info.run_id)  # the model logged by its pipeline (named after the family)
    return Built(family, "trained", "", family, run.info.run_id, str(path), sha256(path), uri, splits.input,
                 len(splits.labels), str(ckpt), r, count_parameters(model)), parent
