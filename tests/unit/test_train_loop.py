"""The training step without Ray: schedule, weight-decay groups, and DDP equivalence of whole optimiser steps."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from clipdr import models, records
from clipdr.config import Config, TrainConfig, TrainLoss, TrainOptimizer, TrainSchedule, replace
from clipdr.train import data
from clipdr.train.loop import Step, apply_update, build_student, lr_at, make_optimizer, param_groups
from clipdr.train.plan import TrainPlan, make_plan

STUDENT = "clipdr-tiny-vit"
WORLD_SIZE, GLOBAL_B, STEPS, ACCUM = 2, 8, 3, 2
TEACHER = {
    "name": "t",
    "model": "clipdr-tiny-vit",
    "pretrained": "",
    "embed_dim": 64,
    "logit_scale": 100.0,
    "image_size": 32,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bicubic",
}


def a_plan(changes: dict[str, object] | None = None) -> TrainPlan:
    """A plan of 10 optimiser steps (2 of warmup) of ``GLOBAL_B`` x ``ACCUM`` samples; ``changes`` to [train]
    (dotted keys: ``{"schedule.accum_steps": 1}``)."""
    tc = TrainConfig(
        data="unit",
        model=STUDENT,
        precision="fp32",
        schedule=TrainSchedule(
            samples=10 * GLOBAL_B * ACCUM,
            batch_size=GLOBAL_B,
            accum_steps=ACCUM,
            warmup_samples=2 * GLOBAL_B * ACCUM,
            min_lr=1e-4,
        ),
        optimizer=TrainOptimizer(lr=1e-2, grad_clip=0.5),
        loss=TrainLoss(kd_weight=0.7, caption_loss_weight=2.0, max_logit_scale=20.0),
    )
    cfg = Config(train=replace(tc, changes or {}))
    return make_plan(cfg, [records.TeacherSpec(**TEACHER)], run_name="unit")


def test_lr_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    plan = a_plan()
    assert [lr_at(s, plan) for s in (0, 1)] == pytest.approx([5e-3, 1e-2])
    assert lr_at(2, plan) == pytest.approx(1e-2)
    assert lr_at(6, plan) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))  # half way through the cosine
    assert lr_at(10, plan) == pytest.approx(1e-4)
    lrs = [lr_at(s, plan) for s in range(2, 11)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    model = models.create_model(STUDENT)
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight"):
        assert name in exempt, name
    assert not any(n.endswith(".bias") or "ln_" in n or "embedding" in n for n in decayed)
    assert "text_projection" in decayed and any("attn.in_proj_weight" in n for n in decayed)


def synthetic_batches(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """STEPS x ACCUM global micro-batches with every column the reinforced step reads."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS * ACCUM):

        def unit(*shape: int) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)

        out.append(
            {
                data.IMAGE: torch.randint(0, 256, (GLOBAL_B, 3, 32, 32), generator=g, dtype=torch.uint8),
                data.TEXT: torch.randint(1, 1000, (GLOBAL_B, 77), generator=g),
                data.SYN_TEXT: torch.randint(1, 1000, (GLOBAL_B, 77), generator=g),
                data.teacher_image_column("t"): unit(GLOBAL_B, 64),
                data.teacher_text_column("t"): unit(GLOBAL_B, 64),
                data.teacher_syn_text_column("t"): unit(GLOBAL_B, 64),
            }
        )
    return out


def run_steps(model: torch.nn.Module, plan: TrainPlan, rows: slice) -> dict[str, torch.Tensor]:
    """What the worker loop does per optimiser step: ACCUM micro-batches (no_sync on all but the last), then
    `apply_update`."""
    optimizer = make_optimizer(model, plan, torch.device("cpu"))
    step_fn = Step(model, plan, torch.device("cpu"))
    batches = synthetic_batches(dtype=next(model.parameters()).dtype)
    for step in range(STEPS):
        for micro in range(ACCUM):
            batch = {k: v[rows] for k, v in batches[step * ACCUM + micro].items()}
            last = micro == ACCUM - 1
            sync = (
                model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
            )
            with sync:
                (step_fn(batch)["loss"] / ACCUM).backward()
        apply_update(model, optimizer, plan, step)
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}


