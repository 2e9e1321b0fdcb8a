"""MobileCLIP's training loss: CLIP contrastive loss plus distillation from an ensemble of stored teachers.

The formula is the one in ``shared/MOBILECLIP.md`` ("The loss"). For a caption set C (the real captions, or one
synthetic caption per sample) and a global batch of b samples::

    S_it = s * img @ txt.T                                     student logits, b x b; S_ti = S_it.T
    P_it = mean_k softmax_row(a_k * img_k @ txt_k.T)           teacher ensemble: mean of PROBABILITIES
    P_ti = mean_k softmax_row(a_k * txt_k @ img_k.T)
    L_clip(C) = 1/2 [CE(S_it, diag) + CE(S_ti, diag)]
    L_kd(C)   = 1/2 [-sum(P_it * log_softmax(S_it)) - sum(P_ti * log_softmax(S_ti))] / b
    L(C)      = (1 - lambda) * L_clip(C) + lambda * L_kd(C)
    loss      = L(real) + L(synthetic)                         same images, same teacher image embeddings

`clip_loss`, `ensemble_targets` and `kd_loss` are the single-device building blocks; `DistillationLoss` is what
the trainer calls: it gathers across ranks, clamps the logit scale and returns the named parts.

Numerics. Everything is computed in float32 (float64 inputs stay float64) with autocast disabled: teacher scales
a_k ~ 100 turn bf16's ~0.4 % rounding of a cosine into logit errors of ~0.4, which would blur the soft targets.
Student features are expected L2-normalised (open_clip models return them so) and are used as given; teacher
embeddings are re-normalised after the upcast, which removes the fp16 storage rounding of their norms (the stored
ones are normalised, so this changes nothing else) and makes online teachers' raw outputs usable too.

Distributed training (DDP). The similarity matrices span the GLOBAL batch. Student features are gathered across
ranks with an all-gather whose backward SUMS the gradients of every rank into the local slot (a reduce-scatter;
the same as open_clip's ``gather_with_grad=True``); teacher embeddings are gathered without gradients. With no
process group, or a world of one, nothing is communicated. All ranks must pass the same local batch size B (use
``drop_last`` in the loader). Why no extra scaling is needed, for N ranks with loss L of the global batch:

- ``local_loss=False`` (default): every rank computes the full G x G matrices, so every rank's loss IS the global
  loss L, bit-for-bit the value one process gets on the whole batch (up to float summation order). The gradient
  reaching rank r's local features is the sum over the N identical losses, N * dL/dz_r; the tower parameters of
  rank r therefore get N * (rank r's share of dL/dtheta), and DDP's AVERAGE over ranks returns exactly dL/dtheta.
  The logit scale is not gathered: each rank's gradient for it is already the full dL/ds, and the average of N
  equal values is dL/ds. So DDP's averaged gradients equal single-process global-batch gradients for every
  parameter, with no multiplier (open_clip multiplies nothing either, which is right with gather_with_grad).
  Contrast: gathering WITHOUT gradients and putting the local tensor back in its slot (open_clip's default,
  ``gather_with_grad=False``) gives the local features only dL/dz_r, so after DDP's average the towers receive
  dL/dtheta / N while the logit scale receives dL/ds: a 1/N mismatch that AdamW mostly absorbs but gradient
  clipping does not. That is why this module always gathers with gradients.
- ``local_loss=True``: rank r computes only its own B rows of each matrix (B x G instead of G x G memory; needed for
  the 65k global batches of the 1B runs). Its ``loss`` is its share L_r, with mean_r L_r = L; the sum-backward
  gives its features sum_r' dL_r'/dz_r = N * dL/dz_r again, and DDP's average again yields dL/dtheta (and the mean
  of the L_r's gradients, dL/ds, for the logit scale). The logged parts are averaged over ranks (one small
  all-reduce), so they are the global values in both modes; only ``loss`` stays this rank's share.

The student logit scale s = exp(t) is clamped at ``max_logit_scale`` (100) where it is used, inside
`DistillationLoss.forward`: the value entering the logits never exceeds the bound, and the gradient w.r.t. t is
zero while exp(t) is above it. A clamped-in-forward t receives no gradient to come back down, so the trainer
should also clamp the parameter itself after each optimizer step (open_clip's ``logit_scale.clamp_(0, ln 100)``);
at exactly the bound the gradient still flows.

Shape suffixes: B local batch (this rank), G global batch (all ranks, world_size * B), R rows of the similarity
matrices this rank computes (G, or B with ``local_loss``), D embedding width, T teachers, X concatenated widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOGIT_SCALE = 100.0

# --------------------------------------------------------------------------- single-device building blocks


def clip_loss(img_BD: Tensor, txt_BD: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric contrastive loss on one device, matching pairs on the diagonal.

    Args:
        img_BD: L2-normalised image features.
        txt_BD: L2-normalised text features, row i the caption of image i.
        logit_scale: The effective inverse temperature s (already exponentiated and clamped).

    Returns:
        1/2 [CE(S_it, diag) + CE(S_ti, diag)], a scalar.
    """
    logits_it_BB = logit_scale * img_BD @ txt_BD.T
    logp_it_BB, logp_ti_BB = _log_probs(logits_it_BB, logits_it_BB.T)
    return _clip_from_log_probs(logp_it_BB, logp_ti_BB, row_offset=0)


