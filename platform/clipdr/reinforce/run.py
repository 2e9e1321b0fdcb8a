"""The reinforcement job: validate, plan (resume), run the Ray Data pipeline, write the manifest last, track.

Resume and idempotence. Every output shard is written atomically and carries, in its Parquet footer, the
fingerprint of the settings that made it (teachers, captioner, views, seeds, source). A rerun with the same
config keeps the shards whose fingerprint matches and reinforces only the missing source shards; output made
with other settings is refused rather than mixed in. The manifest is written only when every source shard
has its output, and describes exactly those shards. The MLflow run id is kept beside the data (a
`clipdr.runstate` file), so a resumed job continues the same run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass

from clipdr import augment, records, runstate, storage
from clipdr import progress as progress_lines
from clipdr.accelerators import AcceleratorError
from clipdr.config import Config, ReinforceConfig, fields_dict, flatten, to_dict
from clipdr.data import sources
from clipdr.reinforce import cost
from clipdr.reinforce.chunks import ShardTask, read_shard_metadata

EXPERIMENT = "reinforce"


class ReinforceError(ValueError):
    """A reinforcement that cannot start as configured; the message says what to change."""


class ShardsFailedError(RuntimeError):
    """Source shards whose reinforcement failed; the other shards were written, these were not (a rerun redoes them).

    Attributes:
        failed: ``{source shard: why}``.
    """

    def __init__(self, failed: dict[str, str], num_shards: int, crash_retries: int) -> None:
        self.failed = dict(failed)
        lines = "\n".join(f"  {source}: {why}" for source, why in sorted(failed.items()))
        super().__init__(
            f"{len(failed)} of {num_shards} source shards failed and were not written (the others are complete; "
            f"a worker that died was retried {crash_retries} times, reinforce.resources.crash_retries); no manifest "
            f"was written. Rerun to redo only these; a shard that keeps killing its worker is hostile or too large "
            f"for a worker's memory:\n{lines}"
        )


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any model is loaded."""

    manifest: records.Manifest | None  # layout and provenance; shards and skip counts are filled in at the end
    fingerprint: str
    tasks: tuple[ShardTask, ...]  # every source shard
    done: tuple[str, ...]  # output shards already complete from an earlier run with the same settings
    complete: bool  # a manifest with these settings exists: nothing to do
    notes: tuple[str, ...] = ()  # what a dry run could not check

    @property
    def pending(self) -> tuple[ShardTask, ...]:
        return tuple(t for t in self.tasks if t.output not in self.done)

    def describe(self) -> str:
        m = self.manifest
        if m is None:
            return "\n".join(f"note          {n}" for n in self.notes)
        lines = [
            f"source        {m.source_uri} ({len(self.tasks)} shards, fingerprint {m.source_fingerprint[:16]})",
            f"views         K={m.num_augmentations}, synthetic captions S={m.num_syn_captions}",
            *(
                f"teacher       {t.name}: {t.model} ({t.pretrained or 'random init'}), D={t.embed_dim}, "
                f"{t.image_size}px, logit scale {t.logit_scale:g}"
                for t in m.teachers
            ),
            f"captioner     {m.captioner.kind} {m.captioner.model} ({m.captioner.pretrained or 'random init'}), "
            f"top-p {m.captioner.top_p}"
            if m.captioner
            else "captioner     none (S = 0: an embeddings-only pass)",
            f"storage       {m.embedding_bytes_per_sample:,} bytes of fp16 embeddings a sample "
            f"((K + 1 + S) x sum(D) x 2)",
            f"progress      {len(self.done)}/{len(self.tasks)} shards done"
            + (", dataset complete" if self.complete else ""),
            *(f"note          {n}" for n in self.notes),
        ]
        return "\n".join(lines)


