"""The training job's driver: check everything, plan, resume, run Ray Train, log and register the final model.

``run(cfg)``:

1. validates the config (mode, lambda, sizes) and opens the data: a reinforced dataset is checked against the
   mode (``reinforced`` needs the stored embeddings of every teacher it distils from, synthetic captions need
   S >= 1; `data.check_dataset` says what differs), raw source shards are accepted for ``clip`` only;
2. finds the run's storage ``<output>/<run_name>``: a ``clipdr_run.json`` there means a resubmission, which reuses
   the recorded MLflow run id and refuses changed settings; the newest complete checkpoint (its ``meta.json``)
   sets where the data stream restarts;
3. builds the `loop.TrainPlan` and the input stream (`pipeline.build_dataset`) and runs a ``TorchTrainer`` with
   ``FailureConfig(max_failures)``: dead workers restart from the last checkpoint inside the same fit;
4. logs the final model with ``mlflow.pytorch`` (a `models.ClipEmbedder`, signature and input example), the
   config and final checkpoint as artifacts, optionally registers it with tags (mode, student, dataset), and
   closes the MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from clipdr import records, storage
from clipdr.config import Config, TrainConfig, flatten, to_dict
from clipdr.data import sources
from clipdr.train import data
from clipdr.train.loop import META_FILE, MODEL_FILE, CheckpointMeta, TrainPlan

RUN_FILE = "clipdr_run.json"  # written at the first submission: MLflow run id, recipe, data fingerprint
RESULT_FILE = "clipdr_result.json"  # written when the final model is logged: the run is complete
# Settings a resubmission may change without breaking the run (scaling and bookkeeping, not the recipe).
_RESUMABLE_CHANGES = ("resources", "log_every", "checkpoint_every", "keep_checkpoints", "register", "eval_every")


class TrainError(ValueError):
    """A training config or dataset that cannot run; the message says what and where."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind."""

    run_name: str
    mlflow_run_id: str
    checkpoint: str
    steps: int
    samples_seen: int
    model_uri: str
    registered_version: str


# --------------------------------------------------------------------------- checks


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TrainError(message)


