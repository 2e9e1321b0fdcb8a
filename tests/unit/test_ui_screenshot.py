"""scripts/ui_screenshot.py without Chromium: the chart view's URL, and the refusal before anything starts."""

from __future__ import annotations

import runpy
import subprocess
import urllib.parse
from pathlib import Path

import pytest

SCRIPT = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "ui_screenshot.py"))


def test_the_url_opens_the_experiments_chart_view_on_the_students():
    url = SCRIPT["chart_url"]("http://127.0.0.1:5123", "7", SCRIPT["STUDENTS"])
    route, _, query = url.partition("?")
    assert route == "http://127.0.0.1:5123/#/experiments/7/runs"
    assert urllib.parse.parse_qs(query) == {
        "searchFilter": ["attributes.run_name LIKE 'student-%'"],
        "compareRunsMode": ["CHART"],
    }


def test_without_chromium_it_stops_before_starting_a_server(monkeypatch, tmp_path):
    def no_server(*args, **kwargs):
        raise AssertionError("no server may start without a browser to look at it")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    argv = ["--store", f"sqlite:///{tmp_path}/m.db", "--output", str(tmp_path / "x.png"), "--chromium", "no-such-x"]
    with pytest.raises(SystemExit, match="apt-get install -y chromium"):
        SCRIPT["main"](argv)
    assert not (tmp_path / "x.png").exists()