def run_fingerprint(manifest: records.Manifest, legacy: bool = False) -> str:
    """What makes a shard's output: every setting of the manifest but its provenance, its parts and the teachers' a_k,
    and the record layout version (`records.SCHEMA_VERSIONS`: a partial run of one layout is never completed with
    shards of another).

    A teacher's ``logit_scale`` (a_k) is recorded in the manifest as the default a training run distils with, but
    it changes no stored byte: it is a training choice (``train.loss.teacher_scales`` overrides it), so it is not
    part of what the shards are. ``legacy`` gives the fingerprint shards written before that decision carry (a_k
    included), so their partial outputs still resume.
    """
    # Parts are added to a complete dataset by passes of their own, each with its own fingerprint (`reinforce.parts`).
    settings = {k: v for k, v in to_dict(manifest).items() if k not in ("created_at", "code_version", "parts")}
    if not legacy:
        settings["teachers"] = [{k: v for k, v in t.items() if k != "logit_scale"} for t in settings["teachers"]]
    return runstate.fingerprint({"manifest": settings, "schema": manifest.schema_version})


def _without_scales(teachers: tuple[records.TeacherSpec, ...]) -> tuple[records.TeacherSpec, ...]:
    return tuple(dataclasses.replace(t, logit_scale=1.0) for t in teachers)


def _check_writable(output: str) -> None:
    probe = storage.join(output, "_write_probe")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (OSError, ValueError) as e:
        raise ReinforceError(f"reinforce.output {output!r} is not writable: {e}") from None


def _settings_differences(expected: records.Manifest, found: records.Manifest) -> list[str]:
    fields = ("teachers", "captioner", "augment", "num_augmentations", "num_syn_captions", "augment_seed")
    diffs = [f for f in fields if getattr(expected, f) != getattr(found, f)]
    if "teachers" in diffs and _without_scales(expected.teachers) == _without_scales(found.teachers):
        diffs.remove("teachers")  # only a_k differs: a training choice, not stored data (`run_fingerprint`)
    if expected.source_fingerprint != found.source_fingerprint:
        diffs.append("source (shard names or sizes changed)")
    return diffs


def captioner_spec(cfg: ReinforceConfig) -> records.CaptionerSpec:
    """The spec of ``[reinforce.captioner]``, validated (no model is loaded)."""
    from clipdr.models.captioners import validate_captioner

    try:
        captioner = records.CaptionerSpec(
            name=cfg.captioner.model,
            kind=cfg.captioner.kind,
            model=cfg.captioner.model,
            pretrained=cfg.captioner.pretrained,
            top_p=cfg.captioner.top_p,
            temperature=cfg.captioner.temperature,
            max_len=cfg.captioner.max_len,
            seed=cfg.seed,
        )
        validate_captioner(captioner)
    except ValueError as e:  # records.RecordsError (the spec's own checks: top_p, max_len, ...) included
        raise ReinforceError(f"reinforce.captioner: {e}") from None
    return captioner


