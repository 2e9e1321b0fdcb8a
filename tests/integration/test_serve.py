"""`mlflow models serve` on a model logged as training logs it: real HTTP requests with images and captions.

One server (``--env-manager local``, 127.0.0.1, a free port) for every request; it is stopped by its PID (the
process group it leads, so uvicorn's worker goes with it).
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

import numpy as np
import pytest
import torch

from clipdr import models, tracking
from clipdr.cluster import free_port
from tests.conftest import wait_http
from tests.unit.test_logged_model import direct_embeddings, png

pytestmark = pytest.mark.integration

NAME = "clipdr-tiny-vit"


@dataclass(frozen=True)
class Server:
    url: str
    embedder: models.ClipEmbedder


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    torch.manual_seed(0)
    embedder = models.ClipEmbedder(models.create_model(NAME), NAME).eval()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        with tracking.Tracker.start("clipdr-train", "student") as tracker:
            logged = tracking.log_model(tracker, embedder, registered_model_name="student")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = f"{mlflow_cli.parent}{os.pathsep}{env.get('PATH', '')}"  # the CLI runs `uvicorn` from PATH
    command = [str(mlflow_cli), "models", "serve", "-m", f"models:/student/{logged.version}"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with (folder / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=90)
        yield Server(f"http://127.0.0.1:{port}", embedder)
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
