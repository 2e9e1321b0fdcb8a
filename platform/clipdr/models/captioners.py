"""Synthetic-caption models behind a small registry: S captions an image, reproducible under a seed.

The reinforcement job asks a captioner for S captions of each image (MOBILECLIP.md). One kind exists now,
``coca``: an open_clip CoCa model (``coca_ViT-L-14`` with ``mscoco_finetuned_laion2b_s13b_b90k`` in the DataCompDR
recipe, the project's ``clipdr-tiny-coca`` in tests and the demo). Another captioner is a class with a
``generate`` method, registered under its kind with `register_captioner`::

    captioner = build_captioner(spec, device="cuda")  # spec: records.CaptionerSpec or the reinforce config
    captions = captioner.generate(images, keys, num_captions=5)  # captions[i][s], s < 5

Why a sampling loop of our own rather than ``CoCa.generate``. open_clip samples with ``torch.multinomial`` from
the global RNG across the whole batch, so a sample's captions depend on which other images share its batch and
on everything that ran before; a resumed or re-batched reinforcement would write different captions. Here every
decoding row (image i, caption s) draws its uniforms from its own ``torch.Generator``, seeded by a stable hash of
(seed, key, s) (`caption_seed`), and turns them into tokens by inverse-CDF top-p sampling. The same (seed, key, s)
therefore gives the same caption whether the image is captioned alone or in any batch, on any worker; the random
numbers are drawn on the CPU so they do not depend on the device either. What remains is float rounding: a batched
forward need not be bit-identical to an unbatched one (GPU kernels, reduced precision), and a token flips only
when a uniform lands within that rounding of a token boundary of the nucleus (coca_decoding).

Generation is KV-cached (`clipdr.models.coca_decoding`): a step feeds each row only its newest token, and gives the
same tokens as recomputing the whole prefix (the reference loop kept for tests and the benchmark) up to float
rounding of a different summation order: tested token for token in float64 on the tiny CoCa; in float32 a token
differs when a uniform falls within that rounding of a boundary (coca_decoding's docstring says how often). On
CUDA it runs under bf16 autocast: numerically another model, so a dataset captioned on a GPU need not equal one
captioned on a CPU. A redone shard still equals the original because the reinforcement captions fixed chunks
(the same batch composition every time) on the same kind of device.

Decoding follows the DataCompDR caption generation (apple/ml-mobileclip-dr ``scripts/gen.py``: ``CoCa.generate``
with ``generation_type="top_p"``, ``top_p=0.9``): a start-of-text token, end-of-text suppressed until the sequence
holds `MIN_LEN` tokens (open_clip's ``min_seq_len``), end-of-text forced at ``max_len`` tokens in all (open_clip's
``seq_len``; DataCompDR used open_clip's default of 30), and the text cut at end-of-text and at the first "."
(`clean_caption`). Temperature divides the logits before the top-p cut (the usual order; open_clip applies it
after, which is the same at the default temperature 1). A row whose cleaned caption is empty is resampled with the
next attempt's seed, at most `MAX_RESAMPLES` times, so "" is stored only when every attempt was empty.

Shape suffixes: B images, S captions an image, R = B * S decoding rows (row i * S + s), A active rows of a step,
L tokens so far, V vocabulary, N image tokens of the decoder, W decoder width, C, H, W_px image channels and sides.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch import nn

from clipdr.models.coca_decoding import CocaKVCache, uncached_next_token_logits
from clipdr.models.registry import Preprocess, get_variant, list_variants, register
from clipdr.records import CaptionerSpec

TINY_COCA = "clipdr-tiny-coca"

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
MIN_LEN = 5  # tokens (start-of-text included) before end-of-text may be sampled: open_clip's min_seq_len default
UNIFORMS_PER_TOKEN = 9  # random numbers a row draws a token: 8 rejection-sampling tries + the fallback's (sample_top_p)
MAX_RESAMPLES = 3  # extra attempts, each with its own seed, for a row whose cleaned caption is empty
GENERATION_TYPES = ("top_p",)
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, the model's own dtype elsewhere

ImageTransform = Callable[[Image.Image], torch.Tensor]
_C = TypeVar("_C", bound="Captioner")


# --------------------------------------------------------------------------- registry


class Captioner(abc.ABC):
    """A model that writes synthetic captions; subclasses register under a kind with `register_captioner`.

    Attributes:
        kind: The registry key of the class (set by `register_captioner`).
        spec: What the captioner is and how it samples; recorded in the dataset's manifest.
    """

    kind: ClassVar[str] = ""

    def __init__(self, spec: CaptionerSpec) -> None:
        self.spec = spec

    @classmethod  # noqa: B027  (an optional hook: a no-op unless a kind overrides it)
    def validate(cls, spec: CaptionerSpec) -> None:
        """Raises ``ValueError`` if this class cannot serve ``spec``; cheap, loads nothing (fail-fast checks)."""

    @abc.abstractmethod
    def generate(self, images: Sequence[Image.Image], keys: Sequence[str], num_captions: int) -> list[list[str]]:
        """Writes ``num_captions`` captions for every image.

        Args:
            images: The images (any mode; converted as the model's preprocessing does).
            keys: Each image's sample key; with ``spec.seed`` it alone decides the image's random numbers.
            num_captions: S, captions an image (>= 1).

        Returns:
            ``captions[i][s]``: caption ``s`` of image ``i``; the same for the same (seed, key, s) in any batch.
        """


_CAPTIONERS: dict[str, type[Captioner]] = {}


def register_captioner(kind: str) -> Callable[[type[_C]], type[_C]]:
    """Class decorator registering a `Captioner` subclass under ``kind`` (the ``kind`` of a `CaptionerSpec`)."""

    def register(cls: type[_C]) -> type[_C]:
        if not (isinstance(cls, type) and issubclass(cls, Captioner)):
            raise TypeError(f"register_captioner({kind!r}) decorates Captioner subclasses, got {cls!r}")
        if _CAPTIONERS.get(kind, cls) is not cls:
            raise ValueError(f"captioner kind {kind!r} is already registered by {_CAPTIONERS[kind].__qualname__}")
        cls.kind = kind
        _CAPTIONERS[kind] = cls
        return cls

    return register


def list_captioners() -> list[str]:
    """The registered captioner kinds, sorted."""
    return sorted(_CAPTIONERS)


def captioner_spec(settings: Any) -> CaptionerSpec:
    """A `CaptionerSpec` from itself or from a config section that has the spec's fields (extra fields ignored).

    Args:
        settings: A `CaptionerSpec`, or a dataclass (e.g. the reinforce config's captioner section) carrying
            some or all of its fields; missing optional fields take the spec's defaults.

    Raises:
        ValueError: A required field (name, kind, model, pretrained) is missing, or a value is out of range.
    """
    if isinstance(settings, CaptionerSpec):
        return settings
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"expected a CaptionerSpec or a captioner config dataclass, got {type(settings).__name__}")
    spec_fields = dataclasses.fields(CaptionerSpec)
    values = {f.name: getattr(settings, f.name) for f in spec_fields if hasattr(settings, f.name)}
    required = [f.name for f in spec_fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"captioner settings {type(settings).__name__} lack required field(s): {', '.join(missing)}")
    return CaptionerSpec(**values)


def validate_captioner(settings: Any) -> CaptionerSpec:
    """Checks, without loading a model, that a captioner can be built; returns its spec.

    Meant for a job's fail-fast phase: an unknown kind, an unsupported generation type, an unknown architecture,
    a missing weights file or a ``max_len`` beyond the model's context raise ``ValueError`` naming the problem.
    """
    spec = captioner_spec(settings)
    _captioner_class(spec.kind).validate(spec)
    return spec


def build_captioner(settings: Any, device: str | torch.device = "cpu") -> Captioner:
    """Builds the captioner a spec or config section describes.

    Args:
        settings: A `CaptionerSpec` or a config section with its fields (see `captioner_spec`).
        device: Where the model runs.

    Raises:
        ValueError: Unknown kind (the message lists the registered ones) or settings the kind cannot serve.
    """
    spec = validate_captioner(settings)
    return _captioner_class(spec.kind)(spec, device=device)


def _captioner_class(kind: str) -> type[Captioner]:
    try:
        return _CAPTIONERS[kind]
    except KeyError:
        raise ValueError(f"unknown captioner kind {kind!r}; valid kinds: {', '.join(list_captioners())}") from None


# --------------------------------------------------------------------------- seeds and text


def caption_seed(seed: int, key: str, caption_index: int, attempt: int = 0) -> int:
    """A 64-bit seed for one caption, a stable function of its inputs (same on every machine and Python run).

    Args:
        seed: The captioner's seed (``spec.seed``).
        key: The sample's key.
        caption_index: Which of the sample's S captions (0-based).
        attempt: 0 for the first sample, 1.. for resamples of an empty caption.
    """
    message = json.dumps([int(seed), str(key), int(caption_index), int(attempt)]).encode()
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, person=b"clipdr-caption").digest(), "little")


def clean_caption(text: str) -> str:
    """Cuts decoded text as DataCompDR does: up to end-of-text, after the last start-of-text, before the first ".".

    >>> clean_caption("<start_of_text>a red circle . a cat <end_of_text>!!")
    'a red circle'
    """
    return text.split(EOT_TEXT)[0].split(SOT_TEXT)[-1].split(".")[0].strip()


def decode_caption(token_ids: Sequence[int], tokenizer: SimpleTokenizer) -> str:
    """Decodes one generated token sequence with open_clip's tokenizer and cleans it (`clean_caption`)."""
    return clean_caption(tokenizer.decode([int(t) for t in token_ids]))


def sample_top_p(logits_RV: torch.Tensor, uniform_RU: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """Nucleus (top-p) sampling in O(V) a row, driven by each row's own uniforms.

    The nucleus of a row is every token whose probability is at least the top-p threshold: a token is kept when
    the mass of the tokens *more* probable than it is below ``top_p`` (so the most probable token always is, and
    tokens tied at the boundary are kept or dropped together, independent of any ordering). Its probabilities are
    renormalised. Sampling from it is exact rejection sampling: uniform ``u`` picks a token by inverse CDF of the
    whole distribution (in token-id order), kept if it is in the nucleus, else the next uniform is tried; each try
    succeeds with probability >= ``top_p``. A row that exhausts its tries (chance (1 - top_p)^(U-1) or less) takes
    its last uniform through the inverse CDF of the nucleus itself (found by one sort). No full-vocabulary sort in
    the common case, which is what makes a small captioner's step cheap; each row depends only on its own logits
    and uniforms, never on the other rows.

    Args:
        logits_RV: Next-token logits (``-inf`` for banned tokens).
        uniform_RU: U >= 2 uniform numbers in [0, 1) a row: U - 1 tries, then the fallback's.
        top_p: Nucleus mass in (0, 1].
        temperature: Logits are divided by it before the softmax (> 0).

    Returns:
        Token ids, shape (R,), int64.
    """
    num_rows, num_uniforms = uniform_RU.shape
    assert num_uniforms >= 2 and logits_RV.shape[0] == num_rows, (logits_RV.shape, uniform_RU.shape)
    probs_RV = torch.softmax(logits_RV.float() if temperature == 1.0 else logits_RV.float() / temperature, dim=-1)
    cdf_RV = probs_RV.cumsum(dim=-1)
    token_R = torch.full((num_rows,), -1, dtype=torch.long, device=logits_RV.device)
    pending_P = torch.arange(num_rows, device=logits_RV.device)
    probs_PV, cdf_PV = probs_RV, cdf_RV
    for attempt in range(num_uniforms - 1):
        target_P1 = uniform_RU[pending_P, attempt : attempt + 1] * cdf_PV[:, -1:]
        position_P1 = torch.searchsorted(cdf_PV, target_P1, right=True)  # == V only by rounding at u ~ 1
        candidate_P1 = position_P1.clamp(max=probs_PV.shape[1] - 1)
        mass_above_P = (probs_PV * (probs_PV > probs_PV.gather(1, candidate_P1))).sum(dim=-1)  # 2x torch.where
        accepted_P = (mass_above_P < top_p) & (position_P1[:, 0] < probs_PV.shape[1])
        token_R[pending_P[accepted_P]] = candidate_P1[accepted_P, 0]
        if bool(accepted_P.all()):
            return token_R
        pending_P, probs_PV, cdf_PV = pending_P[~accepted_P], probs_PV[~accepted_P], cdf_PV[~accepted_P]
    # Fallback: threshold = probability of the last sorted token whose mass above is below top_p.
    sorted_PV = torch.sort(probs_PV, dim=-1, descending=True).values
    num_kept_P1 = ((sorted_PV.cumsum(dim=-1) - sorted_PV) < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold_P1 = sorted_PV.gather(1, num_kept_P1 - 1)
    kept_PV = probs_PV >= threshold_P1
    kept_cdf_PV = torch.where(kept_PV, probs_PV, 0.0).cumsum(dim=-1)
    target_P1 = uniform_RU[pending_P, -1:] * kept_cdf_PV[:, -1:]
    last_kept_P1 = torch.where(kept_PV, torch.arange(probs_PV.shape[1], device=probs_PV.device), 0).amax(-1, True)
    token_R[pending_P] = torch.minimum(torch.searchsorted(kept_cdf_PV, target_P1, right=True), last_kept_P1)[:, 0]
    return token_R


# --------------------------------------------------------------------------- CoCa


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of generation: bf16 for ``bf16``, and for ``auto`` on CUDA; None (no autocast) else.

    Raises:
        ValueError: ``precision`` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown captioner precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" or (precision, device_type) == ("auto", "cuda") else None


def _is_schema_name(name: str) -> bool:
    return name.startswith(("hf-hub:", "local-dir:"))


def _pretrained_tag(name: str, pretrained: str | None) -> bool:
    return bool(pretrained) and pretrained in open_clip.list_pretrained_tags_by_model(name)


def coca_preprocess(name: str) -> Preprocess:
    """Inference preprocessing of a CoCa architecture when its weights come from no open_clip tag.

    open_clip keeps preprocessing with the pretrained *tag*; built from scratch or from a local file it would use
    its fallback. This returns a registered variant's own (the tiny and demo CoCa: open_clip's defaults, what they
    were trained on), else the architecture's first open_clip tag's (every CoCa tag in open_clip 3.3 uses OpenAI
    mean/std, bicubic, shortest-side resize), else open_clip's defaults. Passed explicitly, so the preprocessing
    never rests on open_clip's fallback.
    """
    if name in list_variants():
        return get_variant(name).preprocess
    tags = open_clip.list_pretrained_tags_by_model(name)
    return Preprocess.from_open_clip(open_clip.get_pretrained_cfg(name, tags[0]) if tags else {})


@torch.no_grad()
def init_coca_decoder(model: CoCa) -> None:
    """Initialises the multimodal text decoder of a CoCa built from scratch.

    open_clip leaves ``text_decoder.text_projection`` as ``torch.empty`` (values up to 1e26 seen; caption loss
    1e18): ``MultimodalTransformer.init_parameters`` would set it but refers to a ``.transformer`` attribute the
    class lacks, so nobody calls it. This does what it intends: GPT-2-style normal init of the self- and
    cross-attention blocks and a width^-0.5 normal projection. Uses the global torch RNG (seed it first).
    """
    decoder = model.text_decoder
    width, layers = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
    for block in (*decoder.resblocks, *decoder.cross_attn):
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=width**-0.5)


def build_coca(
    name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[CoCa, ImageTransform]:
    """Builds an open_clip CoCa and its inference image transform.

    Args:
        name: open_clip architecture (``coca_ViT-L-14``, ``clipdr-tiny-coca``, ...) or an ``hf-hub:`` id.
        pretrained: None or "" for a from-scratch model (its decoder initialised by `init_coca_decoder`; seed the
            global torch RNG first for reproducible weights), an open_clip tag (downloads unless cached), or a
            local checkpoint file (strict load: a state dict, a ``module.``-prefixed training checkpoint or
            safetensors).
        device: Where the model is put.

    Returns:
        ``(model, preprocess)``: the model in train mode, as open_clip returns it, and the eval transform
        (PIL image -> (C, H, W_px) float tensor). A training loop can rebuild a train transform from
        ``model.visual.preprocess_cfg``.

    Raises:
        ValueError: Unknown architecture or not a CoCa, or ``pretrained`` neither a tag of it nor a file.
    """
    _check_coca(name, pretrained or None)
    kwargs: dict[str, Any] = {}
    if not _is_schema_name(name) and not _pretrained_tag(name, pretrained):
        preprocess = coca_preprocess(name)
        kwargs = {
            "image_mean": preprocess.mean,
            "image_std": preprocess.std,
            "image_interpolation": preprocess.interpolation,
            "image_resize_mode": preprocess.resize_mode,
        }
    model, _, transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained or None, device=device, **kwargs
    )
    if not isinstance(model, CoCa):
        raise ValueError(f"{name!r} is a {type(model).__name__}, not a CoCa captioning model")
    if not pretrained:
        init_coca_decoder(model)
    return model, transform


def _check_coca(name: str, pretrained: str | None) -> None:
    """Fail-fast checks of an architecture name and its weights source; loads nothing."""
    register()
    if _is_schema_name(name):
        return
    config = open_clip.get_model_config(name)
    if config is None:
        coca = [m for m in open_clip.list_models() if "multimodal_cfg" in (open_clip.get_model_config(m) or {})]
        raise ValueError(f"unknown captioner model {name!r}; CoCa architectures: {', '.join(coca)}")
    if "multimodal_cfg" not in config:
        raise ValueError(f"{name!r} is not a CoCa architecture (its config has no multimodal_cfg)")
    if pretrained and not _pretrained_tag(name, pretrained) and not Path(pretrained).is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(
            f"captioner weights {pretrained!r} for {name!r} are neither an open_clip tag (tags: {tags}) "
            "nor an existing local file"
        )


def _context_length(name: str) -> int | None:
    config = None if _is_schema_name(name) else open_clip.get_model_config(name)
    return None if config is None else int(config["multimodal_cfg"].get("context_length", 77))


@register_captioner("coca")
class CocaCaptioner(Captioner):
    """An open_clip CoCa model sampled top-p, one random stream a (key, caption index) row.

    ``spec.model`` names the architecture, ``spec.pretrained`` the weights (tag, ``hf-hub:`` id, local file, or
    "" for a from-scratch model: only useful in tests). ``spec.max_len`` counts every token of a generated
    sequence, start- and end-of-text included, and may not exceed the model's context length.

    Generation feeds one token a step through a KV cache (`coca_decoding.CocaKVCache`); ``precision`` (one of
    `PRECISIONS`) runs the image encoder and the decoding steps under bf16 autocast (the default on CUDA; the
    sampling itself is float32 and its random numbers are drawn on the CPU). Setting the attribute ``kv_cache`` to
    False selects the reference loop that recomputes the whole prefix every step
    (`coca_decoding.uncached_next_token_logits`): the tests and ``clipdr bench captioner`` compare the two;
    production never turns it off.
    """

    def __init__(self, spec: CaptionerSpec, device: str | torch.device = "cpu", precision: str = "auto") -> None:
        super().__init__(spec)
        self.validate(spec)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype(precision, self.device.type)
        self.kv_cache = True
        model, self.preprocess = build_coca(spec.model, spec.pretrained or None, device=self.device)
        self.model = model.eval()
        if spec.max_len > self.model.context_length:  # validate() could not know it for an hf-hub: model
            raise ValueError(
                f"captioner max_len {spec.max_len} exceeds {spec.model!r}'s context of {self.model.context_length}"
            )
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        if not isinstance(self.tokenizer, SimpleTokenizer):
            raise ValueError(f"{spec.model!r} uses {type(self.tokenizer).__name__}; the coca captioner needs CLIP BPE")
        self.sot_id, self.eot_id = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        self.pad_id = self.model.pad_id
        assert self.model.text_decoder.batch_first, "the decoding step below assumes a batch-first decoder"

    @classmethod
    def validate(cls, spec: CaptionerSpec) -> None:
        if spec.generation_type not in GENERATION_TYPES:
            raise ValueError(
                f"captioner {spec.name!r}: generation_type {spec.generation_type!r} is not supported by the coca "
                f"captioner; supported: {', '.join(GENERATION_TYPES)}"
            )
        if spec.max_len < 2:
            raise ValueError(f"captioner {spec.name!r}: max_len must leave room for a token, got {spec.max_len}")
        _check_coca(spec.model, spec.pretrained or None)
        context_length = _context_length(spec.model)
        if context_length is not None and spec.max_len > context_length:
            raise ValueError(
                f"captioner {spec.name!r}: max_len {spec.max_len} exceeds {spec.model!r}'s context of {context_length}"
            )

    @torch.inference_mode()
    def generate(self, images: Sequence[Image.Image], keys: Sequence[str], num_captions: int) -> list[list[str]]:
        if len(images) != len(keys):
            raise ValueError(f"got {len(images)} images but {len(keys)} keys")
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        if not images:
            return []
        images_BCHW = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with self._autocast():
            _, image_embs_BND = self.model._encode_image(images_BCHW)
        image_embs_RND = image_embs_BND.repeat_interleave(num_captions, dim=0)
        row_ids = [(key, s) for key in keys for s in range(num_captions)]

        captions = [""] * len(row_ids)
        pending = list(range(len(row_ids)))
        for attempt in range(MAX_RESAMPLES + 1):
            seeds = [caption_seed(self.spec.seed, *row_ids[r], attempt=attempt) for r in pending]
            rows = torch.tensor(pending, device=self.device)
            with self._autocast():
                token_rows = self._sample(image_embs_RND.index_select(0, rows), seeds)
            for r, tokens in zip(pending, token_rows, strict=True):
                captions[r] = decode_caption(tokens, self.tokenizer)
            pending = [r for r in pending if not captions[r]]
            if not pending:
                break
        return [captions[i * num_captions : (i + 1) * num_captions] for i in range(len(images))]

    def _sample(self, image_embs_RND: torch.Tensor, seeds: Sequence[int]) -> list[list[int]]:
        """Samples one token sequence a row (start-of-text first, end-of-text last when reached)."""
        num_rows, max_len = len(seeds), self.spec.max_len
        uniform_RTU = torch.stack(
            [torch.rand(max_len, UNIFORMS_PER_TOKEN, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(self.device)
        tokens_RL = torch.full((num_rows, 1), self.sot_id, dtype=torch.long, device=self.device)
        done_R = torch.zeros(num_rows, dtype=torch.bool, device=self.device)
        cache = CocaKVCache(self.model, image_embs_RND, max_len) if self.kv_cache else None
        cached_A = torch.arange(num_rows, device=self.device)  # the rows the cache holds, in its order
        for step in range(max_len - 1):
            length = step + 1  # tokens so far; this step writes token number length + 1
            active_A = (~done_R).nonzero().squeeze(1)
            next_R = torch.full((num_rows,), self.pad_id, dtype=torch.long, device=self.device)
            if length + 1 == max_len:
                next_R[active_A] = self.eot_id
            else:
                if cache is None:
                    logits_AV = uncached_next_token_logits(self.model, image_embs_RND[active_A], tokens_RL[active_A])
                else:
                    if len(active_A) < len(cached_A):  # rows only finish: the active rows are a subset, in order
                        cache.keep((~done_R[cached_A]).nonzero().squeeze(1))
                        cached_A = active_A
                    logits_AV = cache.step(tokens_RL[active_A, -1])
                if length < MIN_LEN:
                    logits_AV[:, self.eot_id] = -torch.inf
                next_R[active_A] = sample_top_p(
                    logits_AV, uniform_RTU[active_A, step], self.spec.top_p, self.spec.temperature
                )
            tokens_RL = torch.cat([tokens_RL, next_R.unsqueeze(1)], dim=1)
            done_R |= next_R == self.eot_id
            if bool(done_R.all()):
                break
        return tokens_RL.cpu().tolist()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
