"""Teacher CLIP models (open_clip) that embed stored views and captions: reinforcement, online distillation.

Each teacher embeds the same stored views replayed (`augment.replay_uint8`) at its own input size and
interpolation, so teachers of different resolutions see the same crops. Rendering is apart from the model: the
views of all teachers that share an `augment.RenderKey` are rendered once, as uint8 (`augment.render_views`; in
the reinforcement job a CPU stage does it), and a teacher only normalises them with its own mean/std on its device
and runs its forward (`Teacher.embed_views`): the same pixels and the same normalisation (`augment.normalize`) as
`augment.replay`, which training replays views with. Embeddings are L2-normalised in fp32 and returned as fp16,
the dtype the reinforced record stores.

``clipdr-sim-accel-<size>[@<views/s>]`` names a simulated accelerator (`clipdr.models.sim_accel`), a teacher
whose forward sleeps a fixed time per view, for measuring the pipeline without a device.

Shape suffixes: N samples, K views a sample, T captions a sample (1 real + S synthetic), D embedding width,
C/H/W channels and pixels, L tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from clipdr import augment, models
from clipdr.config import TeacherConfig
from clipdr.models import sim_accel
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
        if sim_accel.is_sim(cfg.model):
            sim_accel.parse(cfg.model)
            return
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
    if sim_accel.is_sim(cfg.model):
        return models.Preprocess.from_open_clip({})  # open_clip's defaults: OpenAI mean/std, bicubic
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
    if sim_accel.is_sim(cfg.model):
        return _make_spec(cfg, sim_accel.EMBED_DIM, sim_accel.parse(cfg.model).image_size, _preprocess(cfg))
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


def _sim_tokenizer():
    return models.get_tokenizer("clipdr-tiny-vit")  # open_clip's default BPE tokenizer, shipped with open_clip


class Teacher:
    """One loaded teacher: model and tokenizer; embeds uint8 views rendered with its `TeacherSpec`'s size and
    interpolation, normalised with its mean/std on its device."""

    def __init__(self, cfg: TeacherConfig, device: torch.device, spec: TeacherSpec | None = None) -> None:
        check_teacher(cfg)
        self.device = device
        if sim_accel.is_sim(cfg.model):
            self.tokenizer = _sim_tokenizer()
            vocab_size = self.tokenizer.vocab_size
            model = sim_accel.SimAccel(sim_accel.parse(cfg.model), vocab_size, self.tokenizer.context_length)
            self.model = model.to(device).eval()
        else:
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
    def embed_views(self, views_NKCHW: np.ndarray) -> np.ndarray:
        """(N, K, D) fp16 embeddings of uint8 views rendered at this teacher's `augment.RenderKey`
        (`augment.render_views`).

        Host-to-device copy of the uint8 views (a quarter of float32's bytes), normalisation and forward on the
        device, device-to-host copy of the embeddings: nothing else runs here.
        """
        N, K = views_NKCHW.shape[:2]
        assert views_NKCHW.dtype == np.uint8 and views_NKCHW.shape[-1] == self.spec.image_size, views_NKCHW.shape
        views_NKCHW = np.require(views_NKCHW, requirements=("C", "W"))  # torch wants writable memory
        views_BCHW = torch.from_numpy(views_NKCHW).flatten(0, 1).to(self.device)
        batch_BCHW = augment.normalize(views_BCHW, self.spec.mean, self.spec.std)
        with _autocast(self.device):
            emb_BD = self.model.encode_image(batch_BCHW)
        emb_BD = F.normalize(emb_BD.float(), dim=-1)
        return emb_BD.reshape(N, K, emb_BD.shape[-1]).cpu().numpy().astype(np.float16)

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
        self, views: Mapping[augment.RenderKey, np.ndarray], captions: Sequence[Sequence[str]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{teacher: (image_emb_NKD, text_emb_NTD)}`` for a batch of samples, from their uint8 views of every
        `augment.render_keys` entry (``{key: views_NKCHW}``) and their captions."""
        return {
            t.spec.name: (t.embed_views(views[augment.RenderKey.of(t.spec)]), t.embed_texts(captions))
            for t in self.teachers
        }