def ensemble_targets(
    teacher_img: Sequence[Tensor], teacher_txt: Sequence[Tensor], teacher_scales: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """The teachers' ensemble distributions, the distillation targets of one caption set.

    Args:
        teacher_img: Per teacher, (B, D_k) L2-normalised image embeddings.
        teacher_txt: Per teacher, (B, D_k) L2-normalised text embeddings, row i the caption of image i.
        teacher_scales: Per teacher, its inverse temperature a_k.

    Returns:
        ``(P_it_BB, P_ti_BB)``: the mean over teachers of the row-softmax of ``a_k * img_k @ txt_k.T`` and of
        ``a_k * txt_k @ img_k.T``, in float32 at least; each row sums to 1. No gradient flows into the teachers.
    """
    _check_teachers(teacher_img, teacher_txt, teacher_scales)
    img = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in teacher_img]
    txt = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in teacher_txt]
    return _ensemble_probs(img, txt, img, txt, teacher_scales, square=True)


def kd_loss(logits_it_BB: Tensor, logits_ti_BB: Tensor, probs_it_BB: Tensor, probs_ti_BB: Tensor) -> Tensor:
    """Cross-entropy of the student's distributions to the teachers' (KL(teacher || student) + const).

    Args:
        logits_it_BB: Student image-to-text logits S_it (rows: images).
        logits_ti_BB: Student text-to-image logits S_ti (rows: texts).
        probs_it_BB: Target distributions P_it, rows summing to 1 (`ensemble_targets`).
        probs_ti_BB: Target distributions P_ti.

    Returns:
        1/2 [-sum(P_it * log_softmax(S_it)) - sum(P_ti * log_softmax(S_ti))] / B, a scalar.
    """
    logp_it_BB, logp_ti_BB = _log_probs(logits_it_BB, logits_ti_BB)
    return _kd_from_log_probs(logp_it_BB, logp_ti_BB, probs_it_BB, probs_ti_BB)


def _log_probs(logits_it_RG: Tensor, logits_ti_RG: Tensor) -> tuple[Tensor, Tensor]:
    return F.log_softmax(logits_it_RG, dim=1), F.log_softmax(logits_ti_RG, dim=1)


def _clip_from_log_probs(logp_it_RG: Tensor, logp_ti_RG: Tensor, row_offset: int) -> Tensor:
    # Row i of this rank's block is global sample row_offset + i: its matching column.
    rows_R = torch.arange(logp_it_RG.shape[0], device=logp_it_RG.device)
    cols_R = rows_R + row_offset
    return -0.5 * (logp_it_RG[rows_R, cols_R].mean() + logp_ti_RG[rows_R, cols_R].mean())


