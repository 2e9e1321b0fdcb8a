"""The MobileCLIP loss: against a hand-written float64 reference (values and gradients), its properties, and DDP
equivalence (2 gloo processes x half a batch == 1 process x the whole batch, loss and gradients).

Shape suffixes: B batch, G global batch, D width.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from clipdr import losses
from clipdr.losses import DistillationLoss, clip_loss, ensemble_targets, kd_loss

B, D = 6, 4
TEACHER_DIMS = (5, 7)  # differ from each other and from the student's D, so a mix-up cannot pass
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 end to end


def unit(*shape: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def make_batch(num_teachers: int, seed: int = 0, batch: int = B) -> dict:
    """Student features (leaves, for gradients), log logit scale t, and teacher embeddings, all float64."""
    g = torch.Generator().manual_seed(seed)
    student = {name: unit(batch, D, generator=g).requires_grad_() for name in ("img", "txt", "syn")}
    dims = TEACHER_DIMS[:num_teachers]
    return {
        **student,
        "t": torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True),
        "t_img": [unit(batch, d, generator=g) for d in dims],
        "t_txt": [unit(batch, d, generator=g) for d in dims],
        "t_syn": [unit(batch, d, generator=g) for d in dims],
    }


# --------------------------------------------------------------------------- the reference


def ref_log_softmax(logits: list[Tensor]) -> list[Tensor]:
    top = max(x.detach() for x in logits)
    log_norm = top + torch.log(sum(torch.exp(x - top) for x in logits))
    return [x - log_norm for x in logits]


def ref_teacher_probs(rows: list[Tensor], cols: list[Tensor], scales: list[float]) -> list[list[float]]:
    """P[i][j] = mean_k softmax_j(a_k <rows_k[i], cols_k[j]>), by explicit loops."""
    n = rows[0].shape[0]
    probs = [[0.0] * n for _ in range(n)]
    for rows_k, cols_k, a in zip(rows, cols, scales, strict=True):
        for i in range(n):
            logits = [a * float(rows_k[i] @ cols_k[j]) for j in range(n)]
            top = max(logits)
            norm = sum(math.exp(x - top) for x in logits)
            for j in range(n):
                probs[i][j] += math.exp(logits[j] - top) / norm / len(scales)
    return probs


def ref_caption_loss(img, txt, s, t_img, t_txt, scales) -> tuple[Tensor, Tensor | None]:
    """L_clip and L_kd of one caption set, element by element (MOBILECLIP.md, "The loss")."""
    n = img.shape[0]
    logp_it = [ref_log_softmax([s * (img[i] @ txt[j]) for j in range(n)]) for i in range(n)]
    logp_ti = [ref_log_softmax([s * (txt[i] @ img[j]) for j in range(n)]) for i in range(n)]
    clip = 0.5 * (-sum(logp_it[i][i] for i in range(n)) / n - sum(logp_ti[i][i] for i in range(n)) / n)
    if t_img is None:
        return clip, None
    p_it = ref_teacher_probs(t_img, t_txt, scales)
    p_ti = ref_teacher_probs(t_txt, t_img, scales)
    cross = sum(p_it[i][j] * logp_it[i][j] + p_ti[i][j] * logp_ti[i][j] for i in range(n) for j in range(n))
    return clip, -0.5 * cross / n


def ref_loss(batch: dict, kd_weight: float, scales: list[float], syn: bool, teachers: bool = True) -> dict:
    s = torch.clamp(torch.exp(batch["t"]), max=100.0)
    sets = {"real": (batch["txt"], batch["t_txt"])} | ({"syn": (batch["syn"], batch["t_syn"])} if syn else {})
    parts, total = {}, 0.0
    for name, (txt, t_txt) in sets.items():
        clip, kd = ref_caption_loss(batch["img"], txt, s, batch["t_img"] if teachers else None, t_txt, scales)
        parts[f"clip_loss_{name}"] = clip
        total = total + (1 - kd_weight) * clip
        if kd is not None:
            parts[f"kd_loss_{name}"] = kd
            total = total + kd_weight * kd
    parts["clip_loss"] = sum(parts[f"clip_loss_{name}"] for name in sets)
    if teachers:
        parts["kd_loss"] = sum(parts[f"kd_loss_{name}"] for name in sets)
    return {"loss": total, **parts}


def run_loss(loss_fn: DistillationLoss, batch: dict, syn: bool, teachers: bool = True) -> dict[str, Tensor]:
    return loss_fn(
        batch["img"],
        batch["txt"],
        batch["t"].exp(),
        syn_txt_BD=batch["syn"] if syn else None,
        teacher_img=batch["t_img"] if teachers else None,
        teacher_txt=batch["t_txt"] if teachers else None,
        teacher_syn_txt=batch["t_syn"] if teachers and syn else None,
    )


def grads(loss: Tensor, batch: dict, syn: bool) -> list[Tensor]:
    inputs = [batch["img"], batch["txt"], batch["t"], *([batch["syn"]] if syn else [])]
    return list(torch.autograd.grad(loss, inputs))


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("syn", [False, True], ids=["real", "real+syn"])
@pytest.mark.parametrize("scales", [[100.0], [70.0, 60.0]], ids=["1teacher", "2teachers"])
@pytest.mark.parametrize("kd_weight", [0.0, 0.5, 0.75, 1.0])
def test_matches_reference(kd_weight: float, scales: list[float], syn: bool, local_loss: bool) -> None:
    batch = make_batch(len(scales), seed=len(scales) + 10 * syn)
    loss_fn = DistillationLoss(kd_weight, scales, use_syn_captions=syn, local_loss=local_loss)
    got = run_loss(loss_fn, batch, syn)
    want = ref_loss(batch, kd_weight, scales, syn)

    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name].detach(), **TOL, msg=name)
    assert got["loss"].requires_grad and not any(v.requires_grad for k, v in got.items() if k != "loss")
    for g_got, g_want in zip(grads(got["loss"], batch, syn), grads(want["loss"], batch, syn), strict=True):
        torch.testing.assert_close(g_got, g_want, **TOL)


def test_ensemble_targets_match_reference() -> None:
    batch = make_batch(2)
    scales = [70.0, 60.0]
    probs_it, probs_ti = ensemble_targets(batch["t_img"], batch["t_txt"], scales)
    want_it = torch.tensor(ref_teacher_probs(batch["t_img"], batch["t_txt"], scales), dtype=torch.float64)
    want_ti = torch.tensor(ref_teacher_probs(batch["t_txt"], batch["t_img"], scales), dtype=torch.float64)
    torch.testing.assert_close(probs_it, want_it, **TOL)
    torch.testing.assert_close(probs_ti, want_ti, **TOL)
    torch.testing.assert_close(probs_it.sum(1), torch.ones(B, dtype=torch.float64))
    # The mean of probabilities, not the softmax of the mean of logits.
    mean_logits = sum(a * i @ t.T for a, i, t in zip(scales, batch["t_img"], batch["t_txt"], strict=True)) / 2
    assert not torch.allclose(probs_it, torch.softmax(mean_logits, dim=1), atol=1e-3)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("syn", [False, True], ids=["real", "real+syn"])
def test_plain_clip_mode_is_the_clip_loss(syn: bool) -> None:
    batch = make_batch(1)
    got = run_loss(DistillationLoss(0.0, use_syn_captions=syn), batch, syn, teachers=False)
    assert set(got) == {"loss", "clip_loss_real", "clip_loss"} | ({"clip_loss_syn"} if syn else set())
    s = batch["t"].exp()
    want = clip_loss(batch["img"], batch["txt"], s) + (clip_loss(batch["img"], batch["syn"], s) if syn else 0)
    torch.testing.assert_close(got["loss"], want, **TOL)
    # ... which is open_clip's formulation: cross-entropy both ways against the diagonal.
    logits = s * batch["img"] @ batch["txt"].T
    labels = torch.arange(B)
    open_clip_style = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_loss(batch["img"], batch["txt"], s), open_clip_style, **TOL)


def test_kd_loss_is_minimal_where_the_student_matches_the_teachers() -> None:
    batch = make_batch(2)
    probs_it, probs_ti = ensemble_targets(batch["t_img"], batch["t_txt"], [70.0, 60.0])
    # A student whose row-softmax is the ensemble (logits = log P + any per-row constant).
    logits_it = (probs_it.log() + 3.0).requires_grad_()
    logits_ti = probs_ti.log().requires_grad_()
    best = kd_loss(logits_it, logits_ti, probs_it, probs_ti)
    entropy = -0.5 * ((probs_it * probs_it.log()).sum() + (probs_ti * probs_ti.log()).sum()) / B
    torch.testing.assert_close(best, entropy, **TOL)  # KL(teacher || student) = 0
    for g in torch.autograd.grad(best, [logits_it, logits_ti]):
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        noise_it, noise_ti = (0.3 * torch.randn(B, B, generator=gen, dtype=torch.float64) for _ in range(2))
        assert kd_loss(logits_it + noise_it, logits_ti + noise_ti, probs_it, probs_ti) > best


def test_two_identical_teachers_equal_one() -> None:
    batch = make_batch(1)
    one = ensemble_targets(batch["t_img"], batch["t_txt"], [100.0])
    two = ensemble_targets(batch["t_img"] * 2, batch["t_txt"] * 2, [100.0, 100.0])
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    twin = {**batch, "t_img": batch["t_img"] * 2, "t_txt": batch["t_txt"] * 2, "t_syn": batch["t_syn"] * 2}
    got_one = run_loss(DistillationLoss(1.0, [100.0], use_syn_captions=True), batch, syn=True)
    got_two = run_loss(DistillationLoss(1.0, [100.0, 100.0], use_syn_captions=True), twin, syn=True)
    for name in got_one:
        torch.testing.assert_close(got_one[name], got_two[name], **TOL)


def test_logit_scale_is_clamped_where_used() -> None:
    batch = make_batch(1)
    loss_fn = DistillationLoss(0.5, [100.0])

    def loss_and_grad(scale: float) -> tuple[Tensor, Tensor]:
        t = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
        loss = run_loss(loss_fn, {**batch, "t": t}, syn=False)["loss"]
        return loss.detach(), torch.autograd.grad(loss, t)[0]

    at_bound = run_loss(loss_fn, {**batch, "t": torch.tensor(math.log(100.0), dtype=torch.float64)}, syn=False)
    above, grad_above = loss_and_grad(150.0)
    torch.testing.assert_close(above, at_bound["loss"].detach(), **TOL)  # used value is 100
    assert grad_above == 0.0
    below, grad_below = loss_and_grad(50.0)
    assert grad_below != 0.0 and not torch.allclose(below, above)
    lower_bound = DistillationLoss(0.5, [100.0], max_logit_scale=50.0)
    t_above = torch.tensor(math.log(150.0), dtype=torch.float64)
    torch.testing.assert_close(run_loss(lower_bound, {**batch, "t": t_above}, syn=False)["loss"], below, **TOL)


def test_teacher_embeddings_may_be_fp16_and_are_renormalised() -> None:
    batch = make_batch(2)
    loss_fn = DistillationLoss(1.0, [70.0, 60.0])
    half = {**batch, "t_img": [x.half() for x in batch["t_img"]], "t_txt": [x.half() for x in batch["t_txt"]]}
    upcast = {
        **batch,
        "t_img": [F.normalize(x.double(), dim=1) for x in half["t_img"]],
        "t_txt": [F.normalize(x.double(), dim=1) for x in half["t_txt"]],
    }
    torch.testing.assert_close(run_loss(loss_fn, half, False)["loss"], run_loss(loss_fn, upcast, False)["loss"], **TOL)
    scaled = {**batch, "t_img": [3 * x for x in batch["t_img"]], "t_txt": [0.5 * x for x in batch["t_txt"]]}
    torch.testing.assert_close(run_loss(loss_fn, scaled, False)["loss"], run_loss(loss_fn, batch, False)["loss"])


def test_float32_under_bf16_autocast() -> None:
    batch = {
        k: ([x.float() for x in v] if isinstance(v, list) else v.detach().float()) for k, v in make_batch(2).items()
    }
    loss_fn = DistillationLoss(0.75, [70.0, 60.0], use_syn_captions=True)
    plain = run_loss(loss_fn, batch, syn=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run_loss(loss_fn, batch, syn=True)
    for name in plain:
        assert autocast[name].dtype == torch.float32
        torch.testing.assert_close(autocast[name], plain[name], rtol=1e-6, atol=1e-6)


def test_kd_parts_are_logged_in_plain_clip_mode_when_teachers_are_given() -> None:
    batch = make_batch(1)
    got = run_loss(DistillationLoss(0.0, [100.0]), batch, syn=False)
    torch.testing.assert_close(got["loss"], got["clip_loss"], **TOL)
    want = ref_loss(batch, 0.0, [100.0], syn=False)
    torch.testing.assert_close(got["kd_loss"], want["kd_loss"].detach(), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "inputs", "match"),
    [
        ({"kd_weight": 1.5, "teacher_scales": [100.0]}, {}, "in \\[0, 1\\]"),
        ({"kd_weight": 0.5}, {}, "give teacher_scales"),
        ({"kd_weight": 0.5, "teacher_scales": [100.0, 0.0]}, {}, "must be > 0"),
        ({"kd_weight": 0.5, "teacher_scales": [100.0]}, {"teachers": False}, "needs teacher_img"),
        ({"kd_weight": 0.5, "teacher_scales": [100.0, 100.0]}, {}, "one of each per teacher"),
        ({"kd_weight": 0.0, "use_syn_captions": True}, {"teachers": False}, "needs syn_txt_BD"),
        ({"kd_weight": 0.0}, {"syn": True, "teachers": False}, "use_syn_captions=False"),
    ],
)
def test_invalid_use_raises(kwargs: dict, inputs: dict, match: str) -> None:
    batch = make_batch(1)
    with pytest.raises(ValueError, match=match):
        loss_fn = DistillationLoss(**kwargs)
        loss_fn(
            batch["img"],
            batch["txt"],
            batch["t"].exp(),
            syn_txt_BD=batch["syn"] if inputs.get("syn") else None,
            teacher_img=batch["t_img"] if inputs.get("teachers", True) else None,
            teacher_txt=batch["t_txt"] if inputs.get("teachers", True) else None,
        )


def test_batch_size_mismatch_raises() -> None:
    batch = make_batch(1)
    with pytest.raises(ValueError, match="B = 6"):
        DistillationLoss(1.0, [100.0])(batch["img"], batch["txt"], 10.0, None, [batch["t_img"][0][:5]], batch["t_txt"])


# --------------------------------------------------------------------------- DDP equivalence

WORLD_SIZE, LOCAL_B = 2, 4
DDP_CASES = {  # name: (kd_weight, teacher scales, synthetic captions, local_loss)
    "plain_clip": (0.0, [], False, False),
    "reinforced": (0.75, [70.0, 60.0], True, False),
    "reinforced_local_loss": (1.0, [70.0, 60.0], True, True),
}


class TinyClip(nn.Module):
    """Linear towers and a learnable logit scale: enough parameters to check DDP's gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, D, dtype=torch.float64)
        self.text = nn.Linear(5, D, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor, syn_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        img, txt, syn = F.normalize(self.image(pixels), dim=1), self.text(tokens), self.text(syn_tokens)
        return img, F.normalize(txt, dim=1), F.normalize(syn, dim=1), self.logit_scale.exp()


def ddp_case_data() -> dict:
    """The global batch: tower inputs and fp16 teacher embeddings (as stored)."""
    g = torch.Generator().manual_seed(7)
    num = WORLD_SIZE * LOCAL_B
    return {
        "pixels": torch.randn(num, 6, generator=g, dtype=torch.float64),
        "tokens": torch.randn(num, 5, generator=g, dtype=torch.float64),
        "syn_tokens": torch.randn(num, 5, generator=g, dtype=torch.float64),
        **{key: [unit(num, d, generator=g).half() for d in TEACHER_DIMS] for key in ("t_img", "t_txt", "t_syn")},
    }


def ddp_step(model: nn.Module, case: str, rows: slice) -> dict:
    """One forward + backward on ``rows`` of the global batch: loss parts, feature and parameter gradients."""
    kd_weight, scales, syn, local_loss = DDP_CASES[case]
    data = ddp_case_data()
    img, txt, syn_txt, scale = model(data["pixels"][rows], data["tokens"][rows], data["syn_tokens"][rows])
    for x in (img, txt, syn_txt):
        x.retain_grad()
    teachers = {key: [x[rows] for x in data[key]] for key in ("t_img", "t_txt", "t_syn")} if scales else {}
    out = DistillationLoss(kd_weight, scales, use_syn_captions=syn, local_loss=local_loss)(
        img,
        txt,
        scale,
        syn_txt_BD=syn_txt if syn else None,
        teacher_img=teachers.get("t_img"),
        teacher_txt=teachers.get("t_txt"),
        teacher_syn_txt=teachers.get("t_syn") if syn else None,
    )
    out["loss"].backward()
    return {
        "parts": {name: value.detach() for name, value in out.items()},
        "feature_grads": [x.grad for x in (img, txt, *([syn_txt] if syn else []))],
        "param_grads": {name.removeprefix("module."): p.grad.clone() for name, p in model.named_parameters()},
    }


def ddp_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for case in DDP_CASES:
            model = DistributedDataParallel(TinyClip())  # averages gradients over ranks, as in training
            results[case] = ddp_step(model, case, slice(rank * LOCAL_B, (rank + 1) * LOCAL_B))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_two_ranks_equal_one_rank_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for case, (_, _, _, local_loss) in DDP_CASES.items():
        single = ddp_step(TinyClip(), case, slice(None))  # one process, the whole global batch
        per_rank = [r[case] for r in ranks]

        # Loss value: every rank computes the global loss; with local_loss the ranks' shares average to it.
        rank_losses = torch.stack([r["parts"]["loss"] for r in per_rank])
        if local_loss:
            torch.testing.assert_close(rank_losses.mean(), single["parts"]["loss"], **TOL)
        else:
            for rank_loss in rank_losses:
                torch.testing.assert_close(rank_loss, single["parts"]["loss"], **TOL)
        # Logged parts are the global values on every rank, in both modes.
        for r in per_rank:
            assert set(r["parts"]) == set(single["parts"])
            for name in single["parts"]:
                if name != "loss":
                    torch.testing.assert_close(r["parts"][name], single["parts"][name], **TOL, msg=name)

        # Feature gradients: the gather's backward sums over ranks, so each rank holds WORLD_SIZE x its slice of
        # the global gradient...
        for rank, r in enumerate(per_rank):
            rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            for got, want in zip(r["feature_grads"], single["feature_grads"], strict=True):
                torch.testing.assert_close(got, WORLD_SIZE * want[rows], **TOL)
        # ... and DDP's average over ranks turns that into exactly the single-process gradient, for the towers
        # and the logit scale alike: no rescaling anywhere.
        for r in per_rank:
            for name, want in single["param_grads"].items():
                torch.testing.assert_close(r["param_grads"][name], want, **TOL, msg=name)


def test_no_process_group_means_no_communication(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("communicated without a process group")

    for name in ("all_gather_single", "reduce_scatter_single", "all_reduce"):
        monkeypatch.setattr(losses.dist, name, refuse)
    batch = make_batch(2)
    run_loss(DistillationLoss(0.5, [70.0, 60.0], use_syn_captions=True, local_loss=True), batch, True)[
        "loss"
    ].backward()
