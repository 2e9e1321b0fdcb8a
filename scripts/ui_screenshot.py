"""A PNG of the MLflow UI's chart view of an experiment, as a user sees it, made with headless Chromium.

Starts ``mlflow server`` on 127.0.0.1 (a free port) over a tracking store, opens the experiment's runs page in chart
mode with the runs filtered (by default the demo's students, ``run_name LIKE 'student-%'``), lets Chromium render it
for ``--wait`` seconds of virtual time (the page's API calls are waited for, then the charts draw), saves the PNG and
stops the server by its process group. docs/demo.md shows the result and says which chart to read.

Needs Chromium (Debian: ``apt-get install -y chromium``); the test suite does not, it checks the URL and the
refusals only (tests/unit/test_ui_screenshot.py).

    python scripts/ui_screenshot.py --store sqlite:///$PWD/mlflow.db --experiment clipdr-demo \\
        --output docs/demo/mlflow_charts.png
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
STUDENTS = "attributes.run_name LIKE 'student-%'"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit``, else the first of `CHROMIUM_NAMES` on the PATH."""
    found = shutil.which(explicit) if explicit else next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found is None:
        raise SystemExit(
            f"no Chromium found ({explicit or ', '.join(CHROMIUM_NAMES)}); on Debian: apt-get install -y chromium"
        )
    return found


