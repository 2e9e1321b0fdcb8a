"""`clipdr serve`'s requests and settings without Ray: what each endpoint takes, and the 4xx of what it does not.

The deployment itself (Ray Serve, real HTTP, embeddings against the registered pyfunc) is tested in
tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from clipdr import serving
from clipdr.config import load_config
from clipdr.models import embedder

LIMITS = serving.Limits(max_items=3, max_body_bytes=1000)
PNG = b"\x89PNG\r\n\x1a\n...the rest"  # parsing does not decode images: the served model does


def parse(route: str, content_type: str, body: bytes | dict) -> list:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return serving.parse_request(route, content_type, data, LIMITS)


def test_each_endpoint_takes_a_json_list_or_one_raw_item():
    b64 = base64.b64encode(PNG).decode()
    assert parse(serving.IMAGE_ROUTE, "application/json", {"images": [b64, b64]}) == [PNG, PNG]
    assert parse(serving.IMAGE_ROUTE, "image/png", PNG) == [PNG]
    assert parse(serving.IMAGE_ROUTE, "application/octet-stream", PNG) == [PNG]
    assert parse(serving.TEXT_ROUTE, "application/json; charset=utf-8", {"texts": ["a dog", ""]}) == ["a dog", ""]
    assert parse(serving.TEXT_ROUTE, "text/plain; charset=utf-8", "un chien, ça".encode()) == ["un chien, ça"]


@pytest.mark.parametrize(
    ("route", "content_type", "body", "status", "says"),
    [
        (serving.IMAGE_ROUTE, "application/json", {"images": ["%%% not base64"]}, 400, "images[0] is not base64"),
        (serving.IMAGE_ROUTE, "application/json", {"images": ["aGk=", 7]}, 400, "images[1] must be a base64 string"),
        (serving.IMAGE_ROUTE, "application/json", {"pictures": ["aGk="]}, 400, "got keys ['pictures']"),
        (serving.IMAGE_ROUTE, "application/json", {"images": []}, 400, "'images' is empty"),
        (serving.IMAGE_ROUTE, "image/jpeg", b"", 400, "empty body: expected one encoded image"),
        (serving.IMAGE_ROUTE, "text/plain", b"a dog", 415, "send application/json, image/*"),
        (serving.TEXT_ROUTE, "application/json", b"", 400, 'empty body: expected JSON {"texts"'),
        (serving.TEXT_ROUTE, "application/json", b'{"texts": ["a dog"', 400, "not valid JSON"),
        (serving.TEXT_ROUTE, "application/json", b'["a dog"]', 400, "got a JSON list"),
        (serving.TEXT_ROUTE, "application/json", {"texts": "a dog"}, 400, "'texts' must be a list, got str"),
        (serving.TEXT_ROUTE, "application/json", {"texts": ["a", None]}, 400, "texts[1] must be a string"),
        (serving.TEXT_ROUTE, "application/json", {"texts": ["a"] * 4}, 413, "4 texts in one request"),
        (serving.TEXT_ROUTE, "text/plain", b"\xff\xfe", 400, "not UTF-8"),
        (serving.TEXT_ROUTE, "", b"a dog", 415, "content type 'none'"),
        (serving.TEXT_ROUTE, "text/plain", b"x" * 1001, 413, "over the limit of 1000"),
    ],
)
def test_a_malformed_request_is_refused_with_its_status_and_what_is_wrong(route, content_type, body, status, says):
    with pytest.raises(serving.RequestError) as refused:
        parse(route, content_type, body)
    assert refused.value.status == status
    assert says in str(refused.value)


class _Model:
    """A stand-in for the served model: refuses what `ServedModel` refuses, else a fixed embedding per item."""

    def predict(self, frame):
        import pandas as pd

        column = frame.columns[0]
        if any(item == b"not an image" for item in frame[column]):
            raise ValueError("row 0: 'image' is not a readable JPEG, PNG or WebP image (corrupt_image)")
        out = [[1.0, 0.0]] * len(frame)
        empty = [None] * len(frame)
        image = column == embedder.IMAGE
        return pd.DataFrame(
            {embedder.IMAGE_EMBEDDING: out if image else empty, embedder.TEXT_EMBEDDING: empty if image else out}
        )


def handle(method: str, path: str, content_type: str = "", body: bytes = b"") -> tuple[int, dict]:
    service = serving.EmbeddingService.__new__(serving.EmbeddingService)  # no registry: the model is a stand-in
    service.model, service.model_uri, service.limits = _Model(), "models:/student/3", LIMITS
    service.info = {"model": service.model_uri}
    return asyncio.run(service.handle(method, path, content_type, body))


def test_the_service_routes_and_answers_every_refusal_as_json_with_the_endpoint():
    assert handle("POST", "/text", "application/json", b'{"texts": ["a", "b"]}') == (
        200,
        {"model": "models:/student/3", "embeddings": [[1.0, 0.0], [1.0, 0.0]]},
    )
    assert handle("GET", "/") == (200, {"model": "models:/student/3"})
    status, answer = handle("POST", "/image", "image/png", b"not an image")  # the served model's refusal
    assert (status, answer) == (400, {"error": "/image: row 0: 'image' is not a readable JPEG, PNG or WebP image "
                                      "(corrupt_image)"})  # fmt: skip
    assert handle("POST", "/embed", "application/json", b"{}")[0] == 404
    assert handle("GET", "/text")[0] == 405
    assert handle("POST", "/")[0] == 405


def test_serve_settings_are_checked_before_anything_starts():
    with pytest.raises(serving.ServeError, match=r"serve\.model: name the registered model"):
        serving.resolve(load_config(None, []))
    with pytest.raises(serving.ServeError, match=r"serve\.port: expected 1-65535"):
        serving.resolve(load_config(None, ["serve.model=student", "serve.port=0"]))
    with pytest.raises(serving.ServeError, match="must be at least 1"):
        serving.resolve(load_config(None, ["serve.model=student", "serve.max_items=0"]))
