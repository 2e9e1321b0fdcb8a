"""Caption generation: the KV-cached loop against the uncached reference, in FLOPs and in CPU time.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention) on a model built
on the meta device (shapes only: no weights, no memory, so ``coca_ViT-L-14`` costs nothing), for one caption of
``max_len`` tokens run to the end (start-of-text, ``max_len - 2`` decoder passes, forced end-of-text). Both paths
are divided by `cached_arithmetic`, the work a caption cannot skip: each generated position through every layer
of the text tower and the decoder once, attention over the keys so far and over the image tokens, the vocabulary
projection of that one position, and the image tokens' cross-attention keys and values projected once.

Time: per-caption CPU time of `CocaCaptioner._sample` (decoding only; the image encoder is the same on both sides)
on fixed image tokens and seeds, cached and uncached alternating round by round after a warm-up (`timing`), fp32,
at a fixed number of torch threads, with random weights. A random decoder almost never samples end-of-text, so
every caption runs to ``max_len``: the longest, most expensive case. The report also gives how many sampled tokens
the two paths share (float32 rounding differs between them; see `clipdr.models.coca_decoding`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch
from open_clip.coca_model import CoCa
from torch.utils.flop_counter import FlopCounterMode

from clipdr.benchmarks import timing
from clipdr.models.captioners import TINY_COCA, CocaCaptioner, build_captioner, caption_seed
from clipdr.models.coca_decoding import CocaKVCache, uncached_next_token_logits
from clipdr.models.registry import register
from clipdr.records import CaptionerSpec

FLOP_TARGET = 1.5  # issue 13: counted FLOPs of a cached caption / cached arithmetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flops-models",
        nargs="+",
        default=[TINY_COCA, "coca_ViT-B-32", "coca_ViT-L-14"],
        help="CoCa architectures whose FLOPs a caption are counted (meta device: any size is free)",
    )
    parser.add_argument(
        "--time-models",
        nargs="+",
        default=[TINY_COCA, "coca_ViT-B-32"],
        help="CoCa architectures timed on the CPU with random weights",
    )
    parser.add_argument("--max-len", type=int, default=30, help="tokens a caption (DataCompDR: 30)")
    parser.add_argument("--rows", type=int, default=4, help="captions decoded together in a timed call")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (cached and uncached once each)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same on both sides (1: CPU-time clock, else wall)"
    )
    parser.add_argument("--output", help="Markdown file to write the tables to")


def cached_arithmetic(model: CoCa, num_image_tokens: int, num_steps: int) -> int:
    """FLOPs a caption of ``num_steps`` decoder passes cannot skip (2 a multiply-add; biases, norms not counted)."""

    def self_block(block: torch.nn.Module, num_keys: int) -> int:
        width, hidden = block.attn.embed_dim, block.mlp.c_fc.out_features
        return 2 * (4 * width * width + 2 * width * hidden) + 4 * width * num_keys  # qkv+out, mlp, qk + av

    decoder = model.text_decoder
    self_blocks = [*model.text.transformer.resblocks, *decoder.resblocks]
    total = 0
    for position in range(num_steps):
        total += sum(self_block(block, position + 1) for block in self_blocks)
        for block in decoder.cross_attn:
            width, hidden = block.attn.embed_dim, block.mlp.c_fc.out_features
            total += 2 * (2 * width * width + 2 * width * hidden) + 4 * width * num_image_tokens
        total += 2 * decoder.text_projection.numel()
    kv_width = decoder.cross_attn[0].attn.embed_dim
    total += sum(2 * 2 * b.attn.embed_dim * kv_width * num_image_tokens for b in decoder.cross_attn)
    return total


def count_flops(name: str, max_len: int) -> dict[str, float]:
    """GFLOP of one ``max_len``-token caption, cached and uncached, and the cached arithmetic, on a meta model."""
    register()
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta").eval()
    assert isinstance(model, CoCa), name
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    num_steps = max_len - 2  # the first token is start-of-text, the last forced end-of-text
    with torch.inference_mode():
        _, image_embs_1ND = model._encode_image(torch.empty(1, 3, *size, device="meta"))
        tokens_1T = torch.zeros(1, max_len, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as cached:
            cache = CocaKVCache(model, image_embs_1ND, max_len)
            for position in range(num_steps):
                cache.step(tokens_1T[:, position])
        with FlopCounterMode(display=False) as uncached:
            for length in range(1, num_steps + 1):
                uncached_next_token_logits(model, image_embs_1ND, tokens_1T[:, :length])
    ideal = cached_arithmetic(model, image_embs_1ND.shape[1], num_steps)
    return {
        "cached": cached.get_total_flops() / 1e9,
        "uncached": uncached.get_total_flops() / 1e9,
        "ideal": ideal / 1e9,
    }


def _captioner(name: str, max_len: int) -> CocaCaptioner:
    torch.manual_seed(0)
    captioner = build_captioner(CaptionerSpec(name=name, kind="coca", model=name, pretrained="", max_len=max_len))
    assert isinstance(captioner, CocaCaptioner)
    return captioner


def time_generation(name: str, args: argparse.Namespace, progress: bool = True) -> dict[str, object]:
    """Per-caption CPU seconds of both paths, their per-round ratio, and the tokens they share."""
    captioner = _captioner(name, args.max_len)
    size = captioner.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images_RCHW = torch.randn(args.rows, 3, *size, generator=torch.Generator().manual_seed(0))
    seeds = [caption_seed(0, f"row{r}", 0) for r in range(args.rows)]
    with torch.inference_mode():
        _, image_embs_RND = captioner.model._encode_image(images_RCHW)
    tokens: dict[bool, list[list[int]]] = {}

    def decode(kv_cache: bool) -> None:
        captioner.kv_cache = kv_cache
        with torch.inference_mode():
            tokens[kv_cache] = captioner._sample(image_embs_RND, seeds)

    things = {
        "cached": timing.timed(lambda: decode(True), items=args.rows),
        "uncached": timing.timed(lambda: decode(False), items=args.rows),
    }
    clock = "cpu" if args.threads == 1 else "wall"  # process CPU time is exact for one thread only
    report = (lambda m: print(f"  {name}: {m}", file=sys.stderr, flush=True)) if progress else None
    results = timing.run_rounds(things, rounds=args.rounds, warmup=args.warmup, progress=report)
    rows = list(zip(tokens[True], tokens[False], strict=True))
    pairs = [(a, b) for row_a, row_b in rows for a, b in zip(row_a, row_b, strict=False)]  # shorter row: its EOT
    return {
        "cached_ms": timing.per_item(results["cached"], clock).scaled(1e3),
        "uncached_ms": timing.per_item(results["uncached"], clock).scaled(1e3),
        "speedup": timing.ratio(results["uncached"], results["cached"], clock),
        "same_tokens": sum(a == b for a, b in pairs) / len(pairs),
        "same_captions": sum(a == b for a, b in rows) / args.rows,
    }


def _tables(args: argparse.Namespace, flops: dict[str, dict[str, float]], times: dict[str, dict]) -> str:
    lines = [
        f"Device: {platform.machine()} CPU, {args.threads} torch thread(s), "
        f"{'process CPU time' if args.threads == 1 else 'wall'} clock; torch {torch.__version__}; "
        f"captions of {args.max_len} tokens ({args.max_len - 2} decoder passes).",
        "",
        f"FLOPs a caption (FlopCounterMode on a meta model; target cached / arithmetic <= {FLOP_TARGET}):",
        "",
        "| model | cached arithmetic GFLOP | cached GFLOP | uncached GFLOP | cached / arithmetic "
        "| uncached / arithmetic |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in flops.items():
        lines.append(
            f"| {name} | {f['ideal']:.2f} | {f['cached']:.2f} | {f['uncached']:.2f} | "
            f"{f['cached'] / f['ideal']:.3f} | {f['uncached'] / f['ideal']:.1f} |"
        )
    lines += [
        "",
        f"Time a caption, fp32, random weights, {args.rows} captions a call; median (min-max) of {args.rounds} "
        f"rounds after {args.warmup} warm-up, cached and uncached alternating; speed-up paired by round:",
        "",
        "| model | cached ms | uncached ms | speed-up (uncached / cached) | same tokens | same captions |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(
            f"| {name} | {t['cached_ms'].format('.1f')} | {t['uncached_ms'].format('.1f')} | "
            f"{t['speedup'].format('.2f')} | {t['same_tokens']:.3f} | {t['same_captions']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.max_len < 3 or args.rows < 1:
        print("need --max-len >= 3 and --rows >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    flops = {name: count_flops(name, args.max_len) for name in args.flops_models}
    times = {name: time_generation(name, args) for name in args.time_models}
    text = _tables(args, flops, times) + f"\nRun took {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0
