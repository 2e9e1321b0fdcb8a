"""The ``clipdr`` command: one subcommand per stage, each reading one run config.

Every stage takes ``--config PATH`` (a TOML run file, e.g. ``jobs/configs/demo.toml``) and repeated
``--set section.key=value`` overrides; ``clipdr <stage> --help`` lists the keys that stage reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clipdr.config import Config, ConfigError, describe, load_config, to_dict


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    sections: tuple[str, ...]
    run: Callable[[Config, argparse.Namespace], int]


def _print_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run_synth(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.data import synthetic

    summary = synthetic.generate(cfg.synth, progress=_print_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _run_demo(cfg: Config, args: argparse.Namespace) -> int:
    from clipdr.data import synthetic

    _print_progress(f"demo 1/1: synthetic world -> {cfg.synth.output}")
    synthetic.generate(cfg.synth, progress=_print_progress)
    _print_progress("demo finished: the world is ready (reinforce, train and evaluate stages join as they land)")
    return 0


def _run_config(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


STAGES = (
    Stage("synth", "Write the synthetic image-text world (webdataset/Parquet shards).", ("synth",), _run_synth),
    Stage("demo", "Run the whole lifecycle on the embedded default, offline.", ("synth", "augment"), _run_demo),
    Stage("config", "Print the resolved config (file + --set overrides) as JSON.", ("synth", "augment"), _run_config),
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
            epilog=_epilog(stage.sections),
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
