"""The live page at ``/`` in headless Chromium: it shows a running task, whose id the
test reads from the page's DOM as the browser built it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import mounted
from tests.test_http import free_port
from tests.test_http_keys import KEY_A, write_keys

pytestmark = [pytest.mark.mount, pytest.mark.model]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PHONE = "412,915"  # a phone's screen, in CSS pixels


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium here (tools/install.sh installs Debian's chromium)")


def headless(url: str, *args: str) -> str:
    """Chromium's output for ``url`` once the page's script has polled a few times."""
    done = subprocess.run(["nice", "-n", "19", browser(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={PHONE}",
                           "--virtual-time-budget=3000", *args, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_shows_a_running_task(tiny_model: Path, tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys")
    port = free_port()
    with mounted(tmp_path, tiny_model, "--ctx", "16384", "--slots", "4", "--http", str(port),
                 "--http-keys", str(keys), "--http-open-loopback") as ax, \
            httpx.Client(timeout=60) as http, \
            http.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                        json={"prompt": "Once upon a time", "max_tokens": 100000, "stream": True},
                        headers={"Authorization": f"Bearer {KEY_A}"}) as answer:
        task = answer.headers["x-axfs-task"]
        lines = answer.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        url = f"http://127.0.0.1:{port}/"  # a loopback client without a key: the owner's view
        dom = headless(url, "--dump-dom")
        running = re.findall(r'<tr class="running" data-task="([^"]+)">', dom)
        assert running == [task], dom[-3000:]
        assert "policy fair" in dom and "KV " in dom and "1001" in dom  # the model, the cache, the user
        shot = tmp_path / "page.png"
        headless(url, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert ax.status(task)["state"] == "running"
