"""The ``clipdr`` command: one subcommand per stage, each reading one run config.

Every stage takes ``--config PATH`` (a TOML run file, e.g. ``jobs/configs/demo.toml``) and repeated
``--set section.key=value`` overrides; ``clipdr <stage> --help`` lists the keys that stage reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clipdr import benchmarks  # light: a benchmark's module is imported only when it runs
from clipdr.config import Config, ConfigError, describe, load_config, to_dict


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    sections: tuple[str, ...]
    run: Callable[[Config, argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # stage-specific options


def _print_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run_synth(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.data import synthetic

    summary = synthetic.generate(cfg.synth, progress=_print_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _run_reinforce(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.reinforce.run import ReinforceError, run

    try:
        run(cfg, log=_print_progress)
    except ReinforceError as e:
        print(f"clipdr reinforce: {e}", file=sys.stderr)
        return 2
    return 0


def _run_datacompdr(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.reinforce import datacompdr
    from clipdr.reinforce.pipeline import map_shards_on_ray

    c = cfg.datacompdr
    if not c.source or not c.output:
        print("clipdr datacompdr: set datacompdr.source and datacompdr.output", file=sys.stderr)
        return 2
    layout = datacompdr.DataCompDRLayout(
        num_augmentations=c.num_augmentations, reference_max_side=c.reference_max_side or None
    )
    try:
        manifest = datacompdr.convert(c.source, c.output, layout=layout, map_shards=map_shards_on_ray)
    except (FileNotFoundError, ValueError) as e:
        print(f"clipdr datacompdr: {e}", file=sys.stderr)
        return 2
    _print_progress(f"{manifest.num_rows} samples ({manifest.num_skipped} skipped) -> {c.output}")
    return 0


def _run_train(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.train.plan import TrainError
    from clipdr.train.run import run

    try:
        result = run(cfg, log=_print_progress)
    except TrainError as e:
        print(f"clipdr train: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def _run_demo(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr import demo
    from clipdr.reinforce.run import ReinforceError
    from clipdr.train.plan import TrainError

    try:
        demo.run(cfg, log=_print_progress)
    except (TrainError, ReinforceError) as e:
        print(f"clipdr demo: {e}", file=sys.stderr)
        return 2
    return 0


def _run_config(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


def _run_models(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr import models

    print(models.describe_variants())
    return 0


def _run_bench(cfg: Config, args: argparse.Namespace) -> int:
    return benchmarks.main([args.benchmark, *args.benchmark_args], prog="clipdr bench")


def _run_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.evaluate.run import EvaluateError, run

    try:
        run(cfg, log=_print_progress)
    except EvaluateError as e:
        print(f"clipdr evaluate: {e}", file=sys.stderr)
        return 2
    return 0


def _run_export(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.export import ExportError, run

    try:
        result = run(cfg, log=_print_progress)
    except ExportError as e:
        print(f"clipdr export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.manifest, indent=2))
    return 0


def _run_promote(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.lifecycle import LifecycleError, run

    try:
        decision = run(cfg, log=_print_progress)
    except LifecycleError as e:
        print(f"clipdr promote: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(decision), indent=2))
    return 0


STAGES = (
    Stage("synth", "Write the synthetic image-text world (webdataset/Parquet shards).", ("synth",), _run_synth),
    Stage(
        "reinforce",
        "Reinforce source shards: teacher embeddings of K stored views + S synthetic captions -> Parquet.",
        ("reinforce", "augment", "tracking"),
        _run_reinforce,
    ),
    Stage(
        "train",
        "Train a student on Ray Train: reinforced distillation, or the clip / online_distill baselines.",
        ("train", "augment", "evaluate", "tracking"),
        _run_train,
    ),
    Stage(
        "datacompdr",
        "Convert Apple's DataCompDR (joined with images) into clipdr's reinforced Parquet, without recomputing.",
        ("datacompdr",),
        _run_datacompdr,
    ),
    Stage(
        "evaluate",
        "Evaluate a model (MLflow URI, checkpoint or name): zero-shot classification + retrieval -> MLflow.",
        ("evaluate", "tracking"),
        _run_evaluate,
    ),
    Stage(
        "export",
        "Export a model: open_clip-loadable weights, the re-parameterised model, ONNX encoders, a model card.",
        ("export", "tracking"),
        _run_export,
    ),
    Stage(
        "promote",
        "Promotion gate: move alias champion to the candidate version if it beats the champion's metric.",
        ("lifecycle", "tracking"),
        _run_promote,
    ),
    Stage(
        "demo",
        "Run the whole lifecycle on the embedded default, offline: world, teachers, reinforce, students, compare.",
        ("demo", "synth", "augment", "reinforce", "train", "evaluate", "tracking"),
        _run_demo,
    ),
    Stage(
        "config",
        "Print the resolved config (file + --set overrides) as JSON.",
        tuple(f.name for f in dataclasses.fields(Config)),
        _run_config,
    ),
    Stage("models", "List every model variant with its parameter counts beside the paper's.", (), _run_models),
    Stage("bench", "Run a benchmark, e.g. `clipdr bench latency --quick`.", (), _run_bench, benchmarks.add_arguments),
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
    return args.stage_obj.run(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
