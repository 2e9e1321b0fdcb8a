"""`clipdr serve`: a registered model's alias (``champion`` by default) served by Ray Serve over HTTP.

The served model is the registered MLflow pyfunc (`clipdr.models.embedder.ServedModel`, loaded as
`clipdr.tracking.load_model` loads it: safetensors, nothing unpickled), so an embedding from here equals the
pyfunc's ``predict`` for the same inputs. At start the alias is resolved to a version once; every replica loads that
version (``models:/<name>/<version>``), so a promotion while the server runs changes nothing until it restarts.

Endpoints (`ROUTES`), each answering JSON:

- ``POST /image``: ``{"images": ["<base64 JPEG/PNG/WebP>", ...]}`` (``application/json``), or one encoded image as the
  body (``image/*`` or ``application/octet-stream``);
- ``POST /text``: ``{"texts": ["a photo of a dog", ...]}`` (``application/json``), or one caption as the body
  (``text/plain``, UTF-8);
- ``GET /``: the model served (URI, registered name, alias, version, embedding width) and the endpoints.

An answer is ``{"model": "models:/<name>/<version>", "embeddings": [[float, ...], ...]}``: one L2-normalised float32
embedding per item, in order. A request the server cannot serve gets a 4xx and ``{"error": "<what is wrong>"}``
(`RequestError`): 400 for a body that is not what the endpoint takes (broken JSON, an item that is not base64, not a
readable image or not a string, an empty body), 404 / 405 for another path or method, 413 for more than
``serve.max_items`` items or a body over ``serve.max_body_mb``, 415 for another content type. The replica goes on
serving. Request parsing (`parse_request`) and the service (`EmbeddingService`) do not import Ray, so they are unit
tested without a cluster; `application` wraps the service as a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from clipdr import tracking
from clipdr.config import Config

APP_NAME = "clipdr"  # the Ray Serve application (and the deployment) `clipdr serve` runs
IMAGE_ROUTE = "/image"
TEXT_ROUTE = "/text"
INFO_ROUTE = "/"
IMAGES_KEY = "images"  # the JSON body's list, per route
TEXTS_KEY = "texts"
ERROR_KEY = "error"
ROUTES: dict[str, str] = {IMAGE_ROUTE: IMAGES_KEY, TEXT_ROUTE: TEXTS_KEY}
_RAW_TYPES = {IMAGE_ROUTE: ("image/", "application/octet-stream"), TEXT_ROUTE: ("text/plain",)}


class ServeError(ValueError):
    """A serve setting that cannot work: no model or alias to serve, a port or size out of range."""


class RequestError(ValueError):
    """A request the server cannot serve; ``status`` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_items: int
    max_body_bytes: int


@dataclass(frozen=True)
class ServeSpec:
    """What `serving` starts: a registered version (the alias resolved), where it listens, its replicas."""

    name: str
    alias: str
    version: str
    tracking_uri: str
    host: str
    port: int
    replicas: int
    cpus_per_replica: float
    max_ongoing_requests: int
    limits: Limits

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


def resolve(cfg: Config) -> ServeSpec:
    """The spec of ``cfg.serve``, the alias resolved to a version in the registry of ``cfg.tracking``.

    Raises:
        ServeError: No model named, a model or alias that does not exist, a setting out of range.
    """
    s = cfg.serve
    if not s.model:
        raise ServeError("serve.model: name the registered model to serve, e.g. --set serve.model=clipdr-demo-student")
    if not 0 < s.port < 65536:
        raise ServeError(f"serve.port: expected 1-65535, got {s.port}")
    if s.replicas < 1 or s.max_ongoing_requests < 1 or s.max_items < 1:
        raise ServeError(
            f"serve.replicas, serve.max_ongoing_requests and serve.max_items must be at least 1, got {s.replicas}, "
            f"{s.max_ongoing_requests}, {s.max_items}"
        )
    if s.cpus_per_replica <= 0 or s.max_body_mb <= 0:
        raise ServeError(
            f"serve.cpus_per_replica and serve.max_body_mb must be positive, got {s.cpus_per_replica}, {s.max_body_mb}"
        )
    uri = tracking.tracking_uri(cfg.tracking.uri)
    try:
        version = tracking.get_model_version_by_alias(s.model, s.alias, uri=uri)
    except tracking.RegistryError as e:
        raise ServeError(str(e)) from None
    if version is None:
        raise ServeError(
            f"registered model {s.model!r} has no alias {s.alias!r} ({uri}): promote a version (clipdr promote) or "
            "name another alias (serve.alias)"
        )
    limits = Limits(s.max_items, int(s.max_body_mb * 1024 * 1024))
    return ServeSpec(
        s.model, s.alias, version.version, uri, s.host, s.port, s.replicas, s.cpus_per_replica,
        s.max_ongoing_requests, limits,
    )  # fmt: skip


