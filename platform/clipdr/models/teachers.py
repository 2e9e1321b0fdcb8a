"""Teacher CLIP models (open_clip) that embed stored views and captions: reinforcement, online distillation.

Each teacher embeds the same stored views replayed (`augment.replay_uint8`) at its own input size and
interpolation, so teachers of different resolutions see the same crops. Rendering is apart from the model: the
views of all teachers that share an `augment.RenderKey` are rendered once, as uint8 (`augment.render_views`; in
the reinforcement job a CPU stage does it), and a teacher only normalises them with its own mean/std on its device
and runs its forward (`Teacher.embed_views`): the same pixels and the same normalisation (`augment.normalize`) as
`augment.replay`, which training replays views with. Embeddings are L2-normalised in fp32 and returned as fp16,
the dtype the reinforced record stores.

A forward is split where a device splits it: host work (`stage_views`: the uint8 views into pinned memory and an
asynchronous copy to the device; tokenising captions), then device work (`Teacher.forward_views`,
`Teacher.forward_texts`: normalisation, forward, L2 normalisation, copy back). `TeacherEnsemble` holds the device
for the device work only (`TeacherEnsemble.device_lock`), so a model actor that takes two chunks at once prepares
the next one on the host while the device runs the current one (`clipdr.reinforce.stages.Embed`).

``clipdr-sim-accel-<size>[@<views/s>]`` names a simulated accelerator (`clipdr.models.sim_accel`), a teacher
whose forward sleeps a fixed time per view, for measuring the pipeline without a device.

Shape suffixes: N samples, K views a sample, T captions a sample (1 real + S synthetic), D embedding width,
C/H/W channels and pixels, L tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``auto``: fp32 weights under bf16 autocast on CUDA (each forward re-casts weights and activations), fp32 on
    the CPU. ``bf16``: the weights themselves are bf16 (`Teacher`), so nothing is cast."""
    if device.type == "cuda" and precision == "auto":
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
        precision=cfg.precision,
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
        # bf16: weights and activations in bf16 on every device (the views normalised in fp32, then cast); on an H200
        # the ViT-L-14 forward ran 1.41x the views/s of autocast, which re-casts fp32 weights every forward.
        self.dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
        self.model = self.model.to(self.dtype)

    def _device_time(self, num_views: int) -> contextlib.AbstractContextManager:
        """The span of one forward on the device: a simulated accelerator's forward takes its views' time."""
        if isinstance(self.model, sim_accel.SimAccel):
            return self.model.forward_time(num_views)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed_views(self, views_NKCHW: np.ndarray) -> np.ndarray:
        """(N, K, D) fp16 embeddings of uint8 views rendered at this teacher's `augment.RenderKey`
        (`augment.render_views`): `stage_views`, then `forward_views`."""
        return self.forward_views(stage_views(views_NKCHW, self.device), len(views_NKCHW))

    @torch.inference_mode()
    def forward_views(self, views_BCHW: torch.Tensor, num_samples: int) -> np.ndarray:
        """(N, K, D) fp16 embeddings of N x K uint8 views already on the device (`stage_views`): normalisation and
        forward on the device, device-to-host copy of the embeddings. Device work only: the caller holds the
        device (`TeacherEnsemble.device_lock`)."""
        assert views_BCHW.dtype == torch.uint8 and views_BCHW.shape[-1] == self.spec.image_size, views_BCHW.shape
        with self._device_time(len(views_BCHW)):
            batch_BCHW = augment.normalize(views_BCHW, self.spec.mean, self.spec.std).to(self.dtype)
            with _autocast(self.device, self.spec.precision):
                emb_BD = self.model.encode_image(batch_BCHW)
            emb_BD = F.normalize(emb_BD.float(), dim=-1).cpu()
        return emb_BD.reshape(num_samples, -1, emb_BD.shape[-1]).numpy().astype(np.float16)

    def tokenize(self, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        """Host work of a text forward: every sample's captions (same count T for each) as tokens, on the host
        (`forward_texts` copies them: a copy from pageable memory would wait for the device's running forward)."""
        return self.tokenizer([text for sample in captions for text in sample])

    @torch.inference_mode()
    def forward_texts(self, tokens_BL: torch.Tensor, num_samples: int) -> np.ndarray:
        """(N, T, D) fp16 embeddings of the tokens `tokenize` gave for N samples. Device work only, as
        `forward_views`."""
        with self._device_time(0):
            with _autocast(self.device, self.spec.precision):
                emb_BD = self.model.encode_text(tokens_BL.to(self.device))
            emb_BD = F.normalize(emb_BD.float(), dim=-1).cpu()
        return emb_BD.reshape(num_samples, -1, emb_BD.shape[-1]).numpy().astype(np.float16)

    def embed_texts(self, captions: Sequence[Sequence[str]]) -> np.ndarray:
        """(N, T, D) fp16 embeddings of each sample's captions (same count T for every sample)."""
        return self.forward_texts(self.tokenize(captions), len(captions))


def stage_views(views_NKCHW: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host work of an image forward: uint8 views (N, K, 3, S, S) as one (N x K, 3, S, S) uint8 batch on ``device``.

    On CUDA through pinned memory, copied asynchronously: the copy is queued on the device behind the forward it
    may be running, and the caller goes on (torch's pinned-memory allocator keeps the buffer until the copy is done).
    A quarter of float32's bytes cross; the normalisation to float runs on the device, in `Teacher.forward_views`.
    On the CPU the array itself, made writable (torch wants writable memory; an Arrow buffer is read-only).
    """
    assert views_NKCHW.dtype == np.uint8 and views_NKCHW.ndim == 5, (views_NKCHW.dtype, views_NKCHW.shape)
    if device.type == "cuda":
        pinned_NKCHW = torch.empty(views_NKCHW.shape, dtype=torch.uint8, pin_memory=True)
        pinned_NKCHW.numpy()[...] = views_NKCHW
        return pinned_NKCHW.flatten(0, 1).to(device, non_blocking=True)
    views_NKCHW = np.require(views_NKCHW, requirements=("C", "W"))
    return torch.from_numpy(views_NKCHW).flatten(0, 1).to(device)


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
        # One device: its forwards run one at a time, while the host work of another call (another thread of the
        # model actor) runs beside them.
        self.device_lock = threading.Lock()
        # Not every tokenizer may be used by two threads at once (a Hugging Face fast tokenizer raises "Already
        # borrowed"): tokenising is host work, but one call at a time.
        self._tokenize_lock = threading.Lock()

    @property
    def specs(self) -> tuple[TeacherSpec, ...]:
        return tuple(t.spec for t in self.teachers)

    def embed(
        self, views: Mapping[augment.RenderKey, np.ndarray], captions: Sequence[Sequence[str]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{teacher: (image_emb_NKD, text_emb_NTD)}`` for a batch of samples, from their uint8 views of every
        `augment.render_keys` entry (``{key: views_NKCHW}``) and their captions.

        The host work first (each render's views staged once, whichever teachers share it; the captions tokenised),
        then the device's, holding it (`device_lock`) only for that.
        """
        staged = {key: stage_views(views_NKCHW, self.device) for key, views_NKCHW in views.items()}
        tokens = self._tokenize(captions)
        with self.device_lock:
            return {
                t.spec.name: (
                    t.forward_views(staged[augment.RenderKey.of(t.spec)], len(captions)),
                    t.forward_texts(tokens_BL, len(captions)),
                )
                for t, tokens_BL in zip(self.teachers, tokens, strict=True)
            }

    def embed_texts(self, captions: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        """``{teacher: text_emb_NTD}`` of each sample's captions, holding the device only for the forwards."""
        tokens = self._tokenize(captions)
        with self.device_lock:
            return {
                t.spec.name: t.forward_texts(tokens_BL, len(captions))
                for t, tokens_BL in zip(self.teachers, tokens, strict=True)
            }

    def _tokenize(self, captions: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        with self._tokenize_lock:
            return [t.tokenize(captions) for t in self.teachers]
