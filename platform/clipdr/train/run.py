"""The training job's driver: check everything, plan, resume, run Ray Train, log and register the final model.

``run(cfg)``:

1. validates the config (`plan.check_config`: mode, lambda, sizes) and opens the data: a reinforced dataset is
   checked against the mode (``reinforced`` needs the stored embeddings of every teacher it distils from,
   synthetic captions need S >= 1; `data.check_dataset` says what differs), raw source shards are accepted for
   ``clip`` only;
2. finds the run's storage ``<output>/<run_name>``: a run state there (`clipdr.runstate`) means a resubmission,
   which reuses the recorded MLflow run id and refuses changed settings or data; the newest complete checkpoint
   (`clipdr.checkpoint.latest`) sets where the data stream restarts;
3. builds the `plan.TrainPlan` and the input stream (`pipeline.build_dataset`) and runs a ``TorchTrainer`` with
   ``FailureConfig(max_failures)``: dead workers restart from the last checkpoint inside the same fit;
4. logs the final model as safetensors (`tracking.log_model`: a `models.ClipEmbedder`, signature and input
   example), the config and final checkpoint as artifacts, optionally registers it with tags (mode, student,
   dataset), and closes the MLflow run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdr import checkpoint, records, runstate, storage
from clipdr.config import Config, TrainConfig, TrainFinetune, fields_dict, flatten, to_dict, upgrade
from clipdr.data import sources
from clipdr.train import data
from clipdr.train.plan import (
    Mode,
    TrainError,
    caption_sets_used,
    check_config,
    check_evaluation,
    default_run_name,
    make_plan,
    require,
    syn_captions_used,
    teacher_scales,
    uses_syn_captions,
)

# Keys (sections included) of [train] a resubmission may change without breaking the run: scaling and bookkeeping,
# not the recipe.
_RESUMABLE_CHANGES = (
    "resources",
    "checkpoint",
    "log_every",
    "register",
    "eval_every",
    "dry_run",
    "cost",
    "channels_last",
    "compile",
    "loss.local_loss",
)  # scaling, bookkeeping and speed knobs (memory layout, compilation, which rows of the loss a rank computes)
# Settings of [train] added after runs were recorded, with the value every earlier run had: they enter a recipe only
# when set otherwise, so that runs recorded before they existed still resume.
_LATER_SETTINGS = {
    "teacher_scales": [],
    "num_syn_captions": 0,
    "syn_caption_sets": [],
    "schedule.kind": "cosine",
    "schedule.cooldown_samples": 0,
    "finetune": to_dict(TrainFinetune()),
}


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


# --------------------------------------------------------------------------- data


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


def open_data(cfg: TrainConfig) -> tuple[str, records.ReinforcedDataset | None, list[str]]:
    """``(uri, dataset or None for raw shards, shard files)``, refusing data that does not fit the mode."""
    uri = cfg.data
    if storage.exists(records.manifest_uri(uri)):
        try:
            dataset = data.check_dataset(
                uri,
                cfg.mode,
                cfg.teachers or _all_teachers(uri),
                # A dataset without synthetic captions trains on real ones only (`plan.syn_captions_used`).
                min_syn_captions=cfg.num_syn_captions if uses_syn_captions(cfg) else 0,
            )
        except records.RecordsError as e:
            raise TrainError(f"train.data {uri}: {e}") from None
        return uri, dataset, list(dataset.shard_uris)
    try:
        files = sources.list_shards(uri)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"train.data {uri}: no manifest.json, and no source shards: {e}") from None
    require(bool(files), f"train.data {uri}: no manifest.json and no source shards")
    require(
        not Mode(cfg.mode).needs_manifest,
        f"train.data {uri} holds raw source shards (no manifest.json): only mode 'clip' trains on those; "
        f"mode {cfg.mode!r} needs a reinforced dataset (run `clipdr reinforce` first)",
    )
    return uri, None, files


def _all_teachers(uri: str) -> list[str]:
    return list(records.read_manifest(uri).teacher_names)


def data_fingerprint_of(
    uri: str, manifest: records.Manifest | None, teachers: Sequence[str] = (), caption_sets: Sequence[str] = ()
) -> str:
    """What a run's data is, for refusing a resubmission on other data: the manifest of a reinforced dataset with
    the parts the run reads (those of its ``teachers`` and ``caption_sets``: a part added later leaves a run's data as
    it was), the shard names and sizes of raw source shards."""
    if manifest is None:
        return sources.fingerprint(sources.describe_shards(uri))
    used = tuple(
        p for p in manifest.parts if p.caption_set in caption_sets or (p.teacher and p.teacher.name in teachers)
    )
    return runstate.fingerprint(dataclasses.replace(manifest, parts=used).to_json())


# --------------------------------------------------------------------------- resume


def run_dir(cfg: TrainConfig, run_name: str) -> str:
    """Where run ``run_name`` of ``cfg`` keeps its checkpoints, state and result: ``<output>/<run_name>``."""
    return storage.join(cfg.output, run_name)


def _leaf(table: dict, dotted: str) -> tuple[dict, str]:
    """The table holding the dotted key ``dotted`` of ``table``, and the key's last part."""
    *sections, name = dotted.split(".")
    for section in sections:
        table = table[section]
    return table, name