def _kd_from_log_probs(logp_it_RG: Tensor, logp_ti_RG: Tensor, probs_it_RG: Tensor, probs_ti_RG: Tensor) -> Tensor:
    num_rows = logp_it_RG.shape[0]
    return -0.5 * ((probs_it_RG * logp_it_RG).sum() + (probs_ti_RG * logp_ti_RG).sum()) / num_rows


@torch.no_grad()
def _ensemble_probs(
    img_rows: Sequence[Tensor],
    txt_rows: Sequence[Tensor],
    img_cols: Sequence[Tensor],
    txt_cols: Sequence[Tensor],
    scales: Sequence[float],
    square: bool,
) -> tuple[Tensor, Tensor]:
    """Ensemble targets for R rows against G columns; ``square`` (rows are the columns) reuses one matmul."""
    probs_it_RG = probs_ti_RG = None
    for img_RD, txt_RD, img_GD, txt_GD, scale in zip(img_rows, txt_rows, img_cols, txt_cols, scales, strict=True):
        logits_it_RG = scale * img_RD @ txt_GD.T
        logits_ti_RG = logits_it_RG.T if square else scale * txt_RD @ img_GD.T
        p_it_RG, p_ti_RG = torch.softmax(logits_it_RG, dim=1), torch.softmax(logits_ti_RG, dim=1)
        if probs_it_RG is None:
            probs_it_RG, probs_ti_RG = p_it_RG, p_ti_RG
        else:
            probs_it_RG += p_it_RG
            probs_ti_RG += p_ti_RG
    assert probs_it_RG is not None and probs_ti_RG is not None
    num_teachers = len(scales)
    return probs_it_RG / num_teachers, probs_ti_RG / num_teachers


def _check_teachers(img: Sequence[Tensor], txt: Sequence[Tensor], scales: Sequence[float]) -> None:
    if not scales:
        raise ValueError("the teacher ensemble needs at least one teacher")
    if not len(img) == len(txt) == len(scales):
        raise ValueError(
            f"got {len(img)} teacher image, {len(txt)} teacher text embeddings and {len(scales)} teacher scales; "
            "expected one of each per teacher"
        )


# --------------------------------------------------------------------------- gathering across ranks


