"""The Aim UI shows a tiny run and its loss curves, seen in headless Chromium.

Starts `aim up` on the run's repository, opens the run's Metrics tab with
tests/browser/aim_ui.js (playwright-core driving Debian's chromium) and keeps its screenshot at
.pytest_cache/aim_ui.png. Where chromium or playwright-core is absent it skips on a developer
machine (install by hand: `apt-get install chromium` and `npm ci --prefix tests/browser`) and
fails under CI (CI=true, which `.ci/run` sets after installing both).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, TINY, tiny_config

CHROMIUM = "/usr/bin/chromium"
BROWSER_DIR = os.path.join(ROOT, "tests", "browser")
AIM = os.path.join(os.path.dirname(sys.executable), "aim")
SCREENSHOT_COPY = os.path.join(ROOT, ".pytest_cache", "aim_ui.png")


def missing_tools() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "playwright-core")):
        return "playwright-core is missing (npm ci --prefix tests/browser)"
    if shutil.which("node") is None:
        return "node is missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_run(server: subprocess.Popen, url: str, run_hash: str, log_path: str,
                 timeout: float = 60) -> None:
    """Until `aim up` serves the run's info (its start takes ~15 s on two cores)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"aim up exited with {server.returncode}:\n{open(log_path).read()}")
        try:
            with urllib.request.urlopen(f"{url}/api/runs/{run_hash}/info/", timeout=5):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.5)
    pytest.fail(f"aim up did not serve run {run_hash} within {timeout} s:\n"
                f"{open(log_path).read()}")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(group) == pgid and state != "Z":
            members.append(int(pid))
    return members


def stop_group(server: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the whole group, SIGKILL to what outlives it: `aim up` runs the server in
    uvicorn workers that stay up when only the parent is stopped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None and not group_members(server.pid):
                return
            time.sleep(0.2)
    server.wait(timeout)


def test_aim_ui_shows_run_and_loss_curves(tmp_path):
    reason = missing_tools()
    if reason and os.environ.get("CI") == "true":  # .ci/run installs both: a skip hides a bug
        pytest.fail(f"CI=true, but the browser test cannot run: {reason}")
    if reason:
        pytest.skip(f"browser test needs chromium and playwright-core: {reason}")
    import aim
    import train

    config = tiny_config(tmp_path, max_iters=20, eval_interval=10, aim=True)
    aim.Repo.from_path(str(tmp_path), init=True)  # aim up needs the repository to exist
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path / "aim_up.log")
    screenshot = str(tmp_path / "aim_ui.png")
    with open(log_path, "w") as log:
        # Its own process group, so that the server and its workers all stop together.
        # Started before training: its ~15 s start overlaps the run's.
        server = subprocess.Popen(
            [AIM, "up", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--repo", str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        meta = train.train(config, TINY)
        wait_for_run(server, url, meta["run_hash"], log_path)
        browser = subprocess.run(
            ["node", os.path.join(BROWSER_DIR, "aim_ui.js"), url, meta["run_hash"], screenshot],
            cwd=BROWSER_DIR, capture_output=True, text=True, timeout=150)
    finally:
        stop_group(server)
    if os.path.exists(screenshot):
        os.makedirs(os.path.dirname(SCREENSHOT_COPY), exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT_COPY)
    assert browser.returncode == 0, browser.stdout + browser.stderr
    assert not group_members(server.pid), "aim up left processes running"
    assert not listening(port), f"something still listens on port {port} after aim up stopped"