def plan(config: Config) -> Plan:
    """Validates everything that can be checked without models and compute, and decides what is left to do."""
    from clipdr.models.teachers import TeacherError, teacher_spec

    cfg = config.reinforce
    if not cfg.source or not cfg.output:
        raise ReinforceError("reinforce.source and reinforce.output must both be set")
    for key, uri in (("reinforce.source", cfg.source), ("reinforce.output", cfg.output)):
        try:
            if not storage.is_s3(uri):  # an S3 URI is checked where it is read or written (no filesystem here)
                storage.resolve(uri)  # the scheme and form only: nothing is read or written
        except ValueError as e:
            raise ReinforceError(f"{key}: {e}") from None
    if cfg.num_augmentations < 1:
        raise ReinforceError(f"reinforce.num_augmentations (K={cfg.num_augmentations}) must be >= 1")
    if cfg.num_syn_captions < 0:
        raise ReinforceError(
            f"reinforce.num_syn_captions (S={cfg.num_syn_captions}) must be >= 0 (0: an embeddings-only pass, no "
            "captioner)"
        )
    if (
        min(
            cfg.resources.batch_size,
            cfg.resources.teacher_actors,
            cfg.resources.captioner_actors,
            cfg.resources.writers,
        )
        < 1
    ):
        raise ReinforceError("reinforce.resources: batch_size, actor counts and writers must be >= 1")
    for stage in ("teacher", "captioner"):
        least, most = getattr(cfg.resources, f"{stage}_actors"), getattr(cfg.resources, f"{stage}_actors_max")
        if most and most < least:
            raise ReinforceError(
                f"reinforce.resources.{stage}_actors_max ({most}) is below {stage}_actors ({least}): the most must be "
                "at least the least (0: a fixed pool)"
            )
    if cfg.resources.crash_retries < 0:
        raise ReinforceError(f"reinforce.resources.crash_retries must be >= 0, got {cfg.resources.crash_retries}")
    augment_spec = records.AugmentSpec.from_config(config.augment)
    try:
        augment.check_spec(augment_spec)
    except ValueError as e:
        raise ReinforceError(str(e)) from None
    if not cfg.teachers:
        raise ReinforceError("reinforce.teachers is empty: add at least one [[reinforce.teachers]] table")
    names = [t.name for t in cfg.teachers]
    if len(set(names)) != len(names):
        raise ReinforceError(f"reinforce.teachers: duplicate names {names}")
    try:
        resolved = [(t, teacher_spec(t, offline=cfg.dry_run)) for t in cfg.teachers]
    except (TeacherError, records.RecordsError) as e:
        raise ReinforceError(str(e)) from None
    teachers = tuple(spec for _, spec in resolved if spec is not None)
    notes = tuple(
        f"teacher {t.name}: {t.model} keeps its config on the hub; resolved when loaded"
        for t, spec in resolved
        if spec is None
    )
    # S = 0: an embeddings-only pass; no captioner is validated, loaded or recorded
    captioner = captioner_spec(cfg) if cfg.num_syn_captions > 0 else None

    if cfg.dry_run and (storage.is_s3(cfg.source) or storage.is_s3(cfg.output)):
        # A dry run validates what needs no network; object storage may be out of reach from here.
        shards, fingerprint_of_source = [], "unchecked"
        notes += ("source and output are on object storage: not checked in a dry run",)
    else:
        try:
            shards = sources.describe_shards(cfg.source)
        except (FileNotFoundError, ValueError) as e:
            raise ReinforceError(f"reinforce.source: {e}") from None
        if not shards:
            raise ReinforceError(f"reinforce.source {cfg.source!r} holds no .tar or .parquet shards")
        fingerprint_of_source = sources.fingerprint(shards)
    tasks = tuple(ShardTask(s.uri, s.output_path) for s in shards)
    if not teachers:  # only possible in a dry run of hub-only teachers
        return Plan(None, "", tasks, (), complete=False, notes=notes)
    manifest = records.Manifest(
        teachers=teachers,
        captioner=captioner,
        augment=augment_spec,
        num_augmentations=cfg.num_augmentations,
        num_syn_captions=cfg.num_syn_captions,
        augment_seed=cfg.seed,
        source_uri=cfg.source,
        source_fingerprint=fingerprint_of_source,
    )
    fingerprint = run_fingerprint(manifest)
    legacy_fingerprint = run_fingerprint(manifest, legacy=True)
    if not shards:
        return Plan(manifest, fingerprint, tasks, (), complete=False, notes=notes)
    _check_writable(cfg.output)

    if storage.exists(records.manifest_uri(cfg.output)):
        found = records.read_manifest(cfg.output)
        diffs = _settings_differences(manifest, found)
        if diffs:
            raise ReinforceError(
                f"reinforce.output {cfg.output!r} already holds a dataset made with other settings "
                f"({', '.join(diffs)}): choose another output or delete it"
            )
        return Plan(manifest, fingerprint, tasks, tuple(t.output for t in tasks), complete=True)

    expected = {t.output for t in tasks}
    v1 = dataclasses.replace(manifest, schema_version=1)
    older_layouts = (run_fingerprint(v1), run_fingerprint(v1, legacy=True)) if manifest.schema_version > 1 else ()
    done = []
    found_uris = storage.list_files(cfg.output, (records.SHARD_SUFFIX,), recursive=True)
    for uri, (_, schema) in zip(found_uris, records.read_shard_footers(found_uris), strict=True):
        name = uri[len(cfg.output.rstrip("/")) + 1 :]
        meta = read_shard_metadata(schema)
        made_by = meta.get("run_fingerprint", "") if meta is not None else ""
        if name in expected and any(runstate.matches(made_by, f) for f in older_layouts):
            raise ReinforceError(
                f"reinforce.output {cfg.output!r} holds {name!r}, which an earlier clipdr wrote in record layout "
                f"version 1 (this one writes version {manifest.schema_version}, `records.SCHEMA_VERSIONS`): a partial "
                "run is never completed with shards of another layout. Finish it with the clipdr that started it, "
                "or delete the output (or choose another) to redo it in the new layout"
            )
        if name not in expected or not any(runstate.matches(made_by, f) for f in (fingerprint, legacy_fingerprint)):
            raise ReinforceError(
                f"reinforce.output {cfg.output!r} holds {name!r}, which an earlier run made with other settings or "
                "from another source: choose another output or delete it"
            )
        done.append(name)
    return Plan(manifest, fingerprint, tasks, tuple(sorted(done)), complete=False)


