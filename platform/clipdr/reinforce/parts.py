"""Passes that add a part to a complete reinforced dataset: a caption set, or a teacher (`reinforce.add`).

A part is one Parquet file a base shard under ``<dataset>/parts/<part>/``, holding the new columns and the key in the
base shard's row order (`records.PartSpec`; docs/reinforce.md says why sidecars). A pass rewrites nothing that
exists: it reads the base shards (and the caption sets it needs), writes its own files, and rewrites only the
manifest, last, to list the part. It keeps the base job's guarantees: every file is written atomically by the same
writer and carries the part's fingerprint in its footer; a rerun keeps the files whose fingerprint matches and does
only the missing ones; the part is listed only once every base shard has its file. The MLflow run id is kept in the
part's folder, so a resumed pass continues its run.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

from clipdr import progress as progress_lines
from clipdr import records, runstate, storage
from clipdr.config import Config, TeacherConfig, flatten, to_dict
from clipdr.reinforce.chunks import ShardTask, read_shard_metadata
from clipdr.reinforce.run import EXPERIMENT, ReinforceError, ShardsFailedError, captioner_spec, run_fingerprint


@dataclass(frozen=True)
class PartPlan:
    """What a part pass will do, decided before any model is loaded.

    Attributes:
        manifest: The dataset as it is (the part is not listed yet).
        part: The part, without its files (they are listed when all are written).
        fingerprint: The part's.
        teachers: The teacher configs the pass loads (`stages.EmbedPart`).
        columns: Columns of the dataset it reads.
        tasks: One per base shard: ``source`` and ``output`` both the shard's path.
        done: Base shards whose part file exists with this fingerprint.
        complete: The manifest lists the part already: nothing to do.
    """

    manifest: records.Manifest
    part: records.PartSpec
    fingerprint: str
    teachers: tuple[TeacherConfig, ...]
    columns: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    done: tuple[str, ...]
    complete: bool

    @property
    def pending(self) -> tuple[ShardTask, ...]:
        return tuple(t for t in self.tasks if t.output not in self.done)

    @property
    def layout(self) -> records.PartLayout:
        return records.PartLayout(self.manifest, self.part)

    def describe(self) -> str:
        p = self.part
        what = (
            f"caption set {p.caption_set!r}: S={p.num_syn_captions} captions a sample by {p.captioner.kind} "
            f"{p.captioner.model} (top-p {p.captioner.top_p}), text embeddings of teachers {list(p.teachers)}"
            if p.kind == "captions"
            else f"teacher {p.teacher.name}: {p.teacher.model} ({p.teacher.pretrained or 'random init'}), "
            f"D={p.teacher.embed_dim}, with text embeddings of caption sets {list(p.caption_sets)}"
        )
        return "\n".join(
            [
                f"part          {p.name} ({records.PARTS_DIR}/{p.name}/): {what}",
                f"base          {len(self.tasks)} shards, {self.manifest.num_rows} rows; nothing of them is rewritten",
                f"progress      {len(self.done)}/{len(self.tasks)} part files done"
                + (", part complete" if self.complete else ""),
            ]
        )


def _scale_free(spec: records.TeacherSpec) -> records.TeacherSpec:
    return dataclasses.replace(spec, logit_scale=1.0)  # a_k is a training choice (`run.run_fingerprint`)


def part_fingerprint(manifest: records.Manifest, part: records.PartSpec) -> str:
    """What makes a part's files: its settings (a teacher's a_k left out), the base shards' fingerprint (their
    settings, names and row counts) and the fingerprints of the caption sets a teacher part embeds. A part takes the
    dataset's layout version (`records.part_schema`), which enters as ``schema``."""
    settings = {k: v for k, v in to_dict(part).items() if k not in ("fingerprint", "shards")}
    if part.teacher is not None:
        settings["teacher"] = to_dict(_scale_free(part.teacher))
    reads = [manifest.part(records.part_name("captions", s)).fingerprint for s in part.caption_sets]
    base = run_fingerprint(manifest.without_parts())
    return runstate.fingerprint({"part": settings, "base": base, "reads": reads, "schema": manifest.schema_version})


def _teacher_configs(config: Config, manifest: records.Manifest) -> tuple[dict[str, TeacherConfig], list[str]]:
    """The configs of ``[[reinforce.teachers]]`` by name, checked against the dataset's teachers they name; and the
    names of those the dataset lacks."""
    from clipdr.models.teachers import TeacherError, teacher_spec

    cfg = config.reinforce
    by_name = {t.name: t for t in cfg.teachers}
    if len(by_name) != len(cfg.teachers):
        raise ReinforceError(f"reinforce.teachers: duplicate names {[t.name for t in cfg.teachers]}")
    for name in manifest.teacher_names:
        if name not in by_name:
            continue
        try:
            spec = teacher_spec(by_name[name], offline=cfg.dry_run)
        except (TeacherError, records.RecordsError) as e:
            raise ReinforceError(str(e)) from None
        if spec is not None and _scale_free(spec) != _scale_free(manifest.teacher(name)):
            raise ReinforceError(
                f"reinforce.teachers {name!r} is not the teacher the dataset at {cfg.output!r} recorded under that "
                f"name ({spec} against {manifest.teacher(name)}): a part must be embedded by the dataset's own teachers"
            )
    return by_name, [n for n in by_name if n not in manifest.teacher_names]


