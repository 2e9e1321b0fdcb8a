"""Teacher CLIP models (open_clip) that embed stored views and captions: reinforcement, online distillation.

Each teacher replays the same stored views (`augment.replay`) at its own input size, interpolation and
mean/std, so teachers of different resolutions see the same crops. Embeddings are L2-normalised in fp32 and
returned as fp16, the dtype the reinforced record stores.

Shape suffixes: N samples, K views a sample, T captions a sample (1 real + S synthetic), D embedding width,
C/H/W channels and pixels, L tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import open_clip
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import pil_to_tensor

from clipdr import augment, models
from clipdr.config import TeacherConfig
from clipdr.records import TeacherSpec, validate_teacher_name

_SUPPORTED_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class TeacherError(ValueError):
    """A teacher that cannot be built or served as configured."""


def check_teacher(cfg: TeacherConfig) -> None:
    """Validates a teacher's config without loading weights (for fail-fast and dry runs)."""
    where = f"reinforce.teachers[{cfg.name or '?'}]"
    try:
        validate_teacher_name(cfg.name)
    except ValueError as e:
        raise TeacherError(f"{where}: {e}") from None
    if cfg.logit_scale <= 0:
        raise TeacherError(f"{where}: logit_scale must be > 0, got {cfg.logit_scale}")
    try:
        models.model_config(cfg.model) if not cfg.model.startswith("hf-hub:") else None
    except ValueError as e:
        raise TeacherError(f"{where}: {e}") from None
    pretrained = cfg.pretrained
    if not pretrained or pretrained.startswith("hf-hub:") or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    if pretrained not in tags:
        raise TeacherError(
            f"{where}: pretrained {pretrained!r} is neither a file nor an open_clip tag of {cfg.model!r} "
            f"(tags: {', '.join(tags) or 'none'})"
        )


@contextlib.contextmanager
def seeded_init(name: str) -> Iterator[None]:
    """Makes random initialisation a function of ``name``, leaving the global torch RNG as it was.

    Only models built without weights (tests, smoke runs) depend on it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1)
        yield


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _preprocess(cfg: TeacherConfig) -> models.Preprocess:
    """Preprocessing of a teacher as open_clip would attach it: the variant's own, the pretrained tag's, or
    open_clip's defaults (OpenAI mean/std, bicubic)."""
    if cfg.model in models.list_variants():
        return models.get_variant(cfg.model).preprocess
    tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) if cfg.pretrained else {}
    return models.Preprocess.from_open_clip(tag_cfg)


def teacher_spec(cfg: TeacherConfig, offline: bool = False) -> TeacherSpec | None:
    """The `TeacherSpec` a teacher will be recorded with, from configs alone (no weights are loaded).

    ``hf-hub:`` models keep their config on the hub, so for those the model is loaded (network needed), or,
    when ``offline``, None is returned.
    """
    check_teacher(cfg)
    if cfg.model.startswith("hf-hub:"):
        return None if offline else Teacher(cfg, torch.device("cpu")).spec
    model_cfg = models.model_config(cfg.model)
    return _make_spec(cfg, model_cfg["embed_dim"], model_cfg["vision_cfg"]["image_size"], _preprocess(cfg))


def _make_spec(cfg: TeacherConfig, embed_dim: int, size: int | Sequence[int], pp: models.Preprocess) -> TeacherSpec:
    """A `TeacherSpec`, refusing inputs that view replay cannot serve (non-square sizes, odd interpolations)."""
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise TeacherError(f"teacher {cfg.name!r}: non-square input size {size} cannot be served")
        size = size[0]
    interpolation = pp.interpolation
    if interpolation not in _SUPPORTED_INTERPOLATIONS:
        raise TeacherError(f"teacher {cfg.name!r}: interpolation {interpolation!r} cannot be replayed")
    return TeacherSpec(
        name=cfg.name,
        model=cfg.model,
        pretrained=cfg.pretrained,
        embed_dim=int(embed_dim),
        logit_scale=cfg.logit_scale,
        image_size=int(size),
        mean=pp.mean,
        std=pp.std,
        interpolation=interpolation,
    )


class Teacher:
    """One loaded teacher: model and tokenizer; views are rendered with its `TeacherSpec`'s preprocessing."""

    def __init__(self, cfg: TeacherConfig, device: torch.device, spec: TeacherSpec | None = None) -> None:
        check_teacher(cfg)
        self.device = device
        with seeded_init(cfg.name):  # without weights, every actor and every rerun builds the same model
            self.model = models.create_model(cfg.model, pretrained=cfg.pretrained or None, device=device).eval()
        self.tokenizer = models.get_tokenizer(cfg.model)
        if spec is None:  # an hf-hub model: take what the hub's config attached to the model
            with torch.inference_mode():
                embed_dim = self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1]
            pp = self.model.visual.preprocess_cfg
            spec = _make_spec(cfg, embed_dim, pp["size"], models.Preprocess.from_open_clip(pp))
        self.spec = spec

    @torch.inference_mode()
    def embed_views(
        self, images_CHW: Sequence[torch.Tensor], views: Sequence[Sequence[augment.AugParams]]
    ) -> np.ndarray:
        """(N, K, D) fp16 embeddings of each image's stored views, replayed at this teacher's resolution."""
        spec = self.spec
        views_NK_CHW = [
            augment.replay(image_CHW, params, spec.image_size, spec.mean, spec.std, spec.interpolation)
            for image_CHW, image_views in zip(images_CHW, views, strict=True)
            for params in image_views
        ]
        batch_BCHW = torch.stack(views_NK_CHW).to(self.device)
        with _autocast(self.device):
            emb_BD = self.model.encode_image(batch_BCHW)
        emb_BD = F.normalize(emb_BD.float(), dim=-1)
        return emb_BD.reshape(len(images_CHW), -1, emb_BD.shape[-1]).cpu().numpy().astype(np.float16)

    @torch.inference_mode()
    def embed_texts(self, captions: Sequence[Sequence[str]]) -> np.ndarray:
        """(N, T, D) fp16 embeddings of each sample's captions (same count T for every sample)."""
        flat = [text for sample in captions for text in sample]
        tokens_BL = self.tokenizer(flat).to(self.device)
        with _autocast(self.device):
            emb_BD = self.model.encode_text(tokens_BL)
        emb_BD = F.normalize(emb_BD.float(), dim=-1)
        return emb_BD.reshape(len(captions), -1, emb_BD.shape[-1]).cpu().numpy().astype(np.float16)


class TeacherEnsemble:
    """All teachers of a run, loaded once (a Ray Data actor holds one of these)."""

    def __init__(self, teachers: Sequence[TeacherConfig], device: str | torch.device = "cpu") -> None:
        if not teachers:
            raise TeacherError("reinforce.teachers is empty: name at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise TeacherError(f"reinforce.teachers: duplicate teacher names in {names}")
        self.device = torch.device(device)
        self.teachers = [Teacher(t, self.device, teacher_spec(t, offline=True)) for t in teachers]

    @property
    def specs(self) -> tuple[TeacherSpec, ...]:
        return tuple(t.spec for t in self.teachers)

    def embed(
        self,
        images: Sequence[PIL.Image.Image],
        views: Sequence[Sequence[augment.AugParams]],
        captions: Sequence[Sequence[str]],
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{teacher: (image_emb_NKD, text_emb_NTD)}`` for a batch of samples."""
        images_CHW = [pil_to_tensor(image.convert("RGB")) for image in images]
        return {t.spec.name: (t.embed_views(images_CHW, views), t.embed_texts(captions)) for t in self.teachers}