def _finish_manifest(cfg_output: str, p: Plan) -> records.Manifest:
    shards, skipped = [], Counter()
    footers = records.read_shard_footers([storage.join(cfg_output, task.output) for task in p.tasks])
    for task, (num_rows, schema) in zip(p.tasks, footers, strict=True):
        shards.append(records.ShardInfo(task.output, num_rows))
        skipped.update(read_shard_metadata(schema)["skipped"])
    manifest = dataclasses.replace(p.manifest, shards=tuple(shards), skipped=dict(skipped))
    records.write_manifest(cfg_output, manifest)
    return manifest


def count_duplicate_keys(shard_uris: list[str], *, num_buckets: int = 64) -> int:
    """Rows whose sample key an earlier row of the dataset already has (0 when every key is unique).

    A shard skips repeats of a key within itself (skip reason ``duplicate_key``); this counts the ones across
    shards, which each shard cannot see. Only the key column is read, a row group at a time; each key becomes a
    64-bit hash, spread over ``num_buckets`` temporary files by its low bits, and each bucket is sorted and counted
    on its own: memory is one bucket (8 bytes a row / ``num_buckets``), local disk 8 bytes a row. Two distinct keys
    with one hash would count one repeat too many; among 1e9 keys the odds that any pair does are ~3%.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="clipdr-keys-") as tmp:
        paths = [Path(tmp) / f"{b:03d}.u64" for b in range(num_buckets)]
        outs = [path.open("wb") for path in paths]
        try:
            for uri in shard_uris:
                fs, path = storage.resolve(uri)
                with fs.open_input_file(path) as f:
                    parquet = pq.ParquetFile(f)
                    for group in range(parquet.num_row_groups):
                        keys = parquet.read_row_group(group, columns=[records.KEY]).column(0)
                        hashes = pd.util.hash_array(keys.to_numpy(zero_copy_only=False).astype(object))
                        bucket_of = hashes % np.uint64(num_buckets)
                        for b in np.unique(bucket_of):
                            outs[int(b)].write(hashes[bucket_of == b].tobytes())
        finally:
            for out in outs:
                out.close()
        repeats = 0
        for path in paths:
            hashes = np.sort(np.fromfile(path, dtype=np.uint64))
            repeats += int(np.count_nonzero(hashes[1:] == hashes[:-1]))
        return repeats


def continues(state: runstate.RunState | None, p: Plan) -> bool:
    """Whether the recorded reinforcement ``state`` is this plan's run (its MLflow run continues). A run recorded
    before a_k left the fingerprint (`run_fingerprint`) carries the legacy one: the same input."""
    return state is not None and any(
        not state.changes(f, {}) for f in (p.fingerprint, run_fingerprint(p.manifest, legacy=True))
    )


def _tracker(config: Config, p: Plan):
    from clipdr.tracking import Tracker

    output = config.reinforce.output
    state = runstate.read(output, runstate.REINFORCE_STATE)
    run_id = state.mlflow_run_id if continues(state, p) else None
    tracker = Tracker.start(EXPERIMENT, run_id=run_id, uri=config.tracking.uri, tags={"output": output})
    if run_id is None:
        runstate.write(output, runstate.REINFORCE_STATE, runstate.RunState(tracker.run_id, p.fingerprint))
        tracker.log_params({**flatten(config.reinforce, "reinforce."), **flatten(config.augment, "augment.")})
        tracker.log_dict([fields_dict(t) for t in p.manifest.teachers], "teachers.json")
        if p.manifest.captioner is not None:  # an embeddings-only pass (S = 0) has none
            tracker.log_dict(dataclasses.asdict(p.manifest.captioner), "captioner.json")
        source = p.manifest.source_uri
        tracker.log_dataset(  # its input in MLflow's Datasets column; training runs log the output and name this run
            storage.basename(source.rstrip("/")) or source,
            p.manifest.source_fingerprint,
            source,
            {"shards": len(p.tasks)},
            context="source",
        )
    return tracker


def dry_run_cost(config: Config) -> str:
    """The dry run's accelerator-hours (`clipdr.reinforce.cost`): FLOPs a sample, floor, projection."""
    cfg = config.reinforce
    try:
        return cost.estimate(config, source_readable=not storage.is_s3(cfg.source)).describe()
    except AcceleratorError as e:  # cost.CostError included
        raise ReinforceError(str(e)) from None