def ddp_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        plan = dataclasses.replace(a_plan(), local_batch=GLOBAL_B // WORLD_SIZE)
        model = DistributedDataParallel(build_student(plan, torch.device("cpu")).double())
        local = GLOBAL_B // WORLD_SIZE
        torch.save(run_steps(model, plan, slice(rank * local, (rank + 1) * local)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Training runs in float64 so that the test judges the algorithm, not float32 summation order (which differs
# between CPUs). Bound on a weight's difference: AdamW's update lr * m / (sqrt(v) + eps) changes by at most
# lr / (4 * eps) per unit of gradient change (its steepest point is |g| ~ eps), i.e. 2.5e3 here; float64 gradients
# of O(1) sums differ by ~1e-15 between summation orders, so STEPS steps move a weight by < 1e-11. atol 1e-9 keeps
# a 100x margin, while a real DDP error (a gradient not averaged, a rank's rows missing) moves weights by ~lr.
DDP_ATOL = 1e-9


@pytest.mark.timeout(180)
def test_two_ddp_ranks_train_like_one_process_on_the_global_batch(tmp_path: Path):
    """Whole optimiser steps (accumulation, global-batch loss, clipping, AdamW, logit clamp): 2 ranks x b == 1 x 2b."""
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    plan = a_plan()
    single = run_steps(build_student(plan, torch.device("cpu")).double(), plan, slice(None))
    initial = build_student(plan, torch.device("cpu")).double().state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # the steps did change the weights
    for rank in ranks:
        for name, want in single.items():
            assert rank[name].dtype == want.dtype
            torch.testing.assert_close(rank[name], want, rtol=0, atol=DDP_ATOL, msg=name)


def test_a_coca_student_trains_on_real_and_synthetic_captions_with_its_caption_loss():
    from clipdr.models.captioners import TINY_COCA

    length = models.model_config(TINY_COCA)["text_cfg"]["context_length"]
    size = models.model_config(TINY_COCA)["vision_cfg"]["image_size"]
    plan = a_plan({"model": TINY_COCA, "schedule.accum_steps": 1})
    model = build_student(plan, torch.device("cpu"))
    batch = synthetic_batches()[0]
    batch[data.IMAGE] = torch.randint(0, 256, (GLOBAL_B, 3, size, size), dtype=torch.uint8)
    batch[data.TEXT] = batch[data.TEXT][:, :length]
    batch[data.SYN_TEXT] = batch[data.SYN_TEXT][:, :length]
    parts = Step(model, plan, torch.device("cpu"))(batch)
    assert {"caption_loss", "clip_loss_syn", "kd_loss_syn"} <= set(parts)
    parts["loss"].backward()
    assert model.text_decoder.text_projection.grad is not None


@pytest.mark.parametrize("local_loss", [False, True])
def test_local_loss_reaches_the_loss_from_the_config(local_loss):
    plan = a_plan({"loss.local_loss": local_loss})
    assert Step(build_student(plan, torch.device("cpu")), plan, torch.device("cpu")).loss.local_loss is local_loss


def test_loss_parts_stay_on_the_device_until_the_log_reads_them():
    """Summing the loss parts of micro-batches makes no host sync (`aten._local_scalar_dense`, what ``float`` and
    ``.item`` call); reading them at the log is one device-to-host copy, and gives the weighted sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from clipdr.train.loop import LossSums

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))

    sums = LossSums()
    parts = [{"loss": torch.tensor(float(i)), "kd_loss": torch.tensor(2.0 * i)} for i in range(1, 5)]
    with CountSyncs():
        for p in parts:
            sums.add(p, 0.5)
    assert CountSyncs.syncs == 0
    assert sums.read() == {"loss": 5.0, "kd_loss": 10.0}


def test_progress_lines_give_position_parts_pace_and_time_to_finish():
    from clipdr import progress
    from clipdr.train.loop import Progress, progress_line

    plan = a_plan()
    metrics = {"train/loss": 3.21, "train/kd_loss_syn": 1.5, "train/lr": 8e-4, "train/samples_per_s": 2410.5}
    assert progress.eta_s(60.0, 0, 10) is None and progress.eta_s(60.0, 2, 10) == 300.0
    assert [progress.duration(s) for s in (None, 12.4, 250, 10_260)] == ["?", "12 s", "4 min 10 s", "2 h 51 min"]
    line = progress.line("reinforce", "shard a.parquet", 3, 4, ["128 rows"], 12.0)
    assert line == "reinforce: shard a.parquet 3/4 (75.0%) | 128 rows | ETA 12 s"
    text = progress_line(Progress(step=3, samples_seen=96), plan, metrics, 30.0)
    assert text == (
        "train: step 3/10 (30.0%) | 96 samples | loss 3.2100 kd_loss_syn 1.5000 | lr 8.00e-04 | 2410.5 samples/s | "
        "ETA 30 s"
    )


def test_the_optimiser_is_the_plans_adamw_fused_only_on_cuda():
    plan = a_plan()
    model = models.create_model(STUDENT)
    optimizer = make_optimizer(model, plan, torch.device("cpu"))
    opt = plan.train.optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults.get("fused")
    assert optimizer.defaults["betas"] == (opt.beta1, opt.beta2) and optimizer.defaults["eps"] == opt.eps
    assert [g["weight_decay"] for g in optimizer.param_groups] == [opt.weight_decay, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels_last is a CUDA option")
def test_channels_last_trains_the_same_student_as_the_default_layout():
    """``train.channels_last`` changes the memory layout, not the model: the same conv student (MCi) on the same
    batch gives the same loss and gradients, to fp32 summation-order differences (cuDNN picks other kernels for
    NHWC, and TF32 is off here)."""
    cuda = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    size = models.model_config("clipdr-tiny-mci")["vision_cfg"]["image_size"]
    batch = {k: v.to(cuda) for k, v in synthetic_batches()[0].items()}
    batch[data.IMAGE] = torch.randint(0, 256, (GLOBAL_B, 3, size, size), dtype=torch.uint8, device=cuda)
    results = []
    for channels_last in (False, True):
        plan = a_plan({"model": "clipdr-tiny-mci", "channels_last": channels_last})
        model = build_student(plan, cuda)
        loss = Step(model, plan, cuda)(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)


def test_channels_last_is_refused_off_cuda():
    with pytest.raises(ValueError, match=r"train\.channels_last is a CUDA option"):
        build_student(a_plan({"channels_last": True}), torch.device("cpu"))


def test_compile_wraps_the_forward_around_the_students_own_parameters():
    """``train.compile``: the step runs a compiled forward of the very model the optimiser, DDP and checkpoints see
    (compiling itself is measured by the GPU check, jobs/gpu_check.sh; it takes minutes on this CPU)."""
    plan = a_plan({"compile": True})
    model = build_student(plan, torch.device("cpu"))
    step = Step(model, plan, torch.device("cpu"))
    assert isinstance(step.forward, torch._dynamo.eval_frame.OptimizedModule) and step.forward._orig_mod is model
    assert Step(model, a_plan(), torch.device("cpu")).forward is model


@pytest.mark.parametrize(
    ("local_rank", "node_rank", "num_nodes", "expected"),
    [
        (0, 0, 1, (True, None)),  # one node: its first worker, unprefixed metrics (as before)
        (1, 0, 1, (False, None)),
        (0, 0, 3, (True, "node0")),  # several nodes: every node's first worker, under its node id
        (0, 2, 3, (True, "node2")),
        (3, 2, 3, (False, None)),
    ],
)
def test_system_metrics_come_from_the_first_worker_of_every_node(local_rank, node_rank, num_nodes, expected):
    from clipdr.train.loop import system_metrics_node

    assert system_metrics_node(local_rank, node_rank, num_nodes) == expected


@pytest.mark.parametrize(("ray_hands", "driver_found", "restored"), [(4, 8, 8), (8, 4, 8), (8, 8, 8), (None, 8, 8)])
def test_a_worker_restores_the_newer_of_ray_trains_checkpoint_and_the_drivers(
    tmp_path, monkeypatch, ray_hands, driver_found, restored
):
    """A killed job's worker can write a checkpoint its killed controller never registers: on resubmission Ray
    Train hands the older one while the driver found the newer on storage and starts the data stream after it. The
    worker restores the newer (its weights, not only its step), and after a restart within the fit, Ray's."""
    import ray.train

    from clipdr import checkpoint
    from clipdr.train import loop

    plan = a_plan()
    folders = {}
    cpu = torch.device("cpu")
    for step in (4, 8):
        model = build_student(plan, cpu)
        weights = {k: v + step if v.is_floating_point() else v for k, v in model.state_dict().items()}  # each its own
        meta = checkpoint.CheckpointMeta(
            STUDENT, str(plan.mode), "unit", "", step, 16 * step, 2 * step, plan.total_steps
        )
        folders[step] = tmp_path / f"checkpoint_{step}"
        folders[step].mkdir()
        checkpoint.save(folders[step], weights, meta, make_optimizer(model, plan, cpu).state_dict())
    handed = None if ray_hands is None else ray.train.Checkpoint.from_directory(str(folders[ray_hands]))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: handed)
    plan = dataclasses.replace(plan, resume_from=str(folders[driver_found]))
    model = build_student(plan, cpu)
    progress = loop._restore(model, make_optimizer(model, plan, cpu), plan, None)
    assert (progress.step, progress.batches) == (restored, restored * 2)
    want = checkpoint.load_weights(folders[restored])
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
