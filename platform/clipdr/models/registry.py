"""Every model this project ships or trains, with the paper's numbers, registered with open_clip by name.

Architectures are data: each variant is an open_clip JSON config. open_clip 3.3 ships MobileCLIP-S1/S2/B and
MobileCLIP2-S0/S2/B/S3/S4/L-14; this package adds ``configs/*.json`` (MobileCLIP-S0 and the tiny and demo twins of
students, teachers and captioners) through ``open_clip.add_model_config``. Every shipped config is a `Variant`
here, so ``clipdr models`` lists it and the registry-parametrised tests build it; ``register()`` is the one way a
config reaches open_clip.

MobileCLIP-S0's text tower (MCt) is not an open_clip architecture. Its config marks the text tower with
``"clipdr_text_tower": "mct"``, and ``register()`` wraps open_clip's text-tower builder so that marked configs
build ``clipdr.models.mct.MCt`` and every other config goes to open_clip unchanged. This keeps all of open_clip's
factory (``create_model``, ``pretrained=<file>`` strict loading with its Apple-checkpoint conversion, precision,
preprocessing config) working for S0 rather than re-implementing it around a swapped tower; docs/models.md
discusses the choice.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import open_clip.model
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipdr.models import mci  # importing it registers the tiny MCi towers with timm
from clipdr.models.mct import build_mct, is_mct_cfg

CONFIG_DIR = Path(__file__).parent / "configs"

Family = Literal["MobileCLIP", "MobileCLIP2", "debug"]
Size = Literal["paper", "tiny", "demo"]
Kind = Literal["clip", "coca"]
FAMILIES: tuple[Family, ...] = ("MobileCLIP", "MobileCLIP2", "debug")
SIZES: tuple[Size, ...] = ("paper", "tiny", "demo")
KINDS: tuple[Kind, ...] = ("clip", "coca")


@dataclass(frozen=True)
class Preprocess:
    """A model's inference preprocessing (open_clip ``PreprocessCfg`` keys); image size comes from its config.

    The one description of preprocessing in `clipdr.models`: variants carry it, teachers and captioners resolve
    theirs to it. open_clip keeps it with the *pretrained tag*, so a model built with ``pretrained=None`` or a
    local file would otherwise fall back to open_clip's defaults (`OPEN_CLIP_PREPROCESS`).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize_mode: str = "shortest"

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> Preprocess:
        """From an open_clip preprocessing or pretrained config; keys it lacks take open_clip's defaults."""
        return cls(
            mean=tuple(float(m) for m in cfg.get("mean", OPENAI_DATASET_MEAN)),
            std=tuple(float(s) for s in cfg.get("std", OPENAI_DATASET_STD)),
            interpolation=cfg.get("interpolation", OPEN_CLIP_PREPROCESS.interpolation),
            resize_mode=cfg.get("resize_mode", OPEN_CLIP_PREPROCESS.resize_mode),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


# MobileCLIP: pixels in [0, 1], no normalisation. MobileCLIP2-S3/S4/L-14 were trained with OpenAI mean/std.
MOBILECLIP_PREPROCESS = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
OPENAI_PREPROCESS = Preprocess(mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD))
# What open_clip attaches to a model without a pretrained tag: the project's ViT and CoCa twins were always built
# and trained that way, so their recorded teacher specs and training inputs stay what they were.
OPEN_CLIP_PREPROCESS = Preprocess(
    mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD), interpolation="bicubic", resize_mode="shortest"
)


@dataclass(frozen=True)
class Variant:
    """One model variant and what the papers report for it.

    Attributes:
        name: open_clip model name.
        family: ``MobileCLIP``, ``MobileCLIP2`` or ``debug`` (the tiny and demo twins).
        image_tower: Short description of the image tower.
        text_tower: Short description of the text tower.
        size: ``paper`` (a real architecture), ``tiny`` (tests, seconds on a CPU) or ``demo`` (the demo world).
        kind: ``clip`` (image and text towers) or ``coca`` (plus a caption decoder: a captioner).
        paper_params_m: (image, text) parameters in millions, from the paper's table; None for debug variants.
        paper_iphone_ms: (image, text) latency on an iPhone 12 Pro Max in ms, where the paper gives it.
        preprocess: Inference preprocessing.
    """

    name: str
    family: Family
    image_tower: str
    text_tower: str
    size: Size = "paper"
    kind: Kind = "clip"
    paper_params_m: tuple[float, float] | None = None
    paper_iphone_ms: tuple[float, float] | None = None
    preprocess: Preprocess = MOBILECLIP_PREPROCESS

    @property
    def config_source(self) -> str:
        """``clipdr`` for configs shipped in this package, ``open_clip`` for open_clip's own."""
        return "clipdr" if is_clipdr_config(self.name) else "open_clip"