def plan(config: Config) -> PartPlan:
    """Validates a part pass against the dataset at ``reinforce.output`` and decides what is left to do."""
    from clipdr.models.teachers import TeacherError, teacher_spec

    cfg = config.reinforce
    if cfg.add not in records.PART_KINDS:
        raise ReinforceError(
            f"reinforce.add must be one of {records.PART_KINDS} (or empty: the base job), got {cfg.add!r}"
        )
    if not cfg.output:
        raise ReinforceError("reinforce.output must name the complete dataset a part is added to")
    try:
        with warnings.catch_warnings():  # this pass's own unfinished folder (a resume), or another pass's, is expected
            warnings.simplefilter("ignore", records.RecordsWarning)
            manifest = records.open_dataset(cfg.output).manifest
    except records.RecordsError as e:
        raise ReinforceError(
            f"reinforce.add = {cfg.add!r} adds to a complete dataset at reinforce.output: {e}"
        ) from None
    by_name, lacking = _teacher_configs(config, manifest)
    if cfg.add == "captions":
        try:
            caption_set = records.validate_caption_set_name(cfg.caption_set)
        except records.RecordsError as e:
            raise ReinforceError(f"reinforce.caption_set: {e}") from None
        if caption_set == records.DEFAULT_CAPTION_SET:
            raise ReinforceError(f"reinforce.caption_set: {caption_set!r} names the base shards' own captions")
        if cfg.num_syn_captions < 1:
            raise ReinforceError(f"reinforce.num_syn_captions (S={cfg.num_syn_captions}) must be >= 1 to add captions")
        missing = [n for n in manifest.teacher_names if n not in by_name]
        if missing:
            raise ReinforceError(
                f"reinforce.teachers lacks the dataset's teachers {missing}: a caption set is added with every "
                "teacher's text embeddings of it (the distillation targets), so the pass loads them all"
            )
        part = records.PartSpec(
            name=records.part_name("captions", caption_set),
            kind="captions",
            fingerprint="-",
            caption_set=caption_set,
            num_syn_captions=cfg.num_syn_captions,
            captioner=captioner_spec(cfg),
            teachers=manifest.teacher_names,
        )
        teachers = tuple(by_name[n] for n in manifest.teacher_names)
        columns = (records.KEY, records.IMAGE)
    else:
        if len(lacking) != 1:
            raise ReinforceError(
                f"reinforce.add = 'teacher' adds the one teacher of reinforce.teachers the dataset lacks; it lacks "
                f"{lacking} (the dataset has {list(manifest.teacher_names)})"
            )
        try:
            spec = teacher_spec(by_name[lacking[0]], offline=cfg.dry_run)
        except (TeacherError, records.RecordsError) as e:
            raise ReinforceError(str(e)) from None
        if spec is None:
            raise ReinforceError(f"teacher {lacking[0]}: its config is on the hub; a dry run cannot resolve it")
        added_sets = tuple(s for s in manifest.caption_sets if s != records.DEFAULT_CAPTION_SET)
        part = records.PartSpec(
            name=records.part_name("teacher", spec.name),
            kind="teacher",
            fingerprint="-",
            teacher=spec,
            caption_sets=added_sets,
        )
        teachers = (by_name[spec.name],)
        columns = (
            records.KEY,
            records.IMAGE,
            records.CAPTION,
            records.AUG_PARAMS,
            *([records.SYN_CAPTIONS] if manifest.num_syn_captions else []),
            *(records.syn_captions_column(s) for s in added_sets),
        )
    part = dataclasses.replace(part, fingerprint=part_fingerprint(manifest, part))
    tasks = tuple(ShardTask(s.path, s.path) for s in manifest.shards)
    if part.name in {p.name for p in manifest.parts}:
        listed = manifest.part(part.name)
        if listed.fingerprint != part.fingerprint:
            raise ReinforceError(
                f"the dataset at {cfg.output!r} has part {part.name!r} already, made with other settings: choose "
                "another reinforce.caption_set (or teacher name)"
            )
        done = tuple(t.output for t in tasks)
        return PartPlan(manifest, listed, part.fingerprint, teachers, columns, tasks, done, complete=True)
    folder = storage.join(cfg.output, records.PARTS_DIR, part.name)
    found = storage.list_files(folder, (records.SHARD_SUFFIX,), recursive=True)
    expected = {t.output for t in tasks}
    done = []
    for uri, (_, schema) in zip(found, records.read_shard_footers(found), strict=True):
        name = uri[len(folder.rstrip("/")) + 1 :]
        made_by = (read_shard_metadata(schema) or {}).get("run_fingerprint", "")
        if name not in expected or made_by != part.fingerprint:
            raise ReinforceError(
                f"{folder} holds {name!r}, which an earlier pass made with other settings or for another base: "
                "delete the folder (the dataset does not list it) or choose another name"
            )
        done.append(name)
    return PartPlan(manifest, part, part.fingerprint, teachers, columns, tasks, tuple(sorted(done)), complete=False)


