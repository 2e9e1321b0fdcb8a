"""The evaluation job: load the model `evaluate.model` names, evaluate it, log the metrics to MLflow.

Where metrics go: ``evaluate.run_id`` when set; else the model's training run (an MLflow model's source run, or
a checkpoint's ``mlflow_run_id``), so the MLflow UI compares runs on them; else a new run in
``evaluate.experiment`` tagged with what it evaluated. Metrics are logged at the step training uses (samples
seen) when the model records it, so a final evaluation lands at the end of the training curves.

With ``evaluate.wise_alpha`` the model evaluated is WiSE-FT of the fine-tuned model with its run's start
(`loading.with_wise_ft`). It goes to a new evaluation run (``evaluate.run_id`` still wins) tagged with the training
run, so that its alpha is a param (``evaluate.wise_alpha``: MLflow params cannot change, so one run an alpha); its
metrics are ``wise_ft/alpha_<a>/<metric>``, the names training gives its ``train.finetune.eval_alphas``, and its
record ``evaluation/wise_ft/alpha_<a>/step-<n>.json``. A registered version's evaluation tags are left alone: the
weights evaluated are not that version's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clipdr import tracking, wiseft
from clipdr.config import Config, flatten
from clipdr.evaluate import engine, loading

EVALUATION_TAG = "clipdr.evaluation_of"  # on new evaluation runs: the model they evaluated
SOURCE_RUN_TAG = "clipdr.source_run_id"  # ... and the run that trained it, when known
EVALUATION_RUN_TAG = "clipdr.evaluation.run_id"  # on a registered version: the run its last evaluation went to
EVALUATION_ARTIFACT_TAG = "clipdr.evaluation.artifact"  # ... and that evaluation's record in the run


class EvaluateError(ValueError):
    """A config or model that cannot be evaluated; the message says what to change."""


@dataclass(frozen=True)
class EvaluationResult:
    """What `run` did: the metrics as logged, the MLflow run and step they were logged at, and the model evaluated."""

    metrics: dict[str, float]
    run_id: str
    step: int
    model_name: str
    report: engine.EvalReport


def _target_run(cfg: Config, loaded: loading.LoadedModel, log: Callable[[str], None]) -> tuple[tracking.Tracker, bool]:
    """The tracker to log to and whether it is a new run (to be finished here)."""
    ec, uri = cfg.evaluate, cfg.tracking.uri
    run_id = ec.run_id or ("" if loaded.wise_ft else loaded.run_id)  # one alpha a run: its param
    if run_id:
        try:
            return tracking.open_run(run_id, uri=uri), False
        except tracking.RegistryError:
            if ec.run_id:
                raise EvaluateError(
                    f"evaluate.run_id {ec.run_id!r} is not a run of {tracking.tracking_uri(uri)}"
                ) from None
            log(f"evaluate: the model's training run {run_id} is not in {tracking.tracking_uri(uri)}; new run")
    tags = {EVALUATION_TAG: ec.model, "clipdr.job": "evaluate", "clipdr.student": loaded.name}
    if loaded.run_id:
        tags[SOURCE_RUN_TAG] = loaded.run_id
    name = f"eval-{loaded.name}" + (f"-alpha_{ec.wise_alpha:.2f}" if loaded.wise_ft else "")
    tracker = tracking.Tracker.start(ec.experiment, name, uri=uri, tags=tags)
    tracker.log_params(flatten(ec, "evaluate."))
    return tracker, True


def run(cfg: Config, log: Callable[[str], None] = print) -> EvaluationResult:
    """Evaluates ``cfg.evaluate.model`` on the ``[evaluate]`` datasets and logs the metrics (see the module doc)."""
    ec = cfg.evaluate
    if not ec.model:
        raise EvaluateError("set evaluate.model: runs:/<id>/model, models:/<name>@<alias>, a checkpoint or a name")
    try:
        wise = loading.wise_ft_on(ec.wise_alpha, "evaluate.wise_alpha")
        device = engine.resolve_device(ec.device)
        loaded = loading.load(
            ec.model, ec.pretrained, device, tracking_uri=cfg.tracking.uri, allow_pickle=ec.allow_pickle
        )
        if wise:
            loaded = loading.with_wise_ft(loaded, ec.wise_alpha, cfg.tracking.uri, "evaluate.wise_alpha")
            log(f"evaluate: WiSE-FT at alpha {ec.wise_alpha:g} with the start {loaded.wise_ft['start']}")
        log(f"evaluate: {loaded.name} from {loaded.source} on {device}")
        report = engine.evaluate(loaded.model, loaded.name, ec, device)
    except (ValueError, FileNotFoundError) as e:
        raise EvaluateError(str(e)) from None

    tracker, new_run = _target_run(cfg, loaded, log)
    if ec.step >= 0:
        step = ec.step
    elif loaded.samples_seen is not None:
        step = loaded.samples_seen
    else:
        step = (tracking.last_step(tracker.run_id, uri=cfg.tracking.uri) or 0) if not new_run else 0
    prefix = f"{wiseft.alpha_label(ec.wise_alpha)}/" if loaded.wise_ft else ""
    metrics = {prefix + k: v for k, v in report.metrics.items()}
    tracker.log_metrics(metrics, step=step)
    version = tracking.model_version_of(ec.model, uri=cfg.tracking.uri) if loading.is_mlflow_uri(ec.model) else None
    evaluated: dict = {"model": ec.model, "step": step}
    if version is not None:  # an alias moves: the version it named when evaluated is what the record keeps
        evaluated["model_version"] = f"{version.name}/{version.version}"
    if loaded.wise_ft:
        evaluated["wise_ft"] = loaded.wise_ft
    artifact = f"evaluation/{prefix}step-{step:012d}.json"
    tracker.log_dict({**report.to_dict(), **evaluated}, artifact)
    if version is not None and not loaded.wise_ft:  # the version leads to its evaluation (MLflow's version page)
        tracking.set_model_version_tags(
            version.name,
            version.version,
            {EVALUATION_RUN_TAG: tracker.run_id, EVALUATION_ARTIFACT_TAG: artifact},
            uri=cfg.tracking.uri,
        )
    if new_run:
        tracker.finish()

    width = max(len(k) for k in metrics)
    for key, value in sorted(metrics.items()):
        log(f"  {key:<{width}}  {value:.4f}")
    for dataset in report.datasets:
        if dataset["skipped"]:
            log(f"evaluate: {dataset['kind']} {dataset['name']}: skipped {dataset['skipped']}")
    where = "new evaluation run" if new_run else "run"
    log(f"evaluate: {len(metrics)} metrics -> MLflow {where} {tracker.run_id} at step {step}")
    return EvaluationResult(metrics, tracker.run_id, step, loaded.name, report)