def chart_url(base: str, experiment_id: str, search_filter: str) -> str:
    """The experiment's runs page in chart mode, showing the runs ``search_filter`` selects (MLflow 3's URL state:
    ``compareRunsMode`` and ``searchFilter`` in the hash route's query)."""
    query = urllib.parse.urlencode({"searchFilter": search_filter, "compareRunsMode": "CHART"})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def wait_until_up(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited with status {server.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"mlflow server did not answer {base}/health within {timeout_s:.0f} s")


def experiment_id(base: str, name: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        return _get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as e:
        raise SystemExit(f"the store has no experiment {name!r} ({e.code})") from None


def _above(fd: int, lowest: int = 10) -> int:
    """A close-on-exec copy of ``fd`` numbered ``lowest`` or more; ``fd`` itself is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads
    commands on fd 3 and writes replies on fd 4, NUL-terminated JSON), so no driver package is needed."""

    def __init__(self, chromium: str, width: int, height: int, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends above fd 4: dup2 onto 3 and 4 must not overwrite one with the other, and dup2 of an fd
        # onto itself would leave it close-on-exec.
        to_browser_r, from_browser_w = _above(to_browser_r), _above(from_browser_w)

        def as_fds_3_and_4() -> None:  # in the child, before exec; dup2's copies are inheritable
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        command = [
            chromium,
            "--headless=new",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # close_fds=False: Popen would close fds 3 and 4 after preexec_fn; the pipes' own ends are close-on-exec.
        self.process = subprocess.Popen(
            command, preexec_fn=as_fds_3_and_4, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, **params: object) -> dict:
        """Sends one command (to the attached page, once there is one) and returns its result."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:  # events arrive interleaved with replies: skip them
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise SystemExit(f"chromium closed the DevTools pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise SystemExit(f"chromium refused {method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise SystemExit(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise SystemExit(f"the page did not show {what} within {timeout_s:.0f} s")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


# Types into the chart view's "Search metric charts" box as a user would: React reads the value through the
# input's native setter and an input event.
_SEARCH_CHARTS = """(() => {
  const box = document.querySelector('input[placeholder="Search metric charts"]');
  if (!box) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, %s);
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
})()"""
# Closes the assistant side panel, which MLflow 3 opens by default: it is not part of the comparison.
_CLOSE_ASSISTANT = """(() => {
  for (const close of document.querySelectorAll('button[aria-label="Close"]')) {
    let panel = close;
    for (let i = 0; i < 12 && panel; i++, panel = panel.parentElement) {
      if (panel.textContent.includes('MLflow Assistant')) { close.click(); return true; }
    }
  }
  return false;
})()"""
# The filter selects the students, and the UI lists their parent run (the study) with them, collapsed, its children
# hidden. Expands every parent (the +/- button of a run-name cell with children) and hides it (the row's eye), so the
# charts show the children's lines, not the parent's summary bars. Returns how many rows the table shows (0 while it
# has not drawn yet; a store without nested runs has no parent to expand).
_EXPAND_AND_HIDE_PARENTS = """(() => {
  const expanders = [...document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')];
  for (const button of expanders) {
    if (button.querySelector('path[d^="M7.25 7.25"]')) button.click();  // the "+" icon: collapsed
    const row = button.closest('[role=row]');
    const eye = row && row.querySelector('input.is-visibility-toggle-checkbox');
    if (eye && eye.checked) eye.closest('label').click();
  }
  return document.querySelectorAll('.ag-pinned-left-cols-container [role=row]').length;
})()"""
# The chart of the metric, full screen: room for the legend of every run.
_FULL_SCREEN = """(() => {
  const button = document.querySelector('button[data-component-id="fullscreen_button_chartcard"]');
  if (button) button.click();
  return Boolean(button);
})()"""
# Rendered: one Plotly chart per matching metric, each with a line per run, and no spinner left.
_CHARTS_DRAWN = """(() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const lines = plots.map(p => p.querySelectorAll('.scatterlayer .trace').length);
  return plots.length > 0 && lines.every(n => n >= %d) && !document.querySelector('[role="progressbar"]');
})()"""


def screenshot(
    chromium: str, url: str, output: Path, *, metric: str, num_runs: int, width: int, height: int, wait_s: float
) -> None:
    """Opens ``url`` in headless Chromium, narrows the charts to ``metric``, waits until every chart has drawn a
    line per run, and saves the page as a PNG."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as profile:
        browser = Browser(chromium, width, height, profile)
        try:
            browser.open(url)
            browser.wait_for(_SEARCH_CHARTS % json.dumps(metric), "the chart view's search box", wait_s)
            browser.evaluate(_CLOSE_ASSISTANT)
            browser.wait_for(_EXPAND_AND_HIDE_PARENTS, "the runs table", wait_s)
            browser.wait_for(_CHARTS_DRAWN % num_runs, f"a drawn chart of {metric!r} with {num_runs} runs", wait_s)
            browser.evaluate(_FULL_SCREEN)
            time.sleep(2.0)  # Plotly's resize after the panel closed and the chart opened full screen
            png = browser.screenshot()
        finally:
            browser.close()
    if not png.startswith(_PNG_MAGIC):
        raise SystemExit("chromium returned no PNG")
    output.write_bytes(png)


def count_runs(base: str, experiment: str, search_filter: str) -> int:
    body = json.dumps({"experiment_ids": [experiment], "filter": search_filter, "max_results": 1000}).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.loads(response.read()).get("runs", []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///$PWD/mlflow.db")
    parser.add_argument("--experiment", default="clipdr-demo", help="experiment name")
    parser.add_argument("--filter", default=STUDENTS, help="MLflow search filter of the runs shown")
    parser.add_argument("--metric", default="zeroshot/mean_top1", help="the charts shown: metric names containing it")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=180.0, help="seconds the page may take to show its charts")
    parser.add_argument("--chromium", help="Chromium executable (default: the first of chromium, chromium-browser)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chromium = find_chromium(args.chromium)  # before anything starts: fail fast without it
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # Its own session: the server's workers share its process group, which is stopped as one below.
    server = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    print(f"mlflow server pid {server.pid} on {base}")
    try:
        wait_until_up(base, server, timeout_s=600)  # minutes on a loaded 2-core machine
        experiment = experiment_id(base, args.experiment)
        num_runs = count_runs(base, experiment, args.filter)
        if num_runs == 0:
            raise SystemExit(f"no run of experiment {args.experiment!r} matches {args.filter!r}")
        url = chart_url(base, experiment, args.filter)
        print(f"rendering {url} ({num_runs} runs, charts of {args.metric!r})")
        screenshot(
            chromium, url, args.output, metric=args.metric, num_runs=num_runs, width=args.width,
            height=args.height, wait_s=args.wait,
        )  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
