"""The systemd unit (Type=notify with a watchdog, checked by systemd-analyze when present) and the sd_notify
client over real unix datagram sockets, the abstract namespace included."""
from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cyto_edge.runtime.daemon import sdnotify

UNIT = Path(__file__).resolve().parents[3] / "packaging" / "systemd" / "cyto-edge.service"


def test_unit_is_notify_with_watchdog_and_graceful_stop():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main" and int(svc["WatchdogSec"]) > 0
    assert svc["KillSignal"] == "SIGTERM" and svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert " serve --profile " in svc["ExecStart"] and svc["Restart"] == "on-failure"
    assert "token" not in svc["ExecStart"].lower()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "cyto-edge.service"      # ExecStart must name an executable that exists here
    unit.write_text(UNIT.read_text().replace("/opt/cyto-edge/venv/bin/cyto-edge",
                                             str(Path(sys.executable).with_name("cyto-edge"))))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_datagrams_and_never_blocks(tmp_path, monkeypatch, abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = f"@cyto-edge-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    s.bind("\0" + addr[1:] if abstract else addr)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    try:
        assert sdnotify.notify("READY=1") and sdnotify.notify("STATUS=camera live")
        assert s.recv(100) == b"READY=1" and s.recv(100) == b"STATUS=camera live"
        sent = sum(sdnotify.notify("WATCHDOG=1") for _ in range(5000))   # nobody reads: the queue fills
        assert 0 < sent < 5000                                           # ... and notify returned anyway
    finally:
        s.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))          # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert sdnotify.watchdog_interval() is None