def _finish(output: str, p: PartPlan) -> records.Manifest:
    """Lists the part in the manifest, rewritten last; refuses if the dataset changed under the pass."""
    current = records.read_manifest(output)
    if current != p.manifest:
        raise ReinforceError(
            f"the manifest of {output!r} changed while the part {p.part.name!r} was written (another pass finished?): "
            "rerun this pass; its files are kept and reused"
        )
    paths = [records.part_file(p.part.name, t.output) for t in p.tasks]
    footers = records.read_shard_footers([storage.join(output, *path.split("/")) for path in paths])
    files = tuple(records.ShardInfo(path, rows) for path, (rows, _) in zip(paths, footers, strict=True))
    manifest = dataclasses.replace(p.manifest, parts=(*p.manifest.parts, dataclasses.replace(p.part, shards=files)))
    records.write_manifest(output, manifest)  # checks every file's rows, schema and fingerprint first
    return manifest


def _tracker(config: Config, p: PartPlan):
    from clipdr.tracking import Tracker

    folder = storage.join(config.reinforce.output, records.PARTS_DIR, p.part.name)
    state = runstate.read(folder, runstate.REINFORCE_STATE)
    run_id = state.mlflow_run_id if state is not None and not state.changes(p.fingerprint, {}) else None
    tags = {"output": config.reinforce.output, "part": p.part.name}
    tracker = Tracker.start(EXPERIMENT, run_id=run_id, uri=config.tracking.uri, tags=tags)
    if run_id is None:
        runstate.write(folder, runstate.REINFORCE_STATE, runstate.RunState(tracker.run_id, p.fingerprint))
        tracker.log_params(flatten(config.reinforce, "reinforce."))
        tracker.log_dict(to_dict(p.part), "part.json")
    return tracker


def run(config: Config, log=print) -> records.Manifest | None:
    """Runs (or resumes) a part pass; returns the dataset's manifest listing the part (None for a dry run)."""
    from clipdr.cluster import ensure_ray
    from clipdr.reinforce.pipeline import run_part_pipeline

    cfg = config.reinforce
    p = plan(config)
    log(p.describe())
    if cfg.dry_run:
        log("dry run: the configuration is valid; no model was loaded and nothing was written")
        return None
    if p.complete:
        log(f"{cfg.output} lists part {p.part.name} already: nothing to do")
        return p.manifest
    with _tracker(config, p) as tracker:
        log(f"MLflow run {tracker.run_id} (experiment {EXPERIMENT!r}, part {p.part.name})")
        started, progress = time.monotonic(), {"files": len(p.done), "rows": 0}

        def on_shard(name: str, num_rows: int, written_at: float) -> None:
            progress["files"] += 1
            progress["rows"] += num_rows
            elapsed = time.monotonic() - started
            eta = progress_lines.eta_s(elapsed, progress["files"] - len(p.done), len(p.tasks) - progress["files"])
            fields = [f"{num_rows} rows", f"{progress['rows'] / max(elapsed, 1e-9):.1f} samples/s"]
            line = progress_lines.line(
                "reinforce", f"{p.part.name} {name}", progress["files"], len(p.tasks), fields, eta
            )
            log(line)

        if p.pending:
            ensure_ray()
            failed = run_part_pipeline(cfg, p.pending, p.layout, p.fingerprint, p.teachers, p.columns, on_shard)
            if failed:
                raise ShardsFailedError(failed, len(p.tasks), cfg.resources.crash_retries)
        manifest = _finish(cfg.output, p)
        elapsed = time.monotonic() - started
        tracker.log_metrics({"num_rows": manifest.num_rows, "elapsed_s": elapsed, "part_files": len(p.tasks)})
        tracker.log_dict(manifest.to_dict(), records.MANIFEST_NAME)
        log(f"added part {p.part.name} to {cfg.output} ({manifest.num_rows} rows; nothing else was rewritten)")
        return manifest