def _without_resumable(train: dict) -> dict:
    """``train`` (a [train] table, nested) without `_RESUMABLE_CHANGES`; a copy."""
    train = copy.deepcopy(train)
    for dotted in _RESUMABLE_CHANGES:
        *sections, name = dotted.split(".")
        table = train
        for section in sections:
            table = table.get(section, {})
        table.pop(name, None)
    return train


def _recipe(cfg: Config) -> dict:
    """The settings a resumed run must keep (everything but scaling and bookkeeping), nested like the config."""
    train = _without_resumable(to_dict(cfg.train))
    for dotted, default in _LATER_SETTINGS.items():
        table, name = _leaf(train, dotted)
        if table[name] == default:
            del table[name]
    return {"train": train, "augment": to_dict(cfg.augment)}


def recorded_recipe(state: runstate.RunState) -> dict:
    """A run state's recipe in today's layout: runs recorded when [train] was flat (``train.lr``, now
    ``train.optimizer.lr``) compare key for key with a resubmission's `_recipe` (`clipdr.config.upgrade`); a
    setting that became resumable after it was recorded (``loss.local_loss``) is dropped."""
    recipe = upgrade(state.recipe)
    return {**recipe, "train": _without_resumable(recipe["train"])}


# --------------------------------------------------------------------------- run


REINFORCE_RUN_TAG = "clipdr.data.reinforce_run"  # a training run's tag: the MLflow run that reinforced its data


def _log_lineage(
    tracker: Any, uri: str, fingerprint: str, manifest: records.Manifest | None, shards: int, rows: int
) -> None:
    """The run's inputs in MLflow (its Datasets column): the training data, and for a reinforced dataset the source
    it was reinforced from, each with its fingerprint, where it lives and its counts."""
    name = storage.basename(uri.rstrip("/")) or uri
    profile = {"rows_per_epoch": rows, "shards": shards}
    if manifest is not None:
        profile |= {"rows": manifest.num_rows, "teachers": list(manifest.teacher_names)}
        profile |= {"views": manifest.num_augmentations, "synthetic_captions": manifest.num_syn_captions}
    tracker.log_dataset(name, fingerprint, uri, profile, context="training")
    if manifest is not None and manifest.source_uri and manifest.source_fingerprint:
        source = manifest.source_uri
        source_name = storage.basename(source.rstrip("/")) or source
        tracker.log_dataset(source_name, manifest.source_fingerprint, source, {}, context="reinforced-from")


def _student_preprocess(tc: TrainConfig) -> data.StudentPreprocess:
    """The student's preprocessing; `TrainError` naming ``train.model`` when no model of that name exists."""
    try:
        return data.student_preprocess(tc.model)
    except ValueError as e:
        raise TrainError(f"train.model: {e}") from None


