"""A bounded load test of `clipdr serve` on 127.0.0.1: requests/s and latency of both endpoints, no failures, 4xx.

With ``--model NAME`` it starts ``clipdr serve`` on the version that alias ``--alias`` (champion) of registered model
NAME points at: a subprocess running the CLI as a user does (on the Ray of ``RAY_ADDRESS``, else a local Ray of its
own; the registry of ``MLFLOW_TRACKING_URI``), waits until ``GET /`` answers (every replica has loaded the model),
and stops it by its PID at the end. With ``--url`` it measures a server that is already running.

For each endpoint, ``--warmup`` unmeasured requests, then ``--requests`` requests from ``--concurrency`` clients,
each a thread with its own keep-alive HTTP connection taking the next request until none is left (a closed loop: a
client sends its next request when its last one is answered). A request holds one item: a PNG of random pixels of
``--image-size`` px, base64 in JSON, or one caption from `CAPTIONS`. Requests/s is the number of requests over the
wall time from the first send to the last answer; latency is each request's time from send to its whole answer,
reported as p50, p99 and max. It is not measured through `timing`'s rounds: a server's throughput under concurrent
clients is the quantity, not one call's cost.

Then every request of `MALFORMED` (bad base64, bytes that are not an image, empty bodies, broken or wrong JSON, a
wrong item type, a wrong content type, too many items) must get its 4xx with an ``error`` message, and a good
request after them must still get 200.

The run fails (exit status 1, the table still written) when any measured request did not get a 200 with one
embedding of the served width and unit norm, or any malformed request got another answer.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdr import serving
from clipdr.cluster import free_port

CAPTIONS = (
    "a photo of a dog",
    "two red squares on a blue background",
    "a small green circle in the top left corner",
    "IMG_4821",
    "a triangle",
)


@dataclass(frozen=True)
class Malformed:
    """A request the server must refuse with ``status``."""

    name: str
    route: str
    content_type: str
    body: bytes
    status: int


def _json(payload: Any) -> bytes:
    return json.dumps(payload).encode()


MALFORMED = (
    Malformed("bad base64", serving.IMAGE_ROUTE, "application/json", _json({"images": ["%%% not base64 %%%"]}), 400),
    Malformed(
        "not an image",
        serving.IMAGE_ROUTE,
        "application/json",
        _json({"images": [base64.b64encode(b"GIF89a not really an image").decode()]}),
        400,
    ),
    Malformed("not an image (raw body)", serving.IMAGE_ROUTE, "image/png", b"\x89PNG\r\n\x1a\n truncated", 400),
    Malformed("empty body (raw image)", serving.IMAGE_ROUTE, "image/jpeg", b"", 400),
    Malformed("empty body (JSON)", serving.TEXT_ROUTE, "application/json", b"", 400),
    Malformed("broken JSON", serving.TEXT_ROUTE, "application/json", b'{"texts": ["a dog"', 400),
    Malformed("wrong JSON key", serving.IMAGE_ROUTE, "application/json", _json({"pictures": ["aGk="]}), 400),
    Malformed("wrong JSON shape", serving.TEXT_ROUTE, "application/json", _json({"texts": "a dog"}), 400),
    Malformed("not a string", serving.TEXT_ROUTE, "application/json", _json({"texts": ["a dog", 3]}), 400),
    Malformed("wrong content type", serving.TEXT_ROUTE, "image/png", b"a dog", 415),
    Malformed("unknown endpoint", "/embed", "application/json", _json({"texts": ["a dog"]}), 404),
)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    latency_s: float


@dataclass
class EndpointLoad:
    """One endpoint's measured requests."""

    route: str
    requests: int
    concurrency: int
    wall_s: float
    latencies_s: list[float]
    failures: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies_s), q)) * 1000


@dataclass
class ServeLoadReport:
    info: dict[str, Any]
    loads: list[EndpointLoad]
    malformed: list[tuple[Malformed, int, str]]  # the request, the status it got, its error message
    problems: list[str]
    setup: str

    @property
    def ok(self) -> bool:
        return not self.problems


