"""The registered model served over real HTTP: `mlflow models serve` and `clipdr serve` (Ray Serve).

One model, logged and registered as training logs it, with alias champion. One `mlflow models serve` (``--env-manager
local``, 127.0.0.1, a free port) for its requests; it is stopped by its PID (the process group it leads, so uvicorn's
worker goes with it). One `clipdr serve` (a subprocess of the CLI, on the suite's local Ray through ``RAY_ADDRESS``)
for the Ray Serve requests and the load test at toy size; it is stopped by SIGTERM to its PID, and must exit 0 and
leave no Serve behind on the cluster.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch

from clipdr import benchmarks, cli, lifecycle, models, serving, tracking
from clipdr.benchmarks import serve as serve_bench
from clipdr.cluster import free_port
from tests.conftest import wait_http
from tests.unit.test_logged_model import direct_embeddings, png

pytestmark = pytest.mark.integration

NAME = "clipdr-tiny-vit"


@dataclass(frozen=True)
class Registered:
    folder: Path
    tracking_uri: str
    version: str
    embedder: models.ClipEmbedder


@dataclass(frozen=True)
class Server:
    url: str
    embedder: models.ClipEmbedder


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    """A tiny ViT logged and registered as ``student`` as training does, its version the champion."""
    folder = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    torch.manual_seed(0)
    embedder = models.ClipEmbedder(models.create_model(NAME), NAME).eval()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        with tracking.Tracker.start("clipdr-train", "student") as tracker:
            logged = tracking.log_model(tracker, embedder, registered_model_name="student")
        tracking.set_model_alias("student", lifecycle.CHAMPION, logged.version)
    return Registered(folder, uri, logged.version, embedder)


@pytest.fixture(scope="module")
def server(registered) -> Iterator[Server]:
    folder, uri = registered.folder, registered.tracking_uri
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = f"{mlflow_cli.parent}{os.pathsep}{env.get('PATH', '')}"  # the CLI runs `uvicorn` from PATH
    command = [str(mlflow_cli), "models", "serve", "-m", f"models:/student/{registered.version}"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with (folder / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=90)
        yield Server(f"http://127.0.0.1:{port}", registered.embedder)
    finally:
        # The group this PID leads: the CLI and the uvicorn it execs (and its worker).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(server: Server, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{server.url}/invocations", data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_served_model_embeds_images_and_captions_as_the_model_does(server):
    pngs = [png((40, 24), (220, 20, 60)), png((32, 32), (20, 200, 90))]
    b64 = [base64.b64encode(p).decode() for p in pngs]
    # One request mixing rows: image and text, image only, text only.
    body = {"dataframe_split": {"columns": ["image", "text"], "data": [[b64[0], "a red dog"], [b64[1], None]]}}
    status, answer = post(server, json.dumps(body))
    assert status == 200, answer
    rows = answer["predictions"]
    assert rows[1]["text_embedding"] is None
    want_images, want_texts = direct_embeddings(server.embedder, pngs, ["a red dog", "two blue squares"])
    got_images = np.array([row["image_embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_array_equal(got_images, want_images)
    np.testing.assert_allclose(np.linalg.norm(got_images, axis=1), 1.0, rtol=0, atol=1e-6)
    # Captions only (no image column), as records; same batch as the direct computation.
    body = {"dataframe_records": [{"text": "a red dog"}, {"text": "two blue squares"}]}
    status, answer = post(server, json.dumps(body))
    assert status == 200, answer
    got_texts = np.array([row["text_embedding"] for row in answer["predictions"]], dtype=np.float32)
    np.testing.assert_array_equal(got_texts, want_texts)
    assert all(row["image_embedding"] is None for row in answer["predictions"])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"dataframe_records": [{"image": base64.b64encode(b"GIF89a not really").decode()}]}, "not a readable"),
        ({"dataframe_records": [{"image": "%%% not base64 %%%"}]}, ""),
        ({"dataframe_records": [{"caption": "a dog"}]}, ""),
        ('{"dataframe_records": [', ""),
    ],
    ids=["not-an-image", "not-base64", "unknown-column", "broken-json"],
)
def test_a_malformed_request_gets_a_400_and_the_server_keeps_serving(server, body, says):
    status, answer = post(server, body if isinstance(body, str) else json.dumps(body))
    assert status == 400, answer
    assert says in json.dumps(answer)
    status, _ = post(server, json.dumps({"dataframe_records": [{"text": "still up"}]}))
    assert status == 200


# --- clipdr serve (Ray Serve)


@pytest.fixture(scope="module")
def ray_serve(registered, ray_local) -> Iterator[str]:
    """`clipdr serve` on ``student@champion``, on the suite's Ray; its URL."""
    import ray

    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": registered.tracking_uri}
    with serve_bench.started("student", env=env, timeout_s=300, log_path=registered.folder / "clipdr-serve.log") as url:
        yield url
    assert not serving._serve_running()  # it shut down the Serve it started on the cluster