def dry_run(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Prints the plan of ``cfg.train`` (`clipdr.train.estimate`): reads a local dataset's manifest, never a bucket,
    loads no weight and starts nothing."""
    from clipdr.train import estimate

    tc = cfg.train
    _student_preprocess(tc)
    teachers: list[records.TeacherSpec] = []
    syn_captions = None
    rows, source = None, f"{tc.data}: not read (object storage; the dry run reads no bucket)"
    if not storage.is_s3(tc.data):
        _, dataset, files = open_data(tc)
        if dataset is None:
            source = f"{tc.data}: {len(files)} raw source shards (their samples are counted when the run starts)"
        else:
            rows, source = dataset.manifest.num_rows, f"the manifest of {tc.data}"
            names = tc.teachers or dataset.manifest.teacher_names
            teachers = [dataset.manifest.teacher(n) for n in names] if Mode(tc.mode).distils else []
            _, syn_captions = caption_sets_used(tc, dataset.manifest.caption_sets)
            _, why = syn_captions_used(tc, syn_captions)
            if why:
                log(f"note          {why}")
    log(estimate.estimate(cfg, teachers, rows, source, syn_captions).describe())
    log("dry run: the configuration is valid; no model was loaded and nothing was trained")


def run(cfg: Config, log: Callable[[str], None] = print) -> TrainResult | None:
    """Trains ``cfg.train`` end to end on Ray (module docstring); with ``train.dry_run`` prints the plan instead
    (`dry_run`) and returns None. Raises `TrainError` before any work on bad input."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipdr import tracking
    from clipdr.cluster import ensure_ray, storage_runtime_env
    from clipdr.train import pipeline, remote

    cfg = resolve_paths(cfg)
    tc, sched = cfg.train, cfg.train.schedule
    check_config(tc)
    if tc.dry_run:
        dry_run(cfg, log)
        return None
    check_evaluation(cfg)
    uri, dataset, files = open_data(tc)
    manifest = dataset.manifest if dataset else None
    teacher_names = list(tc.teachers or (manifest.teacher_names if manifest else ())) if Mode(tc.mode).distils else []
    preprocess = _student_preprocess(tc)
    caption_sets, dataset_syn = caption_sets_used(tc, manifest.caption_sets) if manifest else ((), 0)
    num_syn, why = syn_captions_used(tc, dataset_syn) if manifest else (0, "")
    caption_sets = caption_sets if num_syn else ()
    if manifest is not None and teacher_names:
        teacher_scales(tc, [manifest.teacher(n) for n in teacher_names])  # refused now, not after the run started
    if why:
        log(f"train: {why}")

    run_name = tc.run_name or default_run_name(tc)
    directory = run_dir(tc, run_name)
    recipe = _recipe(cfg)
    data_fingerprint = data_fingerprint_of(uri, manifest, teacher_names, caption_sets)
    ensure_ray()

    previous = runstate.read(directory, runstate.TRAIN_STATE)
    if previous is not None:
        previous = dataclasses.replace(previous, recipe=recorded_recipe(previous))
        changed = previous.changes(data_fingerprint, recipe, "the training data")
        if changed:
            raise TrainError(
                f"run {run_name!r} at {directory} was started with other settings; resubmitting resumes it, so they "
                f"must match (or choose another train.run_name): {'; '.join(changed)}"
            )
        rows_per_epoch = previous.facts["rows_per_epoch"]
        finished = runstate.read_result(directory, runstate.TRAIN_RESULT)
        if finished is not None:  # a finished run: resubmitting it is a no-op
            result = TrainResult(**finished)
            log(f"train: run {run_name!r} is complete ({result.steps} steps); nothing to do")
            return result
    else:
        num_rows = manifest.num_rows if manifest else pipeline.count_source_rows(files)
        rows_per_epoch = (num_rows // sched.batch_size) * sched.batch_size
    require(rows_per_epoch > 0, f"train.data {uri} has fewer samples than one global batch ({sched.batch_size})")

    tracker_tags = {"clipdr.job": "train", "clipdr.mode": tc.mode, "clipdr.student": tc.model}
    made_by = runstate.read(uri, runstate.REINFORCE_STATE) if manifest is not None else None
    if made_by is not None:  # the reinforcement run that made the data: the student's lineage in MLflow
        tracker_tags[REINFORCE_RUN_TAG] = made_by.mlflow_run_id
    if previous is None:
        tracker = tracking.Tracker.start(
            tc.experiment, run_name, uri=cfg.tracking.uri, tags=tracker_tags, parent_run_id=cfg.tracking.parent_run_id
        )
        _log_lineage(tracker, uri, data_fingerprint, manifest, len(files), rows_per_epoch)
        tracker.log_params(flatten(to_dict(tc), "train."))
        tracker.log_params({"data.fingerprint": data_fingerprint, "data.rows_per_epoch": rows_per_epoch})
        if manifest is not None:
            for spec in manifest.teachers:
                tracker.log_params({f"teacher.{spec.name}": json.dumps(fields_dict(spec))})
            tracker.log_dict(manifest.to_dict(), "data/manifest.json")
        tracker.log_dict(to_dict(cfg), "config.json")
        state = runstate.RunState(tracker.run_id, data_fingerprint, recipe, {"rows_per_epoch": rows_per_epoch})
        runstate.write(directory, runstate.TRAIN_STATE, state)
        log(f"train: run {run_name!r}, MLflow run {tracker.run_id}")
    else:
        tracker = tracking.Tracker.start(tc.experiment, run_id=previous.mlflow_run_id, uri=cfg.tracking.uri)
        log(f"train: resuming run {run_name!r}, MLflow run {tracker.run_id}")

    total_steps = math.ceil(sched.samples / (sched.batch_size * sched.accum_steps))
    batches_per_epoch = rows_per_epoch // sched.batch_size  # micro-batches each worker takes from one epoch
    total_batches = total_steps * sched.accum_steps
    resume = checkpoint.latest(directory)
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
        resume_from=resume[0] if resume else "",
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.client.tracking_uri,
        dataset_caption_sets=manifest.caption_sets if manifest else None,
    )
    if previous is None:  # what the run distils with, defaults from the manifest resolved (`plan.teacher_scales`)
        chosen = {f"distill.a_k.{t.name}": t.logit_scale for t in plan.teacher_specs}
        sets = {"distill.syn_caption_sets": ",".join(plan.syn_caption_sets)} if plan.syn_caption_sets else {}
        tracker.log_params({**chosen, "distill.syn_captions_used": num_syn, **sets})
    source = pipeline.DataSource(uri, tuple(files), rows_per_epoch, manifest)
    dataset_stream = pipeline.build_dataset(
        source, plan, cfg.augment, preprocess, rows_per_epoch, range(start_epoch, max(num_epochs, 1))
    )
    fs, storage_path = storage.resolve(tc.output)
    res = tc.resources
    trainer = TorchTrainer(
        remote.train_loop,
        train_loop_config={"plan": plan.to_dict()},
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.checkpoint.keep),
            worker_runtime_env=storage_runtime_env(),
        ),
        datasets={"train": dataset_stream},
        dataset_config=pipeline.data_config(),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish_failed()  # never replaces the training error (a tracking server that is down would)
        raise
    log(f"train: fit finished in {time.perf_counter() - started:.1f} s")
    return _finish(cfg, tracker, result, run_name, log)


