"""WiSE-FT after training (`clipdr.wiseft`, ``evaluate.wise_alpha``, ``export.wise_alpha``).

A fine-tuning run is published the way training publishes it (`clipdr.train.run.publish`: its checkpoint files and
its model, WiSE-FT at ``train.finetune.wise_alpha`` 0.5) into a real MLflow store, without Ray; `clipdr export` and
`clipdr evaluate` then take it at other alphas through the CLI: alpha 0 gives the start's bytes and 1 the fine-tuned
(EMA) bytes even from the interpolated logged model, and 0.5 equals `wiseft.wise_ft` tensor for tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from clipdr import checkpoint, export, models, tracking, wiseft
from clipdr.cli import main
from clipdr.config import Config, TrainConfig, TrainFinetune, flatten, to_dict
from clipdr.evaluate import engine, loading
from clipdr.train import run as train_run
from tests.unit.test_evaluate import write_task

NAME = "clipdr-tiny-vit"


def snapshot(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in models.create_model(NAME).state_dict().items()}


def same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(got[k].numpy().tobytes() == v.numpy().tobytes() for k, v in want.items())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A base run's checkpoint (the start) and a fine-tuning run from it: raw weights, their EMA (the fine-tuned
    model), and the logged model at wise_alpha 0.5."""
    root = tmp_path_factory.mktemp("wiseft")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.chdir(root)
        start, raw, tuned = snapshot(0), snapshot(1), snapshot(2)
        base = root / "base" / "checkpoint_000000"
        base.mkdir(parents=True)
        checkpoint.save(base, start, checkpoint.CheckpointMeta(NAME, "clip", "base", "", 2, 16, 2, 2))
        tc = TrainConfig(
            data="unused",
            model=NAME,
            mode="clip",
            pretrained=str(root / "base"),  # a run's storage folder, as clipdr.train.run records it: absolute
            finetune=TrainFinetune(ema_decay=0.9, wise_alpha=0.5),
        )
        with tracking.Tracker.start("clipdr-train", "finetune") as tracker:
            tracker.log_params(flatten(to_dict(tc), "train."))  # the run's config, as clipdr.train.run logs it
            # Its evaluations: of the logged model (at wise_alpha 0.5), and at eval_alphas = [1.0].
            tracker.log_metrics({"zeroshot/mean_top1": 0.5, "wise_ft/alpha_1.00/zeroshot/mean_top1": 0.75}, step=32)
            folder = root / "finetune" / "checkpoint_000001"
            folder.mkdir(parents=True)
            meta = checkpoint.CheckpointMeta(NAME, "clip", "finetune", tracker.run_id, 4, 32, 4, 4)
            checkpoint.save(folder, raw, meta, ema_state=tuned)
            _, logged = train_run.publish(Config(train=tc), tracker, folder, "finetune")
        task = write_task(root / "colours", ["red", "green"], ["a {c} thing."], [((255, 0, 0), 0), ((0, 255, 0), 1)])
        yield SimpleNamespace(
            root=root,
            store=store,
            start=start,
            tuned=tuned,
            folder=folder,
            uri=logged.uri,
            run_id=tracker.run_id,
            task=task,
        )


def test_export_at_alpha_0_and_1_gives_the_start_and_the_finetuned_bytes(finetuned, monkeypatch):
    monkeypatch.chdir(finetuned.root)

    def exported(finetuned, model: str, alpha: float, out: str, log: bool) -> tuple[dict[str, torch.Tensor], dict]:
        args = ["export", "--set", f"export.model={model}", "--set", f"export.wise_alpha={alpha}"]
        args += [
            "--set",
            f"export.output={out}",
            "--set",
            "export.onnx=false",
            "--set",
            f"export.log_artifacts={str(log).lower()}",
        ]
        assert main(args) == 0
        folder = finetuned.root / out
        return load_file(str(folder / export.OPEN_CLIP_WEIGHTS)), json.loads((folder / export.MANIFEST).read_text())

    # The logged model is WiSE-FT at 0.5: the fine-tuned weights come from the checkpoint the run logged beside it.
    weights, manifest = exported(finetuned, finetuned.uri, 1.0, "alpha1", log=True)
    assert same_bytes(weights, finetuned.tuned)
    assert manifest["wise_ft"] == {
        "alpha": 1.0,
        "start": str(finetuned.root / "base"),
        "finetuned": f"runs:/{finetuned.run_id}/{checkpoint.ARTIFACT_PATH}",
    }
    card = (finetuned.root / "alpha1" / export.MODEL_CARD).read_text()
    assert "| zeroshot/mean_top1 | 0.7500 |" in card and "0.5000" not in card  # the run's metrics at that alpha
    weights, manifest = exported(finetuned, str(finetuned.folder), 0.0, "alpha0", log=False)
    assert same_bytes(weights, finetuned.start)
    assert manifest["wise_ft"]["finetuned"] == str(finetuned.folder)
    card = (finetuned.root / "alpha0" / export.MODEL_CARD).read_text()
    assert f"start + 0 x (fine-tuned - start), per tensor: the start `{finetuned.root / 'base'}`" in card
    # Beside the run's own export, not over it.
    logged = {a.path for a in MlflowClient(finetuned.store).list_artifacts(finetuned.run_id, "export/wise_ft")}
    assert logged == {"export/wise_ft/alpha_1.00"}