def run(config: Config, log=print) -> records.Manifest | None:
    """Runs (or resumes) a reinforcement; returns the manifest of the complete dataset (None for a dry run)."""
    from clipdr.cluster import ensure_ray
    from clipdr.reinforce.pipeline import run_pipeline

    cfg = config.reinforce
    if cfg.add:  # a part added to a complete dataset (`clipdr.reinforce.parts`)
        from clipdr.reinforce import parts

        return parts.run(config, log)
    p = plan(config)
    log(p.describe())
    if cfg.dry_run:
        log(dry_run_cost(config))
        log("dry run: the configuration is valid; no model was loaded and nothing was written")
        return None
    if p.complete:
        log(f"{cfg.output} is already complete: nothing to do")
        return records.read_manifest(cfg.output)

    with _tracker(config, p) as tracker:
        log(f"MLflow run {tracker.run_id} (experiment {EXPERIMENT!r})")
        started = time.monotonic()
        progress = {"shards": len(p.done), "rows": 0}

        def on_shard(name: str, num_rows: int, written_at: float) -> None:
            progress["shards"] += 1
            progress["rows"] += num_rows
            elapsed = time.monotonic() - started
            left = len(p.tasks) - progress["shards"]
            fields = [f"{num_rows} rows", f"{progress['rows'] / max(elapsed, 1e-9):.1f} samples/s"]
            eta = progress_lines.eta_s(elapsed, progress["shards"] - len(p.done), left)  # this run's shards
            log(progress_lines.line("reinforce", f"shard {name}", progress["shards"], len(p.tasks), fields, eta))

        if p.pending:
            ensure_ray()
            try:
                failed = run_pipeline(cfg, p.pending, p.manifest, p.fingerprint, on_shard)
            except Exception:
                # A shard that fails (a storage error that outlasted its retries, ...) has no output and there is no
                # manifest: nothing records it as done or skipped, so a rerun with the same config redoes it.
                log(
                    f"reinforcement failed with {progress['shards']}/{len(p.tasks)} shards complete; the others have "
                    "no output: rerun the same config to do them"
                )
                raise
            if failed:  # the same, for shards the stream dropped while it finished the others
                log(
                    f"reinforcement failed with {progress['shards']}/{len(p.tasks)} shards complete; the others have "
                    "no output: rerun the same config to do them"
                )
                raise ShardsFailedError(failed, len(p.tasks), cfg.resources.crash_retries)
        elapsed = time.monotonic() - started
        manifest = _finish_manifest(cfg.output, p)
        duplicates = count_duplicate_keys([storage.join(cfg.output, s.path) for s in manifest.shards])
        if duplicates:
            log(
                f"warning: {duplicates} rows repeat a sample key of another shard (kept: each is a row of the "
                "dataset, trained on like any other; deduplicate the source if they are the same samples)"
            )
        tracker.log_metrics(
            {
                "num_rows": manifest.num_rows,
                "num_shards": len(manifest.shards),
                "num_skipped": manifest.num_skipped,
                "duplicate_keys_across_shards": duplicates,
                **{f"skipped.{reason}": count for reason, count in manifest.skipped},
                "elapsed_s": elapsed,
                "samples_per_s": progress["rows"] / elapsed if elapsed > 0 else 0.0,
                "bytes_per_sample_embeddings": manifest.embedding_bytes_per_sample,
            }
        )
        tracker.log_dict(json.loads(manifest.to_json()), records.MANIFEST_NAME)
        log(f"reinforced {manifest.num_rows} samples ({manifest.num_skipped} skipped) -> {cfg.output}")
        return manifest
