"""Shared by the infra checks: where infra/ lives, its parsed Terraform, and external tools (skip here, fail in CI)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
TERRAFORM = INFRA / "terraform"
_HCL = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def require_tool(name: str, *candidates: Path) -> str:
    """The path of an external tool; a missing one skips the test locally and fails it in CI (CI=true)."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (looked in {', '.join(map(str, candidates)) or 'nothing'} and on PATH)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}: CI must run this check")
    pytest.skip(message)


def tool_venv_bin(name: str) -> list[Path]:
    """Where the project keeps tools whose dependencies conflict with the pinned stack (see Makefile)."""
    return [REPO / ".venv-tools" / "bin" / name, Path(sys.executable).with_name(name)]


@pytest.fixture(scope="session")
def terraform_files() -> dict[Path, dict[str, Any]]:
    """Every .tf file under infra/terraform, parsed (string quotes stripped, blocks as plain dicts)."""
    parsed = {}
    for path in sorted(TERRAFORM.rglob("*.tf")):
        with path.open() as f:
            parsed[path.relative_to(TERRAFORM)] = hcl2.load(f, serialization_options=_HCL)
    assert parsed, f"no Terraform files under {TERRAFORM}"
    return parsed


def blocks(files: dict[Path, dict[str, Any]], kind: str) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """``(file, name, body)`` of every top-level ``kind`` block (variable, module, output...)."""
    for path, doc in files.items():
        for entry in doc.get(kind, []):
            for name, body in entry.items():
                yield path, name, body


def typed_blocks(files: dict[Path, dict[str, Any]], kind: str, type_: str) -> Iterator[tuple[Path, str, dict]]:
    """``(file, name, body)`` of every ``kind "type_" "name"`` block (resource, data, ephemeral)."""
    for path, doc in files.items():
        for entry in doc.get(kind, []):
            for name, body in entry.get(type_, {}).items():
                yield path, name, body
