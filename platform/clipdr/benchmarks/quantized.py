"""The ONNX encoders of an export, fp32 against fp16 and int8: accuracy on evaluation sets, file size, CPU latency.

The model (an MLflow URI such as the demo's ``models:/clipdr-demo-student@champion``, a checkpoint folder, or a
name) is exported as `clipdr export` does (`clipdr.export.export_model`, which writes and checks the variants);
or ``--export`` names an existing local export folder, whose files are measured and whose trained model is read
back from its open_clip files (`clipdr.export.load_trained`). Each
variant is then evaluated exactly as `clipdr evaluate` evaluates a torch model (`clipdr.evaluate.evaluate`, same
datasets, preprocessing and tokenizer), with onnxruntime computing the embeddings; deltas are against the fp32 ONNX
encoders (the trained torch model's own numbers are shown too). Latency: every (variant, tower, batch size) call
runs in rounds (`timing.run_rounds`: warm-up, then every call once a round in rotated order), onnxruntime with a
fixed number of intra-op threads; medians with min-max over rounds, and per-round ratios to fp32. With one thread
the clock is process CPU time (as in `latency`: a shared machine's neighbours do not move it), else wall time.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipdr import export, models, quantize
from clipdr.benchmarks import timing
from clipdr.config import EvaluateConfig, ExportConfig

TOWERS = ("image", "text")
CAPTIONS = ("a photo of a small dog playing on the beach", "a red car parked next to a tall building at night")
METRICS = ("zeroshot/mean_top1", "retrieval/mean_recall")  # the headline of each kind (`clipdr.evaluate`)
QUICK = {"batch_sizes": (1, 4), "warmup": 1, "iters": 3, "max_samples": 64}


@dataclass(frozen=True)
class QuantizedCfg:
    """What to measure.

    Attributes:
        model: MLflow model URI, checkpoint folder or model name (`clipdr.evaluate.loading.load`), exported now.
        export: Instead of ``model``: a local folder `clipdr export` wrote, measured as it is.
        zeroshot: Zero-shot dataset folders (``evaluate.zeroshot``).
        retrieval: Retrieval dataset folders (``evaluate.retrieval``).
        max_samples: Per dataset, 0: all (metrics then keep their plain names).
        batch_sizes: Batch sizes to time.
        num_threads: onnxruntime intra-op threads, the same for every variant.
        warmup: Unmeasured rounds.
        iters: Measured rounds.
        exporter: torch.onnx exporter (`export.EXPORTERS`).
        export_dir: Keep the export here (default: a temporary folder).
        output: Markdown file to write the table to, if set.
    """

    model: str = ""
    export: str = ""
    zeroshot: tuple[str, ...] = ()
    retrieval: tuple[str, ...] = ()
    max_samples: int = 0
    batch_sizes: tuple[int, ...] = (1, 8)
    num_threads: int = 1
    warmup: int = 2
    iters: int = 10
    exporter: str = "dynamo"
    export_dir: str = ""
    output: str = ""

    def __post_init__(self) -> None:
        if self.iters < 1 or self.warmup < 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("need iters >= 1, warmup >= 0 and positive batch sizes")
        if self.num_threads < 1:
            raise ValueError(f"need at least one thread, got {self.num_threads}")
        if bool(self.model) == bool(self.export):
            raise ValueError("give one of --model (exported now) and --export (an export folder)")
        if not self.zeroshot and not self.retrieval:
            raise ValueError("nothing to evaluate: give --zeroshot and/or --retrieval dataset folders")

    @property
    def clock(self) -> str:
        return "cpu" if self.num_threads == 1 else "wall"


@dataclass
class QuantizedReport:
    cfg: QuantizedCfg
    name: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {"torch" | variant: {metric: value}}
    sizes: dict[tuple[str, str], int] = field(default_factory=dict)  # {(tower, variant): bytes}
    latency_ms: dict[tuple[str, str, int], timing.Summary] = field(default_factory=dict)  # (tower, variant, batch)
    ratio: dict[tuple[str, str, int], timing.Summary] = field(default_factory=dict)  # to fp32, per round
    wall_s: float = 0.0


class _Visual(nn.Module):
    def __init__(self, preprocess_cfg: dict[str, Any], image_size: Any) -> None:
        super().__init__()
        self.preprocess_cfg = preprocess_cfg
        self.image_size = image_size


class OnnxClip(nn.Module):
    """The part of an open_clip model `clipdr.evaluate.evaluate` uses, computed by onnxruntime sessions."""

    def __init__(self, model: nn.Module, image_session: Any, text_session: Any) -> None:
        super().__init__()
        self.visual = _Visual(dict(model.visual.preprocess_cfg), model.visual.image_size)
        self.image_session = image_session
        self.text_session = text_session

    def encode_image(self, image_BCHW: Tensor) -> Tensor:
        return torch.from_numpy(self.image_session.run(None, {"image": image_BCHW.float().numpy()})[0])

    def encode_text(self, tokens_BL: Tensor) -> Tensor:
        return torch.from_numpy(self.text_session.run(None, {"text": tokens_BL.numpy()})[0])


def _files(folder: Path) -> dict[tuple[str, str], Path]:
    files = {("image", "fp32"): folder / export.IMAGE_ONNX, ("text", "fp32"): folder / export.TEXT_ONNX}
    return files | {key: folder / name for key, name in export.VARIANT_FILES.items()}


def _calls(sessions: dict[tuple[str, str], Any], name: str, image_size: int, batch_sizes: tuple[int, ...]) -> dict:
    tokenizer = models.get_tokenizer(name)
    generator = torch.Generator().manual_seed(0)
    calls = {}
    for batch_size in batch_sizes:
        inputs = {
            "image": {"image": torch.rand(batch_size, 3, image_size, image_size, generator=generator).numpy()},
            "text": {"text": tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]).numpy()},
        }
        for (tower, variant), session in sessions.items():

            def call(session=session, feed=inputs[tower]) -> None:
                session.run(None, feed)

            calls[(tower, variant, batch_size)] = call
    return calls


def run(cfg: QuantizedCfg, progress: Callable[[str], None] = print) -> QuantizedReport:
    """Exports ``cfg.model``, evaluates and times every variant; writes ``cfg.output`` if set."""
    from clipdr.evaluate import evaluate, loading

    torch.set_num_threads(cfg.num_threads)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantiser suggests pre-processing on every call
    start = time.perf_counter()
    if cfg.export:
        name, model = export.load_trained(cfg.export)
        loaded = loading.LoadedModel(model, name, source=cfg.export, kind="export")
    else:
        loaded = loading.load(cfg.model, device="cpu")
    report = QuantizedReport(cfg, name=loaded.name)
    eval_cfg = EvaluateConfig(zeroshot=cfg.zeroshot, retrieval=cfg.retrieval, max_samples=cfg.max_samples)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(cfg.export or cfg.export_dir or tmp)
        if not cfg.export:
            progress(f"export {loaded.name} -> {folder}")
            export.export_model(loaded, ExportConfig(output=str(folder), onnx_exporter=cfg.exporter), log=progress)
        files = _files(folder)
        report.sizes = {key: path.stat().st_size for key, path in files.items()}
        sessions = {key: quantize.session(path, key[1], cfg.num_threads) for key, path in files.items()}

        progress("evaluate the trained torch model")
        report.metrics["torch"] = evaluate(loaded.model, loaded.name, eval_cfg).metrics
        for variant in quantize.VARIANTS:
            progress(f"evaluate ONNX {variant}")
            clip = OnnxClip(loaded.model, sessions["image", variant], sessions["text", variant])
            report.metrics[variant] = evaluate(clip, loaded.name, eval_cfg).metrics

        progress(f"latency: {cfg.iters} rounds after {cfg.warmup} warm-up, {cfg.num_threads} thread(s)")
        calls = _calls(sessions, loaded.name, models.image_size(loaded.name), cfg.batch_sizes)
        things = {key: timing.timed(call, cpu_clock=time.process_time) for key, call in calls.items()}
        results = timing.run_rounds(things, cfg.iters, cfg.warmup)
        for tower, variant, batch_size in results:
            key = (tower, variant, batch_size)
            report.latency_ms[key] = timing.per_item(results[key], cfg.clock).scaled(1e3)
            report.ratio[key] = timing.ratio(results[key], results[tower, "fp32", batch_size], cfg.clock)
    report.wall_s = time.perf_counter() - start
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(to_markdown(report))
    return report


def _metric(metrics: dict[str, float], key: str) -> float | None:
    """``key`` or, for a run with ``max_samples``, its ``partial/`` name."""
    return metrics.get(key, metrics.get(f"partial/{key}"))


def to_markdown(report: QuantizedReport) -> str:
    cfg = report.cfg
    shown = [k for k in METRICS if _metric(report.metrics.get("fp32", {}), k) is not None]
    threads = f"{cfg.num_threads} thread{'s' if cfg.num_threads != 1 else ''}"
    import onnxruntime

    lines = [
        f"Model `{report.name}` from `{cfg.model or cfg.export}`; evaluated on "
        f"{', '.join((*cfg.zeroshot, *cfg.retrieval))}"
        f"{f' ({cfg.max_samples} samples each)' if cfg.max_samples else ''}. Device: "
        f"{platform.processor() or platform.machine()} CPU, onnxruntime {onnxruntime.__version__}, {threads}, "
        f"{cfg.clock} clock; {cfg.iters} rounds after {cfg.warmup} warm-up, all calls interleaved; ms: median "
        f"(min-max) over rounds; x fp32: median (min-max) of per-round ratios; run took {report.wall_s:.0f} s.",
        "",
        "| variant | "
        + " | ".join(f"{m} (delta vs fp32)" for m in shown)
        + " | image MB | text MB | "
        + " | ".join(f"{t} ms, batch {b} (x fp32)" for b in cfg.batch_sizes for t in TOWERS)
        + " |",
        "|---|" + "---|" * (len(shown) + 2 + 2 * len(cfg.batch_sizes)),
    ]
    reference = report.metrics.get("fp32", {})
    torch_metrics = report.metrics.get("torch", {})
    torch_cells = [
        f"{_metric(torch_metrics, m):.4f} ({_metric(torch_metrics, m) - _metric(reference, m):+.4f})" for m in shown
    ]
    lines.append("| torch fp32 (trained) | " + " | ".join(torch_cells) + " | | |" + " |" * (2 * len(cfg.batch_sizes)))
    for variant in quantize.VARIANTS:
        metrics = report.metrics.get(variant, {})
        cells = [f"{_metric(metrics, m):.4f} ({_metric(metrics, m) - _metric(reference, m):+.4f})" for m in shown]
        cells += [f"{report.sizes[tower, variant] / 1e6:.2f}" for tower in TOWERS]
        for batch_size in cfg.batch_sizes:
            for tower in TOWERS:
                ms = report.latency_ms[tower, variant, batch_size]
                ratio = report.ratio[tower, variant, batch_size]
                cells.append(f"{ms.format('.2f')} ({ratio.median:.2f}x, {ratio.low:.2f}-{ratio.high:.2f})")
        lines.append(f"| ONNX {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = QuantizedCfg(model="-", zeroshot=("-",))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default="", help="MLflow model URI, checkpoint folder or model name (exported now)")
    source.add_argument("--export", default="", metavar="DIR", help="an existing local export folder, measured as is")
    parser.add_argument("--zeroshot", nargs="*", default=[], metavar="DIR", help="zero-shot dataset folders")
    parser.add_argument("--retrieval", nargs="*", default=[], metavar="DIR", help="retrieval dataset folders")
    parser.add_argument("--max-samples", type=int, default=0, help="per dataset (default: all)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(default.batch_sizes), metavar="N")
    parser.add_argument("--threads", type=int, default=default.num_threads, help="onnxruntime threads (default: 1)")
    parser.add_argument("--warmup", type=int, default=default.warmup, help="unmeasured rounds (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=default.iters, help="measured rounds (default: %(default)s)")
    parser.add_argument("--exporter", choices=export.EXPORTERS, default=default.exporter)
    parser.add_argument("--export-dir", default="", metavar="DIR", help="keep the export here")
    parser.add_argument("--output", default="", metavar="PATH", help="also write the table as markdown to PATH")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke-test settings: {', '.join(f'{k}={v}' for k, v in QUICK.items())}"
    )


def cfg_from_args(args: argparse.Namespace) -> QuantizedCfg:
    cfg = QuantizedCfg(
        model=args.model,
        export=args.export,
        zeroshot=tuple(args.zeroshot),
        retrieval=tuple(args.retrieval),
        max_samples=args.max_samples,
        batch_sizes=tuple(args.batch_sizes),
        num_threads=args.threads,
        warmup=args.warmup,
        iters=args.iters,
        exporter=args.exporter,
        export_dir=args.export_dir,
        output=args.output,
    )
    return replace(cfg, **QUICK) if args.quick else cfg


def main(args: argparse.Namespace) -> int:
    try:
        cfg = cfg_from_args(args)
    except ValueError as e:
        print(f"quantized: {e}", file=sys.stderr)
        return 2
    report = run(cfg, progress=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    print(to_markdown(report))
    return 0


__all__ = ["OnnxClip", "QuantizedCfg", "QuantizedReport", "add_arguments", "cfg_from_args", "main", "run"]