def request(url: str, route: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> Answer:
    """One request on a new connection."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)
    try:
        return _send(connection, "POST" if body or content_type else "GET", route, body, content_type)
    finally:
        connection.close()


def _send(connection: http.client.HTTPConnection, method: str, route: str, body: bytes, content_type: str) -> Answer:
    headers = {"Content-Type": content_type} if content_type else {}
    start = time.perf_counter()
    connection.request(method, route, body=body if method == "POST" else None, headers=headers)
    response = connection.getresponse()
    data = response.read()
    latency_s = time.perf_counter() - start
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"unparsed": data[:200].decode(errors="replace")}
    return Answer(response.status, answer if isinstance(answer, dict) else {"unparsed": answer}, latency_s)


def info(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """What ``GET /`` answers; `RuntimeError` unless 200."""
    answer = request(url, serving.INFO_ROUTE, b"", "", timeout_s)
    if answer.status != 200:
        raise RuntimeError(f"GET {url}{serving.INFO_ROUTE}: {answer.status} {answer.body}")
    return answer.body


def png(size: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (so it does not compress to nothing), ``size`` x ``size``."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_body(image: bytes) -> bytes:
    return _json({serving.IMAGES_KEY: [base64.b64encode(image).decode()]})


def text_body(caption: str) -> bytes:
    return _json({serving.TEXTS_KEY: [caption]})


def _check(answer: Answer, dim: int) -> str:
    """Why ``answer`` is not one unit-norm embedding of width ``dim``; "" when it is."""
    if answer.status != 200:
        return f"status {answer.status}: {answer.body}"
    embeddings = answer.body.get("embeddings")
    if not isinstance(embeddings, list) or len(embeddings) != 1 or len(embeddings[0]) != dim:
        return f"expected one embedding of width {dim}, got {str(embeddings)[:100]}"
    norm = float(np.linalg.norm(np.asarray(embeddings[0], dtype=np.float64)))
    # float32 components: the norm of a normalised vector is 1 up to the rounding of its dim terms.
    if abs(norm - 1) > 4 * dim * float(np.finfo(np.float32).eps):
        return f"embedding norm {norm}, not 1"
    return ""


def load(url: str, route: str, bodies: list[bytes], concurrency: int, timeout_s: float, dim: int) -> EndpointLoad:
    """Sends ``bodies`` (JSON) to ``route`` from ``concurrency`` clients; every answer is checked."""
    parsed = urllib.parse.urlsplit(url)
    queue = iter(enumerate(bodies))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                i, body = item
                try:
                    answer = _send(connection, "POST", route, body, "application/json")
                    problem = _check(answer, dim)
                except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
                    connection.close()  # the next request reconnects
                    answer, problem = None, f"{type(e).__name__}: {e}"
                with lock:
                    if answer is not None:
                        latencies.append(answer.latency_s)
                    if problem:
                        failures.append(f"{route} request {i}: {problem}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return EndpointLoad(route, len(bodies), concurrency, time.perf_counter() - start, latencies, failures)


def measure(
    url: str, requests: int, concurrency: int, *, warmup: int = 5, image_size: int = 224, timeout_s: float = 60.0
) -> ServeLoadReport:
    """The load test and the malformed requests against the server at ``url``."""
    served = info(url)
    dim = int(served["embedding_dim"])
    images = [image_body(png(image_size, seed)) for seed in range(8)]
    texts = [text_body(caption) for caption in CAPTIONS]
    loads, problems = [], []
    for route, bodies in ((serving.IMAGE_ROUTE, images), (serving.TEXT_ROUTE, texts)):
        load(url, route, [bodies[i % len(bodies)] for i in range(warmup)], concurrency, timeout_s, dim)
        measured = load(url, route, [bodies[i % len(bodies)] for i in range(requests)], concurrency, timeout_s, dim)
        loads.append(measured)
        problems += measured.failures
    too_many = _json({serving.TEXTS_KEY: ["a dog"] * (int(served["max_items"]) + 1)})
    malformed = []
    for bad in (*MALFORMED, Malformed("too many items", serving.TEXT_ROUTE, "application/json", too_many, 413)):
        answer = request(url, bad.route, bad.body, bad.content_type, timeout_s)
        message = answer.body.get(serving.ERROR_KEY)
        malformed.append((bad, answer.status, str(message)))
        if answer.status != bad.status or not isinstance(message, str) or not message:
            problems.append(f"malformed request {bad.name!r}: expected {bad.status} and an error, got {answer.status}")
    for route, body in ((serving.IMAGE_ROUTE, images[0]), (serving.TEXT_ROUTE, texts[0])):
        still = _check(request(url, route, body, "application/json", timeout_s), dim)
        if still:
            problems.append(f"{route} after the malformed requests: {still}")
    setup = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
        f"{requests} requests per endpoint after {warmup} warm-up, {concurrency} concurrent clients, one item per "
        f"request ({image_size} px random-pixel PNG, base64 JSON; one caption)"
    )
    return ServeLoadReport(served, loads, malformed, problems, setup)


@contextlib.contextmanager
def started(
    model: str,
    *,
    alias: str = "champion",
    replicas: int = 1,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Runs ``clipdr serve`` on ``model@alias`` on 127.0.0.1 (a free port by default) until the block ends.

    Yields its URL once ``GET /`` answers. ``env`` adds to this process's environment (``RAY_ADDRESS``,
    ``MLFLOW_TRACKING_URI``). At the end it is sent SIGTERM and waited for (it shuts its Serve down, and a local Ray
    it started); SIGKILL to its process group if it has not stopped within a minute. `RuntimeError` when it exits
    before it serves, or with a status other than 0 when stopped.
    """
    port = port or free_port()
    command = [sys.executable, "-m", "clipdr.cli", "serve", "--set", f"serve.model={model}"]
    command += ["--set", f"serve.alias={alias}", "--set", "serve.host=127.0.0.1", "--set", f"serve.port={port}"]
    command += ["--set", f"serve.replicas={replicas}"]
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "serve.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_ready(url, proc, timeout_s, log_path)
            yield url
        except BaseException:
            _stop(proc)
            raise
        if _stop(proc) != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"clipdr serve exited with {proc.returncode} when stopped:\n{tail}")


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"clipdr serve exited with {proc.returncode} before serving {url}:\n{tail}")
        try:
            info(url, timeout_s=5)
            return
        except (OSError, http.client.HTTPException, RuntimeError):  # not listening yet, or not yet routed (404)
            time.sleep(0.5)
    raise RuntimeError(f"clipdr serve did not answer GET {url}/ within {timeout_s:g} s (log: {log_path})")


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL to its process group after a minute; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def to_markdown(report: ServeLoadReport) -> str:
    served = report.info
    lines = [
        f"Model: {served.get('model')} ({served.get('name')}@{served.get('alias')}), embedding width "
        f"{served.get('embedding_dim')}. {report.setup}.",
        "",
        "| endpoint | requests | clients | requests/s | p50 ms | p99 ms | max ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load_ in report.loads:
        lines.append(
            f"| POST {load_.route} | {load_.requests} | {load_.concurrency} | {load_.requests_per_s:.1f} | "
            f"{load_.percentile_ms(50):.1f} | {load_.percentile_ms(99):.1f} | {load_.percentile_ms(100):.1f} | "
            f"{len(load_.failures)} |"
        )
    lines += ["", "| malformed request | endpoint | status (expected) | error |", "|---|---|---|---|"]
    for bad, status, message in report.malformed:
        shown = message if len(message) <= 120 else message[:117] + "..."
        lines.append(f"| {bad.name} | {bad.route} | {status} ({bad.status}) | {shown.replace('|', '/')} |")
    lines += ["", "All requests answered as expected." if report.ok else "**Problems:**"]
    lines += [f"- {problem}" for problem in report.problems[:20]]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", default="", help="registered model name: start `clipdr serve` on its alias")
    target.add_argument("--url", default="", help="measure a server already running at URL instead")
    parser.add_argument("--alias", default="champion", help="with --model: the alias served (default: champion)")
    parser.add_argument("--replicas", type=int, default=1, help="with --model: serve.replicas (default: 1)")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per endpoint (default: 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests per endpoint (default: 5)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the PNG sent, px (default: 224)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per request (default: 60)")
    parser.add_argument("--output", default="", metavar="PATH", help="also write the tables as markdown to PATH")


def main(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0 or args.image_size < 1:
        print(
            "serve: --requests, --concurrency and --image-size must be at least 1, --warmup at least 0", file=sys.stderr
        )
        return 2
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(started(args.model, alias=args.alias, replicas=args.replicas))
        start = time.perf_counter()
        report = measure(
            url, args.requests, args.concurrency, warmup=args.warmup, image_size=args.image_size,
            timeout_s=args.timeout_s,
        )  # fmt: skip
        report.setup += f"; measured in {time.perf_counter() - start:.0f} s"
    text = to_markdown(report)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0 if report.ok else 1