def test_alpha_half_is_wise_ft_tensor_for_tensor_and_the_logged_model(finetuned, monkeypatch):
    monkeypatch.chdir(finetuned.root)
    want = wiseft.wise_ft(finetuned.start, finetuned.tuned, 0.5)
    loaded = loading.with_wise_ft(loading.load(str(finetuned.folder)), 0.5, finetuned.store)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in want.items())
    # Training logged the same interpolation: its model, as named (no wise_alpha), holds it too.
    logged = loading.load(finetuned.uri, tracking_uri=finetuned.store)
    assert all(torch.equal(logged.model.state_dict()[k], v) for k, v in want.items())


def test_evaluate_at_an_alpha_logs_it_as_a_param_of_its_own_run(finetuned, monkeypatch):
    monkeypatch.chdir(finetuned.root)
    engine.clear_cache()
    args = ["--set", f"evaluate.model={finetuned.uri}", "--set", f"evaluate.zeroshot=['{finetuned.task}']"]
    assert main(["evaluate", *args, "--set", "evaluate.wise_alpha=0.25", "--set", "evaluate.device=cpu"]) == 0
    client = MlflowClient(finetuned.store)
    experiment = client.get_experiment_by_name("clipdr-train").experiment_id
    (run,) = client.search_runs([experiment], "tags.`clipdr.job` = 'evaluate'")
    assert run.data.params["evaluate.wise_alpha"] == "0.25"
    assert run.data.tags["clipdr.source_run_id"] == finetuned.run_id
    assert set(run.data.metrics) == {
        f"wise_ft/alpha_0.25/zeroshot/colours/{m}" for m in ("top1", "top5", "mean_per_class_recall")
    } | {"wise_ft/alpha_0.25/zeroshot/mean_top1"}
    record = client.download_artifacts(
        run.info.run_id, "evaluation/wise_ft/alpha_0.25/step-000000000032.json", str(finetuned.root)
    )
    assert json.loads(Path(record).read_text())["wise_ft"]["alpha"] == 0.25


def test_refusals_name_what_is_wrong(finetuned, monkeypatch):
    monkeypatch.chdir(finetuned.root)
    with pytest.raises(ValueError, match=r"export.wise_alpha must be in \[0, 1\] \(-1: off\), got 1.5"):
        loading.wise_ft_on(1.5, "export.wise_alpha")
    assert main(["export", "--set", f"export.model={finetuned.uri}", "--set", "export.wise_alpha=2"]) == 2
    with pytest.raises(ValueError, match="has no recorded start"):
        loading.with_wise_ft(loading.load(NAME), 0.5, finetuned.store)
    # A run without train.pretrained: trained from a random init, nothing to interpolate with.
    with tracking.Tracker.start("clipdr-train", "scratch") as tracker:
        tracker.log_params(flatten(to_dict(TrainConfig(data="unused", model=NAME, mode="clip")), "train."))
    loaded = loading.load(str(finetuned.folder))
    scratch = loading.LoadedModel(loaded.model, NAME, "scratch", "checkpoint", run_id=tracker.run_id)
    with pytest.raises(ValueError, match=r"records no start \(train.pretrained is empty\)"):
        loading.with_wise_ft(scratch, 0.5, finetuned.store)
    # The fine-tuned model is not the architecture its run trained.
    other = loading.LoadedModel(
        models.create_model("clipdr-tiny-mci"), "clipdr-tiny-mci", "x", "checkpoint", run_id=finetuned.run_id
    )
    with pytest.raises(ValueError, match="not the same architecture"):
        loading.with_wise_ft(other, 0.5, finetuned.store)
    with pytest.raises(ValueError, match=r"one architecture: .* is \(\d+,\) in the start and \(\d+,\) fine-tuned"):
        wiseft.wise_ft({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="1 tensors are in one only"):
        wiseft.wise_ft({"w": torch.zeros(2)}, {"w": torch.zeros(2), "b": torch.zeros(1)}, 0.5)


def test_the_recorded_start_is_read_from_the_keys_training_logs():
    logged = flatten(to_dict(TrainConfig(data="d", model=NAME, mode="clip", pretrained="p")), "train.")
    assert wiseft.recorded_start(logged, "r") == wiseft.RecordedStart(model=NAME, pretrained="p")