def publish(cfg: Config, tracker: Any, directory: str | Path, run_name: str) -> tuple[checkpoint.CheckpointMeta, Any]:
    """Logs the checkpoint in the local folder ``directory`` to ``tracker``'s run: its published files (the
    fine-tuned weights, `checkpoint.PUBLISHED_FILES`) and the model, WiSE-FT with the start at
    ``train.finetune.wise_alpha`` (`clipdr.wiseft`; registered if asked). Returns the checkpoint's meta and the
    `tracking.LoggedModel`."""
    from clipdr import models, tracking, wiseft

    tc = cfg.train
    meta = checkpoint.CheckpointMeta.read(directory)
    for name in checkpoint.PUBLISHED_FILES:  # the fine-tuned weights, which evaluation and export may interpolate
        if (Path(directory) / name).exists():  # ema.pt only with train.finetune.ema_decay
            tracker.log_artifact(Path(directory) / name, checkpoint.ARTIFACT_PATH)
    clip = models.create_model(meta.model)
    weights = checkpoint.published_weights(directory)  # the EMA, with train.finetune.ema_decay
    alpha = tc.finetune.wise_alpha
    if alpha != 1.0:  # WiSE-FT with the start (train.pretrained)
        start = wiseft.create_start(tc.model, tc.pretrained, tc.seed, tracking_uri=tracker.client.tracking_uri)
        weights = wiseft.wise_ft(start.state_dict(), weights, alpha)
    clip.load_state_dict(weights)
    embedder = models.ClipEmbedder(clip.eval(), meta.model).eval()
    logged = tracking.log_model(
        tracker,
        embedder,
        metadata={
            "clipdr_model": meta.model,
            "mode": meta.mode,
            "samples_seen": meta.samples_seen,
            wiseft.LOGGED_EMA_DECAY: tc.finetune.ema_decay,
            wiseft.LOGGED_ALPHA: alpha,
        },
        registered_model_name=tc.register,
        version_tags={"mode": tc.mode, "student": tc.model, "dataset": tc.data, "run_name": run_name},
    )
    return meta, logged


def _finish(cfg: Config, tracker: Any, result: Any, run_name: str, log: Callable[[str], None]) -> TrainResult:
    """Logs the final checkpoint and model (registered if asked) to the run and closes it."""
    tc = cfg.train
    final = result.checkpoint
    if final is None:
        raise TrainError(f"run {run_name!r} finished without a checkpoint")
    with final.as_directory() as directory:
        meta, logged = publish(cfg, tracker, directory, run_name)
    if logged.version:  # a new registered version is the candidate the evaluation gate may promote
        from clipdr import lifecycle

        lifecycle.mark_candidate(logged.registered_name, logged.version, uri=tracker.client.tracking_uri)
    tracker.finish("FINISHED")
    result = TrainResult(
        run_name=run_name,
        mlflow_run_id=tracker.run_id,
        checkpoint=storage.join(run_dir(tc, run_name), Path(final.path).name),
        steps=meta.step,
        samples_seen=meta.samples_seen,
        model_uri=logged.uri,
        registered_version=logged.version,
    )
    runstate.write_result(run_dir(tc, run_name), runstate.TRAIN_RESULT, dataclasses.asdict(result))
    where = f", registered as {logged.registered_name} v{logged.version} @candidate" if logged.version else ""
    log(f"train: {meta.step} steps, {meta.samples_seen} samples; model {logged.uri}{where}")
    return result