# --------------------------------------------------------------------------- requests


def parse_request(route: str, content_type: str, body: bytes, limits: Limits) -> list[Any]:
    """The items of a request to ``route``: encoded image bytes for `IMAGE_ROUTE`, strings for `TEXT_ROUTE`.

    Raises:
        RequestError: 400 for a body that is not what the route takes, 413 for too many items or bytes, 415 for
            another content type.
    """
    key, image = ROUTES[route], route == IMAGE_ROUTE
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    media = content_type.split(";")[0].strip().lower()
    raw_types = _RAW_TYPES[route]
    example = f'{{"{key}": ["{"<base64 image>" if image else "<caption>"}", ...]}}'
    if media == "application/json":
        if not body.strip():
            raise RequestError(400, f"empty body: expected JSON {example}")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise RequestError(400, f"body is not valid JSON ({e}): expected {example}") from None
        if not isinstance(payload, dict) or set(payload) != {key}:
            got = f"keys {sorted(payload)}" if isinstance(payload, dict) else f"a JSON {type(payload).__name__}"
            raise RequestError(400, f"expected JSON {example}, got {got}")
        if not isinstance(payload[key], list):
            raise RequestError(400, f"{key!r} must be a list, got {type(payload[key]).__name__}: expected {example}")
        items = payload[key]
        if not items:
            raise RequestError(400, f"{key!r} is empty: expected at least one item")
        if len(items) > limits.max_items:
            raise RequestError(413, f"{len(items)} {key} in one request, over the limit of {limits.max_items}")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                what = "a base64 string of an encoded image" if image else "a string"
                raise RequestError(400, f"{key}[{i}] must be {what}, got {type(item).__name__}")
        return [_base64(item, f"{key}[{i}]") for i, item in enumerate(items)] if image else items
    if any(media.startswith(t) for t in raw_types):
        if not body:
            raise RequestError(400, f"empty body: expected one {'encoded image' if image else 'caption'}")
        if image:
            return [body]
        try:
            return [body.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise RequestError(400, f"text/plain body is not UTF-8 ({e})") from None
    accepted = ", ".join(["application/json", *(f"{t}*" if t.endswith("/") else t for t in raw_types)])
    raise RequestError(415, f"content type {media or 'none'!r} is not served at {route}: send {accepted}")


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where} is not base64 ({e})") from None


# --------------------------------------------------------------------------- the service