def _world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group; ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenates every rank's (B, X) tensor to (G, X); backward sums all ranks' gradients into the local slot.

    Every rank's loss depends on every slot, so the gradient of the local tensor is the sum over ranks of the
    gradients w.r.t. its slot: a reduce-scatter with SUM (see the module docstring for why DDP then needs no
    rescaling).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x_BX: Tensor) -> Tensor:
        world_size, _ = _world()
        x_BX = x_BX.contiguous()
        out_GX = x_BX.new_empty((world_size * x_BX.shape[0], *x_BX.shape[1:]))
        dist.all_gather_single(out_GX, x_BX)
        return out_GX

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_GX: Tensor) -> Tensor:
        world_size, _ = _world()
        grad_BX = grad_GX.new_empty((grad_GX.shape[0] // world_size, *grad_GX.shape[1:]))
        dist.reduce_scatter_single(grad_BX, grad_GX.contiguous(), op=dist.ReduceOp.SUM)
        return grad_BX


def _gather(x_BX: Tensor, with_grad: bool) -> Tensor:
    if _world()[0] == 1:
        return x_BX
    if with_grad:
        return _AllGatherWithGrad.apply(x_BX)
    x_BX = x_BX.detach().contiguous()
    out_GX = x_BX.new_empty((_world()[0] * x_BX.shape[0], *x_BX.shape[1:]))
    dist.all_gather_single(out_GX, x_BX)
    return out_GX


def _gather_concat(parts_BD: Sequence[Tensor], with_grad: bool) -> list[Tensor]:
    """Gathers several (B, D_i) tensors in one collective (concatenated along the width), split back to (G, D_i)."""
    if _world()[0] == 1:
        return [x if with_grad else x.detach() for x in parts_BD]
    widths = [x.shape[1] for x in parts_BD]
    return list(_gather(torch.cat(list(parts_BD), dim=1), with_grad).split(widths, dim=1))


# --------------------------------------------------------------------------- the trainer's loss


class DistillationLoss(nn.Module):
    """The multi-modal reinforced training loss, for real and optionally synthetic captions, over the global batch.

    Modes: ``kd_weight=1`` is MobileCLIP's distillation-only recipe, ``0 < kd_weight < 1`` mixes in the CLIP loss,
    ``kd_weight=0`` is plain CLIP (teacher inputs may then be omitted). Synthetic captions are an explicit switch:
    with ``use_syn_captions`` the forward needs one synthetic caption's features per sample and adds its loss.

    Args:
        kd_weight: lambda, the weight of the distillation loss, in [0, 1].
        teacher_scales: Per teacher, its inverse temperature a_k (e.g. 100, 100 for DataCompDR's teachers, 70, 60
            for MobileCLIP2's); the teacher inputs of `forward` come in this order.
        use_syn_captions: Whether the loss of the synthetic captions is added to that of the real ones.
        max_logit_scale: Bound of the student's effective logit scale s.
        local_loss: With more than one rank, each rank computes only its own rows of the similarity matrices
            (B x G memory instead of G x G); its ``loss`` is then its share of the global loss (see the module
            docstring). A world of one computes the full matrices either way.
    """

    def __init__(
        self,
        kd_weight: float = 0.0,
        teacher_scales: Sequence[float] = (),
        *,
        use_syn_captions: bool = False,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight (lambda) must be in [0, 1], got {kd_weight!r}")
        if kd_weight > 0 and not teacher_scales:
            raise ValueError(f"kd_weight={kd_weight} distils from teachers: give teacher_scales, one per teacher")
        if any(not a > 0 for a in teacher_scales):
            raise ValueError(f"teacher scales must be > 0, got {list(teacher_scales)!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        self.kd_weight = float(kd_weight)
        self.teacher_scales = tuple(float(a) for a in teacher_scales)
        self.use_syn_captions = use_syn_captions
        self.max_logit_scale = float(max_logit_scale)
        self.local_loss = local_loss

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, teacher_scales={self.teacher_scales}, "
            f"use_syn_captions={self.use_syn_captions}, max_logit_scale={self.max_logit_scale}, "
            f"local_loss={self.local_loss}"
        )

    def forward(
        self,
        img_BD: Tensor,
        txt_BD: Tensor,
        logit_scale: Tensor | float,
        syn_txt_BD: Tensor | None = None,
        teacher_img: Sequence[Tensor] | None = None,
        teacher_txt: Sequence[Tensor] | None = None,
        teacher_syn_txt: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Computes the loss of this rank's local batch against the global batch.

        Args:
            img_BD: Student image features, L2-normalised.
            txt_BD: Student features of the real captions, L2-normalised.
            logit_scale: The student's s = exp(t) (a one-element tensor, or a number); clamped at
                ``max_logit_scale`` here.
            syn_txt_BD: Student features of one synthetic caption per sample; required with
                ``use_syn_captions``, refused without it.
            teacher_img: Per teacher, (B, D_k) image embeddings of the same views (stored fp16 is fine).
            teacher_txt: Per teacher, (B, D_k) embeddings of the real captions.
            teacher_syn_txt: Per teacher, (B, D_k) embeddings of the same synthetic captions as ``syn_txt_BD``.

        Returns:
            ``loss`` (the total, for backward), and detached for logging ``clip_loss_real``, ``clip_loss``, and when
            synthetic captions are used ``clip_loss_syn``; when teacher inputs are given (always with
            ``kd_weight > 0``; optional, for monitoring, with ``kd_weight=0``) also ``kd_loss_real``, ``kd_loss``
            and ``kd_loss_syn``. ``clip_loss`` and ``kd_loss`` sum the real and synthetic parts (unweighted).

        Raises:
            ValueError: If the inputs do not fit the configuration (missing synthetic or teacher inputs, a wrong
                number of teachers, mismatched batch sizes).
        """
        with_teachers = self._check_inputs(img_BD, txt_BD, syn_txt_BD, teacher_img, teacher_txt, teacher_syn_txt)
        caption_sets = ["real", "syn"] if self.use_syn_captions else ["real"]
        world_size = _world()[0]
        local = self.local_loss and world_size > 1  # one rank's rows are the whole matrix: compute it square
        dtype = torch.promote_types(img_BD.dtype, torch.float32)

        with torch.autocast(img_BD.device.type, enabled=False):
            # The clamp bounds the value used in the logits; no gradient reaches t while exp(t) is above the bound.
            scale = torch.as_tensor(logit_scale, dtype=dtype, device=img_BD.device)
            scale = scale.reshape(()).clamp(max=self.max_logit_scale)

            # Student features: rows (local batch, or global) and columns (global batch), gradients flowing back.
            student_B = [img_BD, txt_BD] + ([syn_txt_BD] if self.use_syn_captions else [])
            student_B = [x.to(dtype) for x in student_B]
            student_G = _gather_concat(student_B, with_grad=True)
            student_R = student_B if local else student_G
            img_RD, img_GD = student_R[0], student_G[0]
            txt_R = dict(zip(caption_sets, student_R[1:], strict=True))
            txt_G = dict(zip(caption_sets, student_G[1:], strict=True))

            # Teacher embeddings (no gradients): per caption set, per teacher, (G, D_k).
            t_img_G: list[Tensor] = []
            t_txt_G: dict[str, list[Tensor]] = {}
            if with_teachers:
                assert teacher_img is not None and teacher_txt is not None
                teacher_sets = [teacher_img, teacher_txt, *([teacher_syn_txt] if self.use_syn_captions else [])]
                t_img_G, *t_txt_sets_G = _gather_teachers(teacher_sets, dtype)
                t_txt_G = dict(zip(caption_sets, t_txt_sets_G, strict=True))

            parts: dict[str, Tensor] = {}
            loss = img_BD.new_zeros((), dtype=dtype)
            for caption_set in caption_sets:
                clip, kd = self._caption_set_losses(
                    scale,
                    img_RD,
                    txt_R[caption_set],
                    img_GD,
                    txt_G[caption_set],
                    t_img_G,
                    t_txt_G.get(caption_set),
                    local,
                )
                parts[f"clip_loss_{caption_set}"] = clip
                if kd is not None:
                    parts[f"kd_loss_{caption_set}"] = kd
                # Zero-weight terms stay out of the graph (and cannot turn the loss NaN).
                if self.kd_weight < 1.0:
                    loss = loss + (1.0 - self.kd_weight) * clip
                if self.kd_weight > 0.0:
                    assert kd is not None
                    loss = loss + self.kd_weight * kd

        parts["clip_loss"] = sum(parts[f"clip_loss_{c}"] for c in caption_sets)
        if with_teachers:
            parts["kd_loss"] = sum(parts[f"kd_loss_{c}"] for c in caption_sets)
        logged = {name: value.detach() for name, value in parts.items()}
        if local:
            logged = _mean_over_ranks(logged)
        return {"loss": loss, **logged}

    def _caption_set_losses(
        self,
        scale: Tensor,
        img_RD: Tensor,
        txt_RD: Tensor,
        img_GD: Tensor,
        txt_GD: Tensor,
        t_img_G: Sequence[Tensor],
        t_txt_G: Sequence[Tensor] | None,
        local: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``(L_clip, L_kd)`` of one caption set over this rank's rows (its own with ``local``, all otherwise);
        L_kd is None without teachers."""
        # Row i of this rank's block is global sample row_offset + i.
        row_offset = _world()[1] * img_RD.shape[0] if local else 0
        if local:
            logits_it_RG = scale * img_RD @ txt_GD.T
            logits_ti_RG = scale * txt_RD @ img_GD.T
        else:
            logits_it_RG = scale * img_GD @ txt_GD.T
            logits_ti_RG = logits_it_RG.T
        logp_it_RG, logp_ti_RG = _log_probs(logits_it_RG, logits_ti_RG)
        clip = _clip_from_log_probs(logp_it_RG, logp_ti_RG, row_offset)
        if t_txt_G is None:
            return clip, None
        rows = slice(row_offset, row_offset + logp_it_RG.shape[0])
        probs_it_RG, probs_ti_RG = _ensemble_probs(
            [x[rows] for x in t_img_G],
            [x[rows] for x in t_txt_G],
            t_img_G,
            t_txt_G,
            self.teacher_scales,
            square=not local,
        )
        return clip, _kd_from_log_probs(logp_it_RG, logp_ti_RG, probs_it_RG, probs_ti_RG)

    def _check_inputs(
        self,
        img_BD: Tensor,
        txt_BD: Tensor,
        syn_txt_BD: Tensor | None,
        teacher_img: Sequence[Tensor] | None,
        teacher_txt: Sequence[Tensor] | None,
        teacher_syn_txt: Sequence[Tensor] | None,
    ) -> bool:
        """Validates the inputs against the configuration; returns whether the distillation parts are computed."""
        if self.use_syn_captions and syn_txt_BD is None:
            raise ValueError("use_syn_captions=True needs syn_txt_BD, the features of one synthetic caption a sample")
        if not self.use_syn_captions and syn_txt_BD is not None:
            raise ValueError("syn_txt_BD given but use_syn_captions=False: enable it or stop encoding them")
        with_teachers = teacher_img is not None or teacher_txt is not None
        if self.kd_weight > 0 and not with_teachers:
            raise ValueError(f"kd_weight={self.kd_weight} needs teacher_img and teacher_txt")
        if with_teachers:
            if teacher_img is None or teacher_txt is None:
                raise ValueError("teacher_img and teacher_txt go together")
            if not self.teacher_scales:
                raise ValueError("teacher embeddings given but no teacher_scales configured")
            _check_teachers(teacher_img, teacher_txt, self.teacher_scales)
            if self.use_syn_captions:
                if teacher_syn_txt is None:
                    raise ValueError("use_syn_captions=True with teachers needs teacher_syn_txt")
                _check_teachers(teacher_img, teacher_syn_txt, self.teacher_scales)
        batch = [img_BD, txt_BD, *([syn_txt_BD] if self.use_syn_captions else [])]
        if with_teachers:
            batch += [*teacher_img, *teacher_txt, *(teacher_syn_txt if self.use_syn_captions else [])]
        if any(x.ndim != 2 or x.shape[0] != img_BD.shape[0] for x in batch):
            raise ValueError(
                f"every input must be (B, D) with B = {img_BD.shape[0]}, got {[tuple(x.shape) for x in batch]}"
            )
        return with_teachers


def _gather_teachers(teacher_sets: Sequence[Sequence[Tensor]], dtype: torch.dtype) -> list[list[Tensor]]:
    """Gathers every teacher embedding of every set in one no-grad collective, in their stored dtype (fp16 on the
    wire), then upcasts to ``dtype`` and re-normalises."""
    flat_B = [x.detach() for tensors in teacher_sets for x in tensors]
    wire_dtype = _common_dtype(flat_B)
    flat_G = [F.normalize(x.to(dtype), dim=1) for x in _gather_concat([x.to(wire_dtype) for x in flat_B], False)]
    sizes = [len(tensors) for tensors in teacher_sets]
    return [flat_G[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _mean_over_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Averages scalar logging values over ranks in one all-reduce (SUM, as gloo has no AVG)."""
    stacked = torch.stack(list(values.values()))
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values, (stacked / _world()[0]).unbind(), strict=True))