_MCI0, _MCI2, _VIT_B = "MCi0 (2-6-10-2, 64..512)", "MCi2 (4-12-24-4, 80..640)", "ViT-B/16, conv stem"
_T512, _T512_CAUSAL, _T768 = "12 x 512, non-causal", "12 x 512, causal", "12 x 768, non-causal"
_TINY_MCI = "tiny MCi (1-1-1-1, 16..128)"
_TINY_VIT = "ViT 2 x 64, patch 8 @ 32 px"


def _twin(name: str, size: Size, image_tower: str, text_tower: str, **kwargs: Any) -> Variant:
    return Variant(name, "debug", image_tower, text_tower, size=size, **kwargs)


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "MobileCLIP-S0",
        "MobileCLIP",
        _MCI0,
        "MCt: RepMixer + 4 x 512 + RepMixer",
        paper_params_m=(11.4, 42.4),
        paper_iphone_ms=(1.5, 1.6),
    ),
    Variant("MobileCLIP-S1", "MobileCLIP", "MCi1 (4-12-20-4, 64..512)", _T512, paper_params_m=(21.5, 63.4)),
    Variant("MobileCLIP-S2", "MobileCLIP", _MCI2, _T512, paper_params_m=(35.7, 63.4), paper_iphone_ms=(3.6, 3.3)),
    Variant(
        "MobileCLIP-B", "MobileCLIP", _VIT_B, _T512_CAUSAL, paper_params_m=(86.3, 63.4), paper_iphone_ms=(10.4, 3.3)
    ),
    Variant("MobileCLIP2-S0", "MobileCLIP2", _MCI0, _T512, paper_params_m=(11.4, 63.4)),
    Variant("MobileCLIP2-S2", "MobileCLIP2", _MCI2, _T512, paper_params_m=(35.7, 63.4)),
    Variant("MobileCLIP2-B", "MobileCLIP2", _VIT_B, _T512_CAUSAL, paper_params_m=(86.3, 63.4)),
    Variant(
        "MobileCLIP2-S3",
        "MobileCLIP2",
        "MCi3 (5 stages, 96..1536)",
        _T768,
        paper_params_m=(125.1, 123.6),
        preprocess=OPENAI_PREPROCESS,
    ),
    Variant(
        "MobileCLIP2-S4",
        "MobileCLIP2",
        "MCi4 (5 stages, 128..2048)",
        _T768,
        paper_params_m=(321.6, 123.6),
        preprocess=OPENAI_PREPROCESS,
    ),
    Variant(
        "MobileCLIP2-L-14",
        "MobileCLIP2",
        "ViT-L/14",
        _T768,
        paper_params_m=(304.3, 123.6),
        preprocess=OPEN_CLIP_PREPROCESS,
    ),
    # Students: MobileCLIP-S0-shaped (MCt) and S1/S2/MobileCLIP2-shaped (transformer text) twins.
    _twin("clipdr-tiny-mct", "tiny", _TINY_MCI, "MCt: RepMixer + 1 x 64 + RepMixer"),
    _twin("clipdr-tiny-mci", "tiny", _TINY_MCI, "2 x 64, non-causal"),
    # The demo's student and second teacher: the tiny MCi at 32 px, text context 48 (the demo world's captions).
    _twin("clipdr-demo-mci", "demo", _TINY_MCI + " @ 32 px", "2 x 64, non-causal, 48 tokens"),
    # Teachers and captioners of tests and the demo: open_clip ViT and CoCa parts, open_clip's preprocessing.
    _twin("clipdr-tiny-vit", "tiny", _TINY_VIT, "2 x 64, causal", preprocess=OPEN_CLIP_PREPROCESS),
    _twin("clipdr-demo-vit", "demo", _TINY_VIT, "2 x 64, causal, 48 tokens", preprocess=OPEN_CLIP_PREPROCESS),
    _twin(
        "clipdr-tiny-coca",
        "tiny",
        "ViT 2 x 64, patch 8 @ 64 px",
        "2 x 64 + 2-layer caption decoder",
        kind="coca",
        preprocess=OPEN_CLIP_PREPROCESS,
    ),
    _twin(
        "clipdr-demo-coca",
        "demo",
        "ViT 2 x 64, patch 4 @ 32 px",
        "2 x 64 + 2-layer caption decoder, 16 tokens",
        kind="coca",
        preprocess=OPEN_CLIP_PREPROCESS,
    ),
)