class EmbeddingService:
    """The deployment's class: loads the registered version once, then answers requests (`__call__`).

    Args:
        model_uri: ``models:/<name>/<version>``.
        tracking_uri: The registry to load it from (a replica's environment need not name it).
        info: What ``GET /`` answers (name, alias, version).
        limits: What one request may hold.
        num_threads: torch threads of this replica (its reserved CPUs).
    """

    def __init__(self, model_uri: str, tracking_uri: str, info: dict[str, Any], limits: Limits, num_threads: int):
        import torch

        from clipdr.models.embedder import ServedModel

        torch.set_num_threads(max(1, num_threads))
        embedder, _ = tracking.load_model(model_uri, tracking=tracking_uri)
        self.model = ServedModel(embedder)
        self.model_uri = model_uri
        self.limits = limits
        probe = self.embed(TEXT_ROUTE, [""])[0]
        self.info = {**info, "model": model_uri, "embedding_dim": len(probe), "routes": ROUTES, **asdict(limits)}

    def embed(self, route: str, items: list[Any]) -> list[list[float]]:
        """One embedding per item of a request to ``route``, as the pyfunc's ``predict`` gives them; `RequestError`
        400 for an item the served model refuses (e.g. an image that does not decode)."""
        import pandas as pd

        from clipdr.models import embedder  # here: the driver of `clipdr serve` needs no torch

        column, output = (
            (embedder.IMAGE, embedder.IMAGE_EMBEDDING)
            if route == IMAGE_ROUTE
            else (embedder.TEXT, embedder.TEXT_EMBEDDING)
        )
        try:
            answer = self.model.predict(pd.DataFrame({column: items}))
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return list(answer[output])

    async def handle(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """``(status, JSON answer)`` for one request."""
        try:
            path = path.rstrip("/") or INFO_ROUTE
            if path == INFO_ROUTE:
                if method != "GET":
                    raise RequestError(405, f"{INFO_ROUTE} answers GET; POST to {IMAGE_ROUTE} or {TEXT_ROUTE}")
                return 200, self.info
            if path not in ROUTES:
                raise RequestError(404, f"no endpoint {path!r}: POST to {IMAGE_ROUTE} or {TEXT_ROUTE}")
            if method != "POST":
                raise RequestError(405, f"{path} answers POST, got {method}")
            items = parse_request(path, content_type, body, self.limits)
            # The model runs in a thread: the replica's event loop keeps answering (health checks, other requests).
            embeddings = await asyncio.to_thread(self.embed, path, items)
            return 200, {"model": self.model_uri, "embeddings": embeddings}
        except RequestError as e:
            return e.status, {ERROR_KEY: f"{path}: {e}"}

    async def __call__(self, request: Any) -> Any:
        """A Starlette request (what Ray Serve passes to an HTTP deployment) -> a JSON response."""
        from starlette.responses import JSONResponse

        body = await _read_body(request, self.limits.max_body_bytes)
        if body is None:
            status, answer = 413, {ERROR_KEY: f"body over the limit of {self.limits.max_body_bytes} bytes"}
        else:
            content_type = request.headers.get("content-type", "")
            status, answer = await self.handle(request.method, request.url.path, content_type, body)
        return JSONResponse(answer, status_code=status)


async def _read_body(request: Any, limit: int) -> bytes | None:
    """The body, read no further than ``limit`` bytes; None when it is longer."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- Ray Serve


def application(spec: ServeSpec) -> Any:
    """The Ray Serve application of ``spec``: one deployment of `EmbeddingService`, ``spec.replicas`` replicas."""
    from ray import serve

    deployment = serve.deployment(
        EmbeddingService,
        name=APP_NAME,
        num_replicas=spec.replicas,
        ray_actor_options={"num_cpus": spec.cpus_per_replica},
        max_ongoing_requests=spec.max_ongoing_requests,
        max_constructor_retry_count=3,  # a model that does not load fails the start in seconds, not minutes
    )
    info = {"name": spec.name, "alias": spec.alias, "version": spec.version}
    threads = max(1, int(spec.cpus_per_replica))
    return deployment.bind(spec.model_uri, spec.tracking_uri, info, spec.limits, threads)


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def serving(spec: ServeSpec) -> Iterator[str]:
    """Serves ``spec`` on the Ray of ``RAY_ADDRESS`` (else a local one) until the block ends; yields its URL.

    Returns once every replica has loaded the model. At the end the application is deleted, Ray Serve shut down if
    this call started it (a Serve already running on the cluster keeps running, with its own proxy address), and a
    local Ray this call started is stopped.
    """
    import ray
    from ray import serve

    from clipdr.cluster import ensure_ray

    owns_ray = not ray.is_initialized()
    ensure_ray()
    owns_serve = not _serve_running()
    try:
        serve.start(http_options={"host": spec.host, "port": spec.port})
        serve.run(application(spec), name=APP_NAME, route_prefix="/")
        yield spec.url
    finally:
        try:
            if owns_serve:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if owns_ray:
                ray.shutdown()


@contextlib.contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (handlers installed from the main thread only, restored at the end)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run(cfg: Config, log: Callable[[str], None] = print) -> None:
    """`clipdr serve`: serves ``cfg.serve.model``'s alias until SIGINT or SIGTERM."""
    import ray

    from clipdr.cluster import ensure_ray

    spec = resolve(cfg)
    owns_ray = not ray.is_initialized()
    # Joined first: joining Ray installs a SIGTERM handler that aborts the process; ours replaces it, so that
    # SIGTERM shuts Serve down as SIGINT does.
    ensure_ray()
    try:
        with _until_signalled() as stop:
            log(f"starting {spec.model_uri} ({spec.name}@{spec.alias}) on Ray Serve, {spec.replicas} replica(s)")
            with serving(spec) as url:
                log(
                    f"serving {spec.model_uri} at {url}: POST {url}{IMAGE_ROUTE} {{{IMAGES_KEY!r}: [...]}}, "
                    f"POST {url}{TEXT_ROUTE} {{{TEXTS_KEY!r}: [...]}}; SIGINT or SIGTERM stops it"
                )
                while not stop.wait(1.0):
                    pass
                log("stopping")
    finally:
        if owns_ray:
            ray.shutdown()
