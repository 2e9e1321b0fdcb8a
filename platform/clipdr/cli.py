"""The ``clipdr`` command: one subcommand per stage, each reading one run config.

A job stage is one module's ``run(cfg, log)``; this module only parses, dispatches and reports (`STAGES`).
Every stage takes ``--config PATH`` (a TOML run file, e.g. ``jobs/configs/demo.toml``) and repeated
``--set section.key=value`` overrides; ``clipdr <stage> --help`` lists the keys that stage reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clipdr import benchmarks  # light: a benchmark's module is imported only when it runs
from clipdr.config import Config, ConfigError, describe, load_config, to_dict


@dataclass(frozen=True)
class Stage:
    """One subcommand: a job stage calls ``run(cfg, log)`` of module ``job``, a tool stage calls ``tool``.

    Attributes:
        name: The subcommand.
        summary: Its one-line help.
        sections: The config sections it reads (listed by ``--help``).
        job: The module whose ``run(cfg, log)`` the stage is, imported only when it runs.
        errors: ``"module:Name"`` of the exceptions that mean a mistake in the config or the data: printed as one
            line, exit status 2.
        show: What of ``run``'s result to print on stdout as JSON; None prints nothing.
        tool: A command that is not a job (it may read its own arguments).
        add_arguments: Stage-specific options.
    """

    name: str
    summary: str
    sections: tuple[str, ...]
    job: str = ""
    errors: tuple[str, ...] = ()
    show: Callable[[Any], Any] | None = None
    tool: Callable[[Config, argparse.Namespace], int] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None

    def __post_init__(self) -> None:
        assert bool(self.job) != (self.tool is not None), f"stage {self.name!r}: give it a job module or a tool"


def _print_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _resolve(name: str) -> Any:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _run(stage: Stage, cfg: Config, args: argparse.Namespace) -> int:
    if stage.tool is not None:
        return stage.tool(cfg, args)
    run = _resolve(f"{stage.job}:run")
    errors = tuple(_resolve(name) for name in stage.errors)
    try:
        result = run(cfg, log=_print_progress)
    except errors as e:
        print(f"clipdr {stage.name}: {e}", file=sys.stderr)
        return 2
    if stage.show is not None and result is not None:  # None: a dry run, which printed its plan
        print(json.dumps(stage.show(result), indent=2))
    return 0


def _print_config(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


def _print_models(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr import models

    print(models.describe_variants())
    return 0


def _inspect(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr import inspection, storage

    sheet = args.sheet or f"{storage.basename(args.dataset.rstrip('/')) or 'dataset'}-views.png"
    try:
        inspection.inspect(args.dataset, sheet, num_samples=args.samples, size=args.size)
    except ValueError as e:  # records.RecordsError included: not a (complete) reinforced dataset
        print(f"clipdr inspect: {e}", file=sys.stderr)
        return 2
    return 0


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="reinforced dataset directory, path or s3://")
    parser.add_argument("--samples", type=int, default=3, help="samples whose captions and views are shown (3)")
    parser.add_argument("--size", type=int, default=96, help="side of each replayed view on the sheet, px (96)")
    parser.add_argument("--sheet", default="", help="where the PNG contact sheet goes (default: <name>-views.png)")


def _run_bench(cfg: Config, args: argparse.Namespace) -> int:
    return benchmarks.main([args.benchmark, *args.benchmark_args], prog="clipdr bench")


STAGES = (
    Stage(
        "synth",
        "Write the synthetic image-text world (webdataset/Parquet shards).",
        ("synth",),
        job="clipdr.data.synthetic",
        show=lambda summary: summary,
    ),
    Stage(
        "reinforce",
        "Reinforce source shards: teacher embeddings of K stored views + S synthetic captions -> Parquet.",
        ("reinforce", "augment", "tracking"),
        job="clipdr.reinforce.run",
        errors=("clipdr.reinforce.run:ReinforceError",),
    ),
    Stage(
        "train",
        "Train a student on Ray Train: reinforced distillation, or the clip / online_distill baselines.",
        ("train", "augment", "evaluate", "tracking"),
        job="clipdr.train.run",
        errors=("clipdr.train.plan:TrainError",),
        show=dataclasses.asdict,
    ),
    Stage(
        "study",
        "Pilot study: the student in two or more modes x seeds, means and gains with bootstrap intervals (MLflow).",
        ("study", "train", "augment", "evaluate", "tracking"),
        job="clipdr.study",
        errors=("clipdr.train.plan:TrainError", "builtins:ValueError"),
        show=lambda result: {"parent_run_id": result.parent_run_id, "gains": result.summary["gains"]},
    ),
    Stage(
        "sweep",
        "Hyper-parameter sweep with Ray Tune over any config keys: one nested MLflow training run per trial.",
        ("sweep", "train", "augment", "evaluate", "tracking"),
        job="clipdr.sweep",
        errors=("clipdr.train.plan:TrainError", "builtins:ValueError"),
        show=lambda result: {"parent_run_id": result.parent_run_id, "best": result.best},
    ),
    Stage(
        "datacompdr",
        "Convert Apple's DataCompDR (joined with images) into clipdr's reinforced Parquet, without recomputing.",
        ("datacompdr",),
        job="clipdr.reinforce.datacompdr",
        errors=("builtins:FileNotFoundError", "builtins:ValueError"),
    ),
    Stage(
        "evaluate",
        "Evaluate a model (MLflow URI, checkpoint or name): zero-shot classification + retrieval -> MLflow.",
        ("evaluate", "tracking"),
        job="clipdr.evaluate.run",
        errors=("clipdr.evaluate.run:EvaluateError",),
    ),
    Stage(
        "export",
        "Export a model: open_clip-loadable weights, the re-parameterised model, ONNX encoders, a model card.",
        ("export", "tracking"),
        job="clipdr.export",
        errors=("clipdr.export:ExportError",),
        show=lambda result: result.manifest,
    ),
    Stage(
        "promote",
        "Promotion gate: move alias champion to the candidate version if it beats the champion's metric.",
        ("lifecycle", "tracking"),
        job="clipdr.lifecycle",
        errors=("clipdr.lifecycle:LifecycleError",),
        show=dataclasses.asdict,
    ),
    Stage(
        "serve",
        "Serve a registered model's alias (champion) with Ray Serve: image and text embedding endpoints over HTTP.",
        ("serve", "tracking"),
        job="clipdr.serving",
        errors=("clipdr.serving:ServeError",),
    ),
    Stage(
        "demo",
        "Run the whole lifecycle on the embedded default, offline: world, teachers, reinforce, students, compare.",
        ("demo", "study", "synth", "augment", "reinforce", "train", "evaluate", "tracking"),
        job="clipdr.demo",
        errors=("clipdr.train.plan:TrainError", "clipdr.reinforce.run:ReinforceError"),
    ),
    Stage(
        "config",
        "Print the resolved config (file + --set overrides) as JSON.",
        tuple(f.name for f in dataclasses.fields(Config)),
        tool=_print_config,
    ),
    Stage(
        "inspect",
        "Show a reinforced dataset: its manifest, bytes, a few samples' captions, a PNG of their K views replayed.",
        (),
        tool=_inspect,
        add_arguments=_inspect_arguments,
    ),
    Stage("models", "List every model variant with its parameter counts beside the paper's.", (), tool=_print_models),
    Stage(
        "bench",
        "Run a benchmark, e.g. `clipdr bench latency --quick`.",
        (),
        tool=_run_bench,
        add_arguments=benchmarks.add_arguments,
    ),
)


def _epilog(sections: Sequence[str]) -> str:
    rows = [row for row in describe(Config) if row[0].split(".")[0] in sections]
    width = max(len(key) for key, _, _ in rows)
    lines = ["config keys (set in the --config file or with --set KEY=VALUE):"]
    lines += [f"  {key:<{width}}  {help_text} (default: {default})" for key, default, help_text in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdr",
        description="Fast image-text models (MobileCLIP) trained with multi-modal dataset reinforcement.",
    )
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        sub = subparsers.add_parser(
            stage.name,
            help=stage.summary,
            description=stage.summary,
            epilog=_epilog(stage.sections) if stage.sections else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="PATH", help="TOML run file (default: built-in defaults)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config key, e.g. --set synth.seed=3 (repeatable; values are TOML or bare strings)",
        )
        if stage.add_arguments is not None:
            stage.add_arguments(sub)
        sub.set_defaults(stage_obj=stage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"clipdr {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    return _run(args.stage_obj, cfg, args)


if __name__ == "__main__":
    sys.exit(main())