_BY_NAME = {v.name: v for v in VARIANTS}


def _choose(what: str, value: str | None, valid: tuple[str, ...]) -> None:
    if value is not None and value not in valid:
        raise ValueError(f"unknown variant {what} {value!r}; valid {what}s: {', '.join(valid)}")


def list_variants(family: str | None = None, *, size: str | None = None, kind: str | None = None) -> list[str]:
    """Names of the registered variants, optionally only those of a family, a size and/or a kind.

    Args:
        family: ``MobileCLIP``, ``MobileCLIP2`` or ``debug`` (every tiny and demo twin).
        size: ``paper``, ``tiny`` or ``demo``.
        kind: ``clip`` or ``coca``.
    """
    _choose("family", family, FAMILIES)
    _choose("size", size, SIZES)
    _choose("kind", kind, KINDS)
    return [
        v.name
        for v in VARIANTS
        if (family is None or v.family == family)
        and (size is None or v.size == size)
        and (kind is None or v.kind == kind)
    ]


def get_variant(name: str) -> Variant:
    """The registry entry of ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; valid variants: {', '.join(_BY_NAME)}") from None


def needs_clipdr(model_cfg: Mapping[str, Any]) -> bool:
    """Whether open_clip and timm alone cannot build ``model_cfg``: it names a clipdr timm tower or the MCt text tower.

    open_clip 3.3 passes no kwargs to timm, so the tiny MCi exists only as a timm model this package registers
    (``mci.TIMM_MODELS``); MCt is built by the text-tower hook ``register()`` installs. Both need
    ``import clipdr.models`` before open_clip builds the model.
    """
    vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg")
    return vision_cfg.get("timm_model_name") in mci.TIMM_MODELS or is_mct_cfg(text_cfg)


def is_clipdr_config(name: str) -> bool:
    """Whether ``name`` is one of this package's open_clip configs (open_clip knows it only after ``register()``)."""
    return (CONFIG_DIR / f"{name}.json").is_file()


def _install_mct_text_tower() -> None:
    """Makes open_clip build MCt for text configs marked ``clipdr_text_tower: mct`` (idempotent).

    ``CustomTextCLIP.__init__`` looks ``_build_text_tower`` up in ``open_clip.model`` at call time, so wrapping
    that one function is enough; open_clip is pinned (3.3.0) and tests/unit/test_models.py checks the hook.
    """
    original = open_clip.model._build_text_tower
    if getattr(original, "clipdr_mct_hook", False):
        return

    @functools.wraps(original)
    def build_text_tower(embed_dim: int, text_cfg: Any, quick_gelu: bool = False, cast_dtype: Any = None) -> Any:
        if is_mct_cfg(text_cfg):
            return build_mct(embed_dim, text_cfg, quick_gelu=quick_gelu, cast_dtype=cast_dtype)
        return original(embed_dim, text_cfg, quick_gelu, cast_dtype)

    build_text_tower.clipdr_mct_hook = True
    open_clip.model._build_text_tower = build_text_tower


def register() -> None:
    """Registers this package's configs and the MCt text tower with open_clip; safe to call repeatedly."""
    _install_mct_text_tower()
    known = set(open_clip.list_models())
    if not all(v.name in known for v in VARIANTS if v.config_source == "clipdr"):
        open_clip.add_model_config(CONFIG_DIR)
    missing = [v.name for v in VARIANTS if v.name not in open_clip.list_models()]
    assert not missing, f"variants without an open_clip config: {missing}"
    unlisted = sorted({path.stem for path in CONFIG_DIR.glob("*.json")} - set(_BY_NAME))
    assert not unlisted, f"shipped configs that are not listed variants: {unlisted}"
