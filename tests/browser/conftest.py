"""Browser tests: one JupyterLab on loopback (a free port, Galata's test configuration), one headless Debian
chromium driven by Python playwright, one notebook holding every widget. Any request to a non-loopback host is
aborted and fails the test; so does any console error. Screenshots go to build/browser-screenshots/.

Enable on Debian (as root): `apt-get install -y chromium` and `pip install playwright` (the dev extra has it);
never `playwright install` (its browser download is not needed). Without them these tests skip, except under
CI=true, where a missing browser is a failure."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "build" / "browser-screenshots"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
HOW = ("browser tests need Debian's chromium and Python playwright: `apt-get install -y chromium` and "
       "`pip install playwright` (or ./run.sh test, which installs both as root on Debian); never run "
       "`playwright install`")


def _chromium() -> str | None:
    for name in (os.environ.get("TOOLKIT_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _need_browser() -> str:
    exe = _chromium()
    try:
        import playwright  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the browser stage cannot run: {HOW}")
        pytest.skip(HOW)
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOTEBOOK_CELLS = [
    """\
    import functools
    from tests.widgets import backends as B
    from widgets import FeatureExplorer, ModelDiffExplorer, SteeringPanel
    store = B.FeatureBackend(65_536)
    slow = {"delay": 0.0}
    def gen(items, prompt, cancel=None):
        return B.fake_generate(items, prompt, delay=slow["delay"], cancel=cancel)
    panel = SteeringPanel(B.STEER_ITEMS, gen, to_code=B.fake_to_code, sweep=B.fake_sweep, prompt="Once upon a time")
    fx = FeatureExplorer.from_store(store, text_fn=store.text_fn, title="Fixture SAE (65,536 latents)")
    fx.link_steering(panel, site="blocks.6.resid_post", strength=1.0)
    dx = ModelDiffExplorer.from_table(B.DiffTableLike(4096), B.diff_details, title="Fixture crosscoder (4,096 latents)")
    """,
    "fx",
    "dx",
    "panel",
]


def _notebook(cells: list[str]) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                       "source": textwrap.dedent(c)} for i, c in enumerate(cells)]}


SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


@pytest.fixture(scope="session")
def lab():
    """A JupyterLab server on 127.0.0.1:<free port> serving a temp folder; yields (url, root, runtime_dir)."""
    _need_browser()
    tmp = Path(tempfile.mkdtemp(prefix="tk-browser-"))
    root, runtime, cfg, settings = tmp / "root", tmp / "runtime", tmp / "config", tmp / "settings"
    for d in (root, runtime, cfg, settings):
        d.mkdir()
    for name, value in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    port = _free_port()
    (cfg / "jupyter_server_config.py").write_text(textwrap.dedent(f"""\
        from jupyterlab.galata import configure_jupyter_server
        configure_jupyter_server(c)
        c.ServerApp.ip = "127.0.0.1"
        c.ServerApp.port = {port}
        c.ServerApp.root_dir = {str(root)!r}
        c.LabServerApp.user_settings_dir = {str(settings)!r}
        c.LabApp.news_url = None
        c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
        c.LabApp.expose_app_in_browser = True
        """))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(cfg), "JUPYTER_RUNTIME_DIR": str(runtime),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"JupyterLab did not start: {(tmp / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.5)
    try:
        yield {"url": url, "root": root, "runtime": runtime}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser(lab):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=_need_browser(), headless=True, args=FLAGS)
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class Page:
    """The notebook page plus what it did: requests outside loopback, console errors, and a kernel client."""

    def __init__(self, page, lab) -> None:
        self.page, self.lab = page, lab
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.kc = None

    def kernel(self, code: str, timeout: float = 60) -> str:
        """Run `code` in the notebook's kernel (as a new cell would) and return what it printed."""
        if self.kc is None:
            kid = self.page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
            self.kc = _kernel_client(self.lab, kid)
        out: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        return text

    def shot(self, locator, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        locator.screenshot(path=str(path))
        return path


def _kernel_client(lab, kernel_id: str):
    """A second client on the notebook's kernel (its connection file is in the server's runtime dir)."""
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient(connection_file=str(lab["runtime"] / f"kernel-{kernel_id}.json"))
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return kc


def open_notebook(browser, lab, name: str, cells: list[str], ready: str, timeout_ms: int = 180_000) -> Page:
    """Write a notebook, open it in JupyterLab, run all cells and wait until `ready` (a selector) shows."""
    (lab["root"] / name).write_text(json.dumps(_notebook(cells)))
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    p = Page(page, lab)

    def route(r):
        host = urlparse(r.request.url).hostname or ""
        p.requests.append(r.request.url)
        if r.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            r.continue_()
        else:
            p.blocked.append(r.request.url)
            r.abort()

    ctx.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and p.errors.append(m.text))
    page.on("pageerror", lambda e: p.errors.append(f"page error: {e}"))
    t0 = time.monotonic()
    # a workspace of its own, reset: only this notebook is open (no tabs restored from an earlier page)
    page.goto(f"{lab['url']}/lab/workspaces/{Path(name).stem}/tree/{name}?reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_ms)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel",
                           timeout=timeout_ms)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(ready, timeout=timeout_ms)
    p.open_s = time.monotonic() - t0
    return p


def close(p: Page) -> None:
    if p.kc is not None:
        p.kc.stop_channels()
    try:  # shut the kernel down (frees the model's memory); the page may already be gone after a failure
        p.page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    finally:
        p.page.context.close()


def check_clean(p: Page) -> None:
    """Fail on any request that left loopback or any console error since the last check."""
    blocked, errors = list(p.blocked), list(p.errors)
    p.blocked.clear()
    p.errors.clear()
    assert not blocked, f"the page tried to reach the network: {blocked}"
    assert not errors, f"console errors: {errors}"


@pytest.fixture(scope="session")
def fixture_page(browser, lab):
    """The notebook with the three widgets over the deterministic fixture backends."""
    p = open_notebook(browser, lab, "widgets.ipynb", NOTEBOOK_CELLS,
                      '.tk-fx[data-ready="1"] >> nth=0')
    p.page.wait_for_selector('.tk-diff[data-ready="1"]')
    p.page.wait_for_selector('.tk-steer[data-ready="1"]')
    assert len(p.requests) > 20, "the request recorder saw nothing: is routing on?"
    print(f"\n[browser] notebook open → three widgets rendered: {p.open_s:.1f} s ({len(p.requests)} requests, "
          f"all loopback)")
    yield p
    close(p)


@pytest.fixture
def page(fixture_page):
    """The fixture page; after each test: no request left loopback and the console logged no error."""
    yield fixture_page
    check_clean(fixture_page)
