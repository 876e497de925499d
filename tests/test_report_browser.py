"""The HTML report in a real headless browser (Debian's chromium), driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (DevTools messages as NUL-terminated JSON on
file descriptors 3 and 4), so the test needs nothing but the standard library. It trains a tiny
character-level LSTM, captures its activations over a text, writes a run directory and checks that
the report page loads without errors, that the cell-activation viewer recolours the text when the
unit is changed with a real mouse click, and that a screenshot is produced.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.analysis.capture import text_activations, trace
from rnnkit.analysis.report import write_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1200,900"]


class Browser:
    """A minimal DevTools-protocol client over chromium's debugging pipe."""

    def __init__(self, user_data_dir: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=child_fds, pass_fds=(3, 4),  # dup2 runs before the fd cleanup
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass  # the process is killed below either way
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


TEXT = ('She said "the cat (and the dog) sat."\nHe said "no (not [ever])."\n' * 3).strip()


def _tiny_text_run(run_dir: Path) -> None:
    """Train a tiny char-level LSTM for a few steps and store its activations over ``TEXT``."""
    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    idx = torch.tensor([chars.index(c) for c in TEXT])
    V, H = len(chars), 16
    lstm = rnnkit.LSTM(V, H, batch_first=True)
    head = torch.nn.Linear(H, V)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-2)
    x = torch.nn.functional.one_hot(idx, V).float().unsqueeze(0)  # (1, T, V)
    losses = []
    for _ in range(30):
        out, _ = lstm(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(head(out[0]), idx[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses  # it learned something
    with torch.no_grad():
        tr = trace(lstm, x)
    act = text_activations(TEXT, tr)
    (run_dir / "activations.json").write_text(json.dumps(act))
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step, v in enumerate(losses):
            f.write(json.dumps({"step": step + 1, "split": "train", "loss": v}) + "\n")
    (run_dir / "config.toml").write_text('[model]\ncell = "lstm"\nhidden_size = 16\n')


def _eval(br: Browser, session: str, expr: str):
    res = br.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
    if "exceptionDetails" in res:
        raise AssertionError(f"{expr}: {res['exceptionDetails']}")
    return res["result"].get("value")


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _tiny_text_run(run_dir)
    page = write_report(run_dir)
    html_text = page.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained: nothing to fetch
    with tempfile.TemporaryDirectory() as profile:
        br = Browser(profile)
        try:
            target = br.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = br.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                br.send(f"{domain}.enable", {}, session)
            br.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
            br.wait_event("Page.loadEventFired")
            errors = [ev for ev in br.events if ev.get("method") == "Runtime.exceptionThrown"
                      or (ev.get("method") == "Runtime.consoleAPICalled" and ev["params"]["type"] == "error")
                      or (ev.get("method") == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error")
                      or ev.get("method") == "Network.loadingFailed"]
            assert errors == []
            requests = [ev["params"]["request"]["url"] for ev in br.events
                        if ev.get("method") == "Network.requestWillBeSent"]
            assert all(u.startswith(("file:", "data:")) for u in requests), requests

            n_spans = _eval(br, session, "document.querySelectorAll('#viewer span.ch').length")
            assert n_spans == len(TEXT)
            n_imgs = _eval(br, session, "Array.from(document.images).filter(i => i.naturalWidth > 0).length")
            assert n_imgs >= 1  # the learning curve decoded from its data: URL
            colours = "Array.from(document.querySelectorAll('#viewer span.ch')).map(s => s.style.backgroundColor)"
            before = _eval(br, session, colours)
            assert _eval(br, session, "document.getElementById('viewer').dataset.unit") == "0"
            assert len(set(before)) > 3  # the text is coloured by the unit, not uniformly

            # a real mouse click on the "next unit" button
            box = _eval(br, session, "(() => { const r = document.getElementById('next-unit')"
                                     ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
            for kind in ("mousePressed", "mouseReleased"):
                br.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                     "clickCount": 1}, session)
            assert _eval(br, session, "document.getElementById('viewer').dataset.unit") == "1"
            after = _eval(br, session, colours)
            assert after != before
            label = _eval(br, session, "document.getElementById('unit-label').textContent")
            assert "unit 1 of 16" in label

            # switching the state (c -> h) recolours too
            _eval(br, session, "(() => { const s = document.getElementById('series'); s.value = 'layer0/h';"
                               " s.dispatchEvent(new Event('change')); })()")
            assert _eval(br, session, "document.getElementById('viewer').dataset.series") == "layer0/h"
            assert _eval(br, session, colours) != after

            shot = br.send("Page.captureScreenshot", {"format": "png"}, session)
            png = base64.b64decode(shot["data"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
            (run_dir / "screenshot.png").write_bytes(png)
        finally:
            br.close()