def check_config(cfg: TrainConfig) -> None:
    """Refuses settings that cannot train, naming the key."""
    _check(bool(cfg.data), "train.data is empty: name a reinforced dataset or source shards")
    _check(cfg.mode in data.MODES, f"train.mode {cfg.mode!r} is not one of {', '.join(data.MODES)}")
    _check(0.0 <= cfg.kd_weight <= 1.0, f"train.kd_weight (lambda) must be in [0, 1], got {cfg.kd_weight}")
    if cfg.mode != data.CLIP:
        _check(cfg.kd_weight > 0, f"train.mode {cfg.mode!r} distils: train.kd_weight must be > 0 (0 is mode clip)")
    res = cfg.resources
    _check(res.workers >= 1, f"train.resources.workers must be >= 1, got {res.workers}")
    _check(cfg.batch_size >= 2, f"train.batch_size must be >= 2 (contrastive), got {cfg.batch_size}")
    _check(
        cfg.batch_size % res.workers == 0,
        f"train.batch_size {cfg.batch_size} must divide evenly over train.resources.workers = {res.workers}",
    )
    _check(cfg.accum_steps >= 1, f"train.accum_steps must be >= 1, got {cfg.accum_steps}")
    _check(cfg.samples >= cfg.batch_size * cfg.accum_steps, "train.samples is less than one optimiser step")
    _check(cfg.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16: {cfg.precision}")
    _check(cfg.lr > 0 and cfg.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _check(getattr(cfg, key) >= 1, f"train.{key} must be >= 1, got {getattr(cfg, key)}")
    _check(cfg.max_logit_scale > 1, f"train.max_logit_scale must be > 1, got {cfg.max_logit_scale}")
    _check(not cfg.run_name or re.fullmatch(r"[\w.-]+", cfg.run_name) is not None, "train.run_name: use [A-Za-z0-9_.-]")


def resolve_paths(cfg: Config) -> Config:
    """The config with relative local paths made absolute: Ray Train workers do not run in the submitter's
    working directory."""
    tc, ev = cfg.train, cfg.evaluate
    pretrained = storage.absolute(tc.pretrained) if tc.pretrained and Path(tc.pretrained).exists() else tc.pretrained
    train = dataclasses.replace(
        tc, data=storage.absolute(tc.data), output=storage.absolute(tc.output), pretrained=pretrained
    )
    evaluate = dataclasses.replace(
        ev,
        zeroshot=tuple(storage.absolute(u) for u in ev.zeroshot),
        retrieval=tuple(storage.absolute(u) for u in ev.retrieval),
    )
    return dataclasses.replace(cfg, train=train, evaluate=evaluate)


def check_evaluation(cfg: Config) -> None:
    """With train.evaluate, the [evaluate] datasets must exist now, not fail the run at its first evaluation."""
    if not cfg.train.evaluate:
        return
    ev = cfg.evaluate
    _check(bool(ev.zeroshot or ev.retrieval), "train.evaluate is set but [evaluate] names no zeroshot/retrieval data")
    for key, uris in (("zeroshot", ev.zeroshot), ("retrieval", ev.retrieval)):
        for uri in uris:
            _check(storage.exists(uri), f"evaluate.{key}: {uri} does not exist (train.evaluate is set)")


def open_data(cfg: TrainConfig) -> tuple[str, records.ReinforcedDataset | None, list[str]]:
    """``(uri, dataset or None for raw shards, shard files)``, refusing data that does not fit the mode."""
    uri = cfg.data
    if storage.exists(records.manifest_uri(uri)):
        use_syn = cfg.use_syn_captions and cfg.mode != data.CLIP
        try:
            dataset = data.check_dataset(
                uri, cfg.mode, cfg.teachers or _all_teachers(uri), min_syn_captions=1 if use_syn else 0
            )
        except records.RecordsError as e:
            raise TrainError(f"train.data {uri}: {e}") from None
        return uri, dataset, list(dataset.shard_uris)
    try:
        files = sources.list_shards(uri)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"train.data {uri}: no manifest.json, and no source shards: {e}") from None
    _check(bool(files), f"train.data {uri}: no manifest.json and no source shards")
    _check(
        cfg.mode == data.CLIP,
        f"train.data {uri} holds raw source shards (no manifest.json): only mode 'clip' trains on those; "
        f"mode {cfg.mode!r} needs a reinforced dataset (run `clipdr reinforce` first)",
    )
    return uri, None, files


def _all_teachers(uri: str) -> list[str]:
    return list(records.read_manifest(uri).teacher_names)


def _fingerprint(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def default_run_name(cfg: TrainConfig) -> str:
    data_name = storage.basename(cfg.data.rstrip("/")) or "data"
    return re.sub(r"[^\w.-]+", "-", f"{cfg.model}-{cfg.mode}-{data_name}-{cfg.samples}")


# --------------------------------------------------------------------------- resume


def _run_dir(cfg: TrainConfig, run_name: str) -> str:
    return storage.join(cfg.output, run_name)


def latest_checkpoint(run_dir: str) -> tuple[str, CheckpointMeta] | None:
    """The complete checkpoint (``meta.json`` present) with the most steps under ``run_dir``, if any."""
    best: tuple[str, CheckpointMeta] | None = None
    fs, path = storage.resolve(run_dir)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = Path(info.path).name
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        uri = storage.join(run_dir, name)
        meta_uri = storage.join(uri, META_FILE)
        if not storage.exists(meta_uri):
            continue
        meta = CheckpointMeta.from_json(storage.read_bytes(meta_uri))
        if best is None or meta.step > best[1].step:
            best = (uri, meta)
    return best


def _recipe(cfg: Config) -> dict:
    """The settings a resumed run must keep (everything but scaling and bookkeeping)."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _RESUMABLE_CHANGES}
    return {"train": train, "augment": to_dict(cfg.augment)}


def _diff(old: dict, new: dict) -> list[str]:
    flat_old, flat_new = flatten(old), flatten(new)
    return [
        f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
        for k in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(k) != flat_new.get(k)
    ]


# --------------------------------------------------------------------------- run


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cfg.resources.use_gpu else "fp32"


def make_plan(
    cfg: Config,
    teachers: list[records.TeacherSpec],
    *,
    run_name: str = "",
    start_batches: int = 0,
    mlflow_run_id: str = "",
    tracking_uri: str = "",
) -> TrainPlan:
    """The workers' `TrainPlan` for ``cfg.train``, distilling from ``teachers`` (in loss order; ignored in clip)."""
    tc = cfg.train
    clip = tc.mode == data.CLIP
    samples_per_step = tc.batch_size * tc.accum_steps
    total_steps = math.ceil(tc.samples / samples_per_step)
    return TrainPlan(
        run_name=run_name or default_run_name(tc),
        model=tc.model,
        pretrained=tc.pretrained,
        mode=tc.mode,
        teachers=() if clip else tuple(dataclasses.asdict(t) for t in teachers),
        kd_weight=0.0 if clip else tc.kd_weight,
        use_syn_captions=tc.use_syn_captions and not clip,
        caption_loss_weight=tc.caption_loss_weight,
        global_batch=tc.batch_size,
        local_batch=tc.batch_size // tc.resources.workers,
        accum_steps=tc.accum_steps,
        total_steps=total_steps,
        warmup_steps=min(total_steps, tc.warmup_samples // samples_per_step),
        lr=tc.lr,
        min_lr=tc.min_lr,
        beta1=tc.beta1,
        beta2=tc.beta2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        grad_clip=tc.grad_clip,
        max_logit_scale=tc.max_logit_scale,
        precision=_precision(tc),
        grad_checkpointing=tc.grad_checkpointing,
        seed=tc.seed,
        log_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every,
        eval_every=tc.eval_every,
        evaluate=tc.evaluate,
        start_batches=start_batches,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        threads=max(1, int(tc.resources.cpus_per_worker)),
        config=to_dict(cfg),
    )


def run(cfg: Config, log: Callable[[str], None] = print) -> TrainResult:
    """Trains ``cfg.train`` end to end on Ray (module docstring). Raises `TrainError` before any work on bad input."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipdr import tracking
    from clipdr.cluster import ensure_ray, storage_runtime_env
    from clipdr.train import pipeline, remote

    cfg = resolve_paths(cfg)
    tc = cfg.train
    check_config(tc)
    check_evaluation(cfg)
    uri, dataset, files = open_data(tc)
    manifest = dataset.manifest if dataset else None
    teacher_names = list(tc.teachers or (manifest.teacher_names if manifest else ()))
    if tc.mode == data.CLIP:
        teacher_names = []
    try:
        preprocess = data.student_preprocess(tc.model)
    except ValueError as e:
        raise TrainError(f"train.model: {e}") from None

    run_name = tc.run_name or default_run_name(tc)
    run_dir = _run_dir(tc, run_name)
    run_file = storage.join(run_dir, RUN_FILE)
    recipe = _recipe(cfg)
    data_fingerprint = (
        _fingerprint(manifest.to_json()) if manifest else sources.fingerprint(sources.describe_shards(uri))
    )
    ensure_ray()

    previous = json.loads(storage.read_bytes(run_file)) if storage.exists(run_file) else None
    if previous is not None:
        changed = _diff(previous["recipe"], recipe)
        if changed or previous["data_fingerprint"] != data_fingerprint:
            changed += ["the training data changed"] if previous["data_fingerprint"] != data_fingerprint else []
            raise TrainError(
                f"run {run_name!r} at {run_dir} was started with other settings; resubmitting resumes it, so they "
                f"must match (or choose another train.run_name): {'; '.join(changed)}"
            )
        rows_per_epoch = previous["rows_per_epoch"]
        result_file = storage.join(run_dir, RESULT_FILE)
        if storage.exists(result_file):  # a finished run: resubmitting it is a no-op
            result = TrainResult(**json.loads(storage.read_bytes(result_file)))
            log(f"train: run {run_name!r} is complete ({result.steps} steps); nothing to do")
            return result
    else:
        num_rows = manifest.num_rows if manifest else pipeline.count_source_rows(files)
        rows_per_epoch = (num_rows // tc.batch_size) * tc.batch_size
    _check(rows_per_epoch > 0, f"train.data {uri} has fewer samples than one global batch ({tc.batch_size})")

    tracker_tags = {"clipdr.job": "train", "clipdr.mode": tc.mode, "clipdr.student": tc.model}
    if previous is None:
        tracker = tracking.Tracker.start(tc.experiment, run_name, uri=cfg.tracking.uri, tags=tracker_tags)
        tracker.log_params(flatten(to_dict(tc), "train."))
        tracker.log_params({"data.fingerprint": data_fingerprint, "data.rows_per_epoch": rows_per_epoch})
        if manifest is not None:
            for spec in manifest.teachers:
                tracker.log_params({f"teacher.{spec.name}": json.dumps(dataclasses.asdict(spec))})
            tracker.log_dict(manifest.to_dict(), "data/manifest.json")
        tracker.log_dict(to_dict(cfg), "config.json")
        state = {
            "mlflow_run_id": tracker.run_id,
            "recipe": recipe,
            "data_fingerprint": data_fingerprint,
            "rows_per_epoch": rows_per_epoch,
        }
        storage.write_bytes(run_file, json.dumps(state, indent=2).encode())
        log(f"train: run {run_name!r}, MLflow run {tracker.run_id}")
    else:
        tracker = tracking.Tracker.start(tc.experiment, run_id=previous["mlflow_run_id"], uri=cfg.tracking.uri)
        log(f"train: resuming run {run_name!r}, MLflow run {tracker.run_id}")

    total_steps = math.ceil(tc.samples / (tc.batch_size * tc.accum_steps))
    batches_per_epoch = rows_per_epoch // tc.batch_size  # micro-batches each worker takes from one epoch
    total_batches = total_steps * tc.accum_steps
    resume = latest_checkpoint(run_dir)
    done_batches = resume[1].batches if resume else 0
    start_epoch = done_batches // batches_per_epoch
    num_epochs = math.ceil(total_batches / batches_per_epoch)
    if resume:
        log(f"train: checkpoint at step {resume[1].step} ({resume[1].samples_seen} samples): {resume[0]}")

    plan = make_plan(
        cfg,
        [manifest.teacher(n) for n in teacher_names] if manifest else [],
        run_name=run_name,
        start_batches=start_epoch * batches_per_epoch,
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.client.tracking_uri,
    )
    source = pipeline.DataSource(uri, tuple(files), rows_per_epoch, manifest)
    dataset_stream = pipeline.build_dataset(
        source, tc, cfg.augment, preprocess, teacher_names, rows_per_epoch, range(start_epoch, max(num_epochs, 1))
    )
    fs, storage_path = storage.resolve(tc.output)
    res = tc.resources
    trainer = TorchTrainer(
        remote.train_loop,
        train_loop_config={"plan": dataclasses.asdict(plan)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            worker_runtime_env=storage_runtime_env(),
        ),
        datasets={"train": dataset_stream},
        dataset_config=ray.train.DataConfig(execution_options=pipeline.ingest_options()),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    log(f"train: fit finished in {time.perf_counter() - started:.1f} s")
    return _finish(cfg, tracker, result, run_name, log)


def _finish(cfg: Config, tracker: Any, result: Any, run_name: str, log: Callable[[str], None]) -> TrainResult:
    """Logs the final checkpoint and model (registered if asked) to the run and closes it."""
    import torch

    from clipdr import models, tracking

    tc = cfg.train
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise TrainError(f"run {run_name!r} finished without a checkpoint")
    with checkpoint.as_directory() as directory:
        meta = CheckpointMeta.read(directory)
        for name in (MODEL_FILE, META_FILE):
            tracker.log_artifact(Path(directory) / name, "checkpoint")
        clip = models.create_model(meta.model)
        clip.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu"))
    embedder = models.ClipEmbedder(clip.eval(), meta.model).eval()
    example_in, example_out = embedder.example(batch_size=2)
    logged = tracking.log_model(
        tracker,
        embedder,
        input_example=example_in.numpy(),
        output_example=example_out.numpy(),
        metadata={"clipdr_model": meta.model, "mode": meta.mode, "samples_seen": meta.samples_seen},
        registered_model_name=tc.register,
        version_tags={"mode": tc.mode, "student": tc.model, "dataset": tc.data, "run_name": run_name},
    )
    if logged.version:  # a new registered version is the candidate the evaluation gate may promote
        from clipdr import lifecycle

        lifecycle.mark_candidate(logged.registered_name, logged.version, uri=tracker.client.tracking_uri)
    tracker.finish("FINISHED")
    result = TrainResult(
        run_name=run_name,
        mlflow_run_id=tracker.run_id,
        checkpoint=storage.join(_run_dir(tc, run_name), Path(checkpoint.path).name),
        steps=meta.step,
        samples_seen=meta.samples_seen,
        model_uri=logged.uri,
        registered_version=logged.version,
    )
    storage.write_bytes(
        storage.join(_run_dir(tc, run_name), RESULT_FILE), json.dumps(dataclasses.asdict(result)).encode()
    )
    where = f", registered as {logged.registered_name} v{logged.version} @candidate" if logged.version else ""
    log(f"train: {meta.step} steps, {meta.samples_seen} samples; model {logged.uri}{where}")
    return result
