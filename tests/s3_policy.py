"""What the jobs' IAM role may do on S3, checked against the requests a job really made.

The S3 client of the jobs is the AWS SDK for C++ inside pyarrow, so requests are seen where they arrive: the moto
server's request log (one line a request: method, path, query, status). Each request is mapped to the IAM
authorisations S3 needs for it, and each authorisation is evaluated against the statements of the jobs' policy as
written in infra/terraform/modules/kuberay/main.tf (parsed with python-hcl2, its locals and variables filled in).

The evaluator knows what the policy uses (Allow statements; exact or wildcard actions and resources; StringLike,
StringEquals and Null conditions) and fails on anything else, so a policy it cannot read is an error, not a pass.
What a log line does not show is not checked: the source of a CopyObject (it also needs s3:GetObject there) and the
keys of a multi-object delete (refused as unmapped).
"""

from __future__ import annotations

import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "infra/terraform/modules/kuberay/main.tf"
# pyarrow's S3FileSystem asks HeadBucket of this name once, expecting an error whose kind tells AWS from MinIO
# (arrow/cpp/src/arrow/filesystem/s3fs.cc, Impl::GetBackend): any answer, a refusal included, is fine.
BACKEND_PROBE_BUCKET = "$extremelyunlikelytoexist$"

_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFERENCE = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class S3Call:
    method: str
    bucket: str
    key: str  # "" for a request on the bucket itself
    query: dict[str, str]
    status: int

    def __str__(self) -> str:
        query = f"?{urllib.parse.urlencode(self.query)}" if self.query else ""
        return f"{self.method} /{self.bucket}/{self.key}{query} ({self.status})"


@dataclass(frozen=True)
class Need:
    """One authorisation S3 checks for a request: ``action`` on ``resource`` with the request's condition keys."""

    action: str
    resource: str
    context: dict[str, str] = field(default_factory=dict)


class Unmapped(ValueError):
    """A request this module does not know the IAM actions of: add it to `needs` rather than skip it."""


def parse_log(text: str) -> list[S3Call]:
    calls = []
    for line in _ANSI.sub("", text).splitlines():
        match = _LINE.search(line)
        if match is None:
            continue
        target = urllib.parse.urlsplit(match["target"])
        path = urllib.parse.unquote(target.path)
        if path.startswith("/moto-api/"):
            continue
        bucket, _, key = path.lstrip("/").partition("/")
        query = dict(urllib.parse.parse_qsl(target.query, keep_blank_values=True))
        calls.append(S3Call(match["method"], bucket, key, query, int(match["status"])))
    return calls


@contextmanager
def recorded_calls(endpoint: str, log: Path, timeout_s: float = 10.0) -> Iterator[list[S3Call]]:
    """Yields a list that holds, once the block is over, every S3 request the server answered during it."""
    start = log.stat().st_size
    calls: list[S3Call] = []
    yield calls
    # The server writes a request's line after answering it: a marker request answered after the block's last
    # one says that their lines are in.
    mark = uuid.uuid4().hex
    urllib.request.urlopen(f"{endpoint}/moto-api/?mark={mark}", timeout=timeout_s).close()
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_bytes()[start:].decode(errors="replace")
        if mark in text:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the marker request never reached {log}")
        time.sleep(0.05)
    calls.extend(parse_log(text[: text.index(mark)].rpartition("\n")[0]))