def pyfunc_predict(registered: Registered, rows: dict) -> pd.DataFrame:
    """What the registered pyfunc's ``predict`` gives for ``rows``, loaded as MLflow loads it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registered.tracking_uri)
        return mlflow.pyfunc.load_model(f"models:/student@{lifecycle.CHAMPION}").predict(pd.DataFrame(rows))


# Each tower's reductions may run in another order here than in the replica (other torch threads): each component
# of a unit vector is below 1, so differences stay within a few dozen float32 ulps of 1.
ATOL = 64 * float(np.finfo(np.float32).eps)


def test_clipdr_serve_embeds_images_and_texts_as_the_registered_pyfunc_predicts(ray_serve, registered, capsys):
    # The alias is looked up in the registry before anything starts: one that is not set is refused at once.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registered.tracking_uri)
        assert cli.main(["serve", "--set", "serve.model=student", "--set", "serve.alias=nightly"]) == 2
    assert "registered model 'student' has no alias 'nightly'" in capsys.readouterr().err
    served = serve_bench.info(ray_serve)
    assert served["model"] == f"models:/student/{registered.version}"
    assert (served["alias"], served["embedding_dim"]) == (lifecycle.CHAMPION, 64)
    pngs = [png((40, 24), (220, 20, 60)), png((32, 32), (20, 200, 90))]
    texts = ["a red dog", "two blue squares", ""]
    want = pyfunc_predict(registered, {"image": pngs})["image_embedding"]
    want_images = np.array(list(want), dtype=np.float32)
    want_texts = np.array(list(pyfunc_predict(registered, {"text": texts})["text_embedding"]), dtype=np.float32)

    body = json.dumps({"images": [base64.b64encode(p).decode() for p in pngs]}).encode()
    answer = serve_bench.request(ray_serve, serving.IMAGE_ROUTE, body, "application/json")
    assert answer.status == 200, answer.body
    assert answer.body["model"] == served["model"]
    np.testing.assert_allclose(np.array(answer.body["embeddings"], dtype=np.float32), want_images, rtol=0, atol=ATOL)
    raw = serve_bench.request(ray_serve, serving.IMAGE_ROUTE, pngs[1], "image/png")  # one image as the body
    assert raw.status == 200, raw.body
    np.testing.assert_allclose(np.array(raw.body["embeddings"], np.float32), want_images[1:], rtol=0, atol=ATOL)

    body = json.dumps({"texts": texts}).encode()
    answer = serve_bench.request(ray_serve, serving.TEXT_ROUTE, body, "application/json")
    assert answer.status == 200, answer.body
    np.testing.assert_allclose(np.array(answer.body["embeddings"], dtype=np.float32), want_texts, rtol=0, atol=ATOL)
    raw = serve_bench.request(ray_serve, serving.TEXT_ROUTE, texts[0].encode(), "text/plain; charset=utf-8")
    assert raw.status == 200, raw.body
    np.testing.assert_allclose(np.array(raw.body["embeddings"], np.float32), want_texts[:1], rtol=0, atol=ATOL)
    # The route picks the tower: the two towers' embeddings differ far beyond the tolerance.
    assert np.abs(want_images[0] - want_texts[0]).max() > 100 * ATOL


def test_clipdr_serve_answers_a_malformed_request_with_a_4xx_and_goes_on_serving(ray_serve):
    not_an_image = json.dumps({"images": [base64.b64encode(b"GIF89a not really").decode()]}).encode()
    answer = serve_bench.request(ray_serve, serving.IMAGE_ROUTE, not_an_image, "application/json")
    assert answer.status == 400
    assert "embeddings" not in answer.body and "not a readable JPEG, PNG or WebP image" in answer.body["error"]
    answer = serve_bench.request(ray_serve, serving.TEXT_ROUTE, b'{"texts": [', "application/json")
    assert answer.status == 400 and "not valid JSON" in answer.body["error"]
    still = serve_bench.request(ray_serve, serving.TEXT_ROUTE, b'{"texts": ["still up"]}', "application/json")
    assert still.status == 200 and len(still.body["embeddings"]) == 1


def test_the_serve_load_test_runs_at_toy_size(ray_serve, tmp_path):
    """`python jobs/benchmark.py serve` (the same `benchmarks.main`) against the running `clipdr serve`: it fails
    unless every request got its embedding and every malformed request of `serve_bench.MALFORMED` its 4xx."""
    output = tmp_path / "serve.md"
    toy = ["--requests", "6", "--concurrency", "2", "--warmup", "1", "--image-size", "32", "--output", str(output)]
    assert benchmarks.main(["serve", "--url", ray_serve, *toy], prog="jobs/benchmark.py") == 0
    table = output.read_text()
    assert "| POST /image | 6 | 2 |" in table and "| POST /text | 6 | 2 |" in table
    assert table.count("| 400 (400) |") == 9 and "| 413 (413) |" in table and "All requests answered" in table
