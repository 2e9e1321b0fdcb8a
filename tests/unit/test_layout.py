"""Guards on the repository's shape."""

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_folder_never_becomes_a_package():
    # A package named `platform` would shadow the standard library module of the same name.
    assert not (REPO / "platform" / "__init__.py").exists()
    assert Path(platform.__file__).parent == Path(os.__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", "import platform, clipdr; print(platform.python_version(), clipdr.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(platform.python_version())
    assert "platform/clipdr/__init__.py" in out


def test_core_layers_do_not_import_ray_or_mlflow():
    # L0/L1 modules must import without starting Ray or MLflow, so unit tests stay fast.
    code = (
        "import sys, clipdr.config, clipdr.storage, clipdr.records, clipdr.augment, clipdr.data.sources, "
        "clipdr.data.synthetic, clipdr.checkpoint, clipdr.runstate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