def needs(call: S3Call) -> list[Need]:
    """The IAM authorisations S3 checks for ``call`` (path-style requests, as pyarrow sends to an endpoint)."""
    bucket_arn = f"arn:aws:s3:::{call.bucket}"
    q, method = call.query, call.method
    if not call.key:
        if method == "HEAD":  # HeadBucket
            return [Need("s3:ListBucket", bucket_arn)]
        if method == "GET" and not ({"uploads", "location", "versions", "policy", "acl"} & q.keys()):
            # ListObjects(V2): the prefix is the s3:prefix condition key, absent when the request has none.
            return [Need("s3:ListBucket", bucket_arn, {"s3:prefix": q["prefix"]} if "prefix" in q else {})]
        if method == "GET" and "uploads" in q:
            return [Need("s3:ListBucketMultipartUploads", bucket_arn)]
        if method == "GET" and "location" in q:
            return [Need("s3:GetBucketLocation", bucket_arn)]
        if method == "PUT" and not q:
            return [Need("s3:CreateBucket", bucket_arn)]
        raise Unmapped(f"{call}: no IAM mapping for this bucket request")
    object_arn = f"{bucket_arn}/{call.key}"
    if method in ("HEAD", "GET") and "uploadId" not in q:
        found = [Need("s3:GetObject", object_arn)]
        # A missing key answers 404 only to a caller that may list the bucket, else 403: a "not found" the caller
        # relies on (pyarrow's get_file_info) needs s3:ListBucket too, evaluated without a prefix.
        return [*found, Need("s3:ListBucket", bucket_arn)] if call.status == 404 else found
    if method == "GET" and "uploadId" in q:
        return [Need("s3:ListMultipartUploadParts", object_arn)]
    if method == "DELETE":
        return [Need("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject", object_arn)]
    if method == "POST" and ("uploads" in q or "uploadId" in q):  # create / complete a multipart upload
        return [Need("s3:PutObject", object_arn)]
    if method == "PUT" and (not q or {"partNumber", "uploadId"} <= q.keys()):  # PutObject, CopyObject, UploadPart
        return [Need("s3:PutObject", object_arn)]
    raise Unmapped(f"{call}: no IAM mapping for this object request")


def _wildcard(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _condition_holds(condition: dict[str, Any], context: dict[str, str]) -> bool:
    test, key, values = condition["test"], condition["variable"], condition["values"]
    if not isinstance(values, list):
        raise ValueError(f"condition values {values!r} are an expression: write them as a literal list")
    if test == "Null":
        return (key not in context) == (values == ["true"])
    if key not in context:
        return False
    if test == "StringLike":
        return any(_wildcard(v, context[key]) for v in values)
    if test == "StringEquals":
        return context[key] in values
    raise ValueError(f"condition test {test} is not understood here: extend tests/s3_policy.py")


def allows(statements: list[dict[str, Any]], need: Need) -> bool:
    for statement in statements:
        if statement.get("effect", "Allow") != "Allow":
            raise ValueError(f"statement {statement.get('sid')}: only Allow statements are understood here")
        if not any(_wildcard(a, need.action) for a in statement["actions"]):
            continue
        if not any(_wildcard(r, need.resource) for r in statement["resources"]):
            continue
        if all(_condition_holds(c, need.context) for c in statement.get("condition", [])):
            return True
    return False


def _interpolate(text: str, values: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        if match[1] not in values:
            raise ValueError(f"{text!r}: {match[1]} cannot be evaluated here: write a literal or a local")
        return values[match[1]]

    return _REFERENCE.sub(value, text)


def jobs_policy(data_bucket: str, checkpoints_bucket: str) -> list[dict[str, Any]]:
    """The S3 statements of the jobs' policy document for these buckets, as Terraform would render them."""
    options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    with KUBERAY.open() as f:
        module = hcl2.load(f, serialization_options=options)
    values = {
        "data.aws_partition.current.partition": "aws",
        "var.data_bucket": data_bucket,
        "var.checkpoints_bucket": checkpoints_bucket,
    }
    for block in module["locals"]:
        for name in ("data_arn", "checkpoints_arn"):
            if name in block:
                values[f"local.{name}"] = _interpolate(block[name], values)
    documents = [block.get("aws_iam_policy_document", {}) for block in module["data"]]
    (document,) = [d["jobs"] for d in documents if "jobs" in d]
    statements = []
    for statement in document["statement"]:
        if not any(a.startswith("s3:") for a in statement["actions"]):
            continue
        resolved = dict(statement, resources=[_interpolate(r, values) for r in statement["resources"]])
        statements.append(resolved)
    return statements


def refused(calls: list[S3Call], statements: list[dict[str, Any]], buckets: set[str]) -> list[str]:
    """What the policy would refuse among ``calls`` to ``buckets`` (the backend probe aside), one line each."""
    lines = []
    for call in calls:
        if call.bucket == BACKEND_PROBE_BUCKET or call.bucket not in buckets:
            continue
        for need in needs(call):
            if not allows(statements, need):
                lines.append(f"{call}: needs {need.action} on {need.resource} with {need.context or 'no prefix'}")
    return lines
