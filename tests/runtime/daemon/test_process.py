"""`cyto-edge serve` as a process: kill -9 at random moments (some of them in the middle of an image write)
and restart, SIGTERM with a FOV in flight, systemd notifications, the store lock, privacy of the logs, and
one-line errors for bad usage."""
from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import cv2
import httpx
import pytest

from tests.runtime.daemon.daemon_util import CLI, wait_for, write_profile

KILLS = 20
SLOW_WRITES = {"CYTO_EDGE_TEST_IMAGE_WRITE_DELAY_S": "0.04"}


def snapshot(root: Path) -> dict:
    """Check the store of a dead daemon; {fov id: (session, seq, grade, image)} of every committed FOV."""
    c = sqlite3.connect(root / "results.sqlite")
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = c.execute("SELECT id, session_id, seq, grade, image_path, image_bytes, image_state FROM fovs").fetchall()
        for fid, _, _, _, path, nbytes, state in rows:
            if state == "stored":                     # no row without its image, and the image is whole
                p = root / "images" / path
                assert p.is_file() and p.stat().st_size == nbytes, (fid, path)
                assert cv2.imread(str(p)) is not None, path
        for path, nbytes in c.execute("SELECT crop_path, crop_bytes FROM cells WHERE crop_state = 'stored'"):
            assert (root / "images" / path).stat().st_size == nbytes, path
        sessions = c.execute("SELECT id, state, active_s FROM sessions").fetchall()
    finally:
        c.close()
    return {"fovs": {r[0]: r[1:4] + (r[4],) for r in rows}, "sessions": sessions}


def _tmp_file(images: Path):
    return next(images.rglob(".*.tmp"), None) if images.is_dir() else None


SMALL_CAMERA = {"kind": "synth", "seed": 0, "width": 320, "height": 240, "fps": 30, "realtime": False, "um_per_px": 1.0,
                "options": {"stops": 8, "dwell": 0.4, "move": 0.15, "loop": 1, "slide_width": 1024, "slide_height": 768}}
QUICK_TRACKER = {"still_frames": 2, "settle_frames": 2, "max_wait_frames": 8, "preview_max_side": 320}


def _stored(p) -> int:
    return sum(e.get("msg") == "fov stored" for e in p.lines())


def kill_and_restart(tmp_path: Path, bundle: Path, serve_process, kills: int, seed: int = 8) -> None:
    """`kills` times: start serve (the first time opening a session), kill -9 at a moment chosen in turn at
    random, after a FOV was stored, or while an image is half written; after each kill the store must hold
    every FOV committed so far, intact, and the session must resume at the next start."""
    prof = write_profile(tmp_path, bundle, camera=SMALL_CAMERA, pipeline=QUICK_TRACKER)
    root, rng = tmp_path / "data", random.Random(seed)
    seen: dict = {}
    recovered, resumed, active = [], 0, 0.0
    for i in range(kills):
        args = ("--port", "0", *(("--start-session", "KILL-TEST") if i == 0 else ()))
        p = serve_process(prof, *args, env=SLOW_WRITES)
        p.wait_ready()
        if i % 4 == 3:                                 # aimed: while an image is half written
            wait_for(lambda: _tmp_file(root / "images"), 120, 0.005, "an image being written")
        elif i % 4 == 1:                               # after this run committed a FOV, at a random moment
            wait_for(lambda: _stored(p) >= 1, 120, 0.05, "a stored FOV")
            time.sleep(rng.uniform(0.0, 1.0))
        else:                                          # anywhere in the first seconds, start-up included
            time.sleep(rng.uniform(0.0, 3.0))
        p.kill(signal.SIGKILL)
        logs = p.lines()
        recovered += [e for e in logs if e.get("msg") == "store recovered"]
        resumed += any(e.get("msg") == "session resumed" and e.get("session") == 1 for e in logs)
        snap = snapshot(root)
        for fid, row in seen.items():                  # every FOV committed before is still there, unchanged
            assert snap["fovs"].get(fid) == row, (i, fid)
        seen = snap["fovs"]
        assert [(s[0], s[1]) for s in snap["sessions"]] == [(1, "open")]   # one session, never closed by a kill
        assert snap["sessions"][0][2] >= active        # its duration (monotonic) only grows
        active = snap["sessions"][0][2]
    assert resumed == kills - 1                        # every restart resumed the open session
    assert all(e["integrity"] == "ok" for e in recovered)
    assert sum(e["removed_temp"] + e["removed_orphans"] for e in recovered) >= kills // 4 - 1   # mid-write kills
    seqs = sorted(r[1] for r in seen.values())
    assert len(seen) >= kills // 4 and seqs == list(range(1, len(seqs) + 1))          # no gap, no duplicate


def test_kill_9_at_random_moments_loses_nothing_committed(tmp_path, gallery_bundle, serve_process):
    kill_and_restart(tmp_path, gallery_bundle, serve_process, KILLS)


@pytest.mark.slow
def test_kill_9_one_hundred_times(tmp_path, gallery_bundle, serve_process):
    kill_and_restart(tmp_path, gallery_bundle, serve_process, 100, seed=100)


def test_sigterm_finishes_the_fov_in_flight_notifies_systemd_and_keeps_logs_private(tmp_path, gallery_bundle,
                                                                                   serve_process):
    prof = write_profile(tmp_path, gallery_bundle)
    root = tmp_path / "data"
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    msgs: list[str] = []
    done = threading.Event()

    def drain():                       # as systemd does: read every notification as it comes
        while not done.is_set():
            try:
                msgs.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000", "CYTO_EDGE_TEST_IMAGE_WRITE_DELAY_S": "0.25"}
    p = serve_process(prof, "--port", "0", env=env)
    url = p.wait_ready()
    secrets = ("PATIENT-0042-XYZ", "Jane Roe-Smith", "notes-secret-123")
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/api/sessions", json={"slide_id": secrets[0], "operator": secrets[1], "notes": secrets[2]})
        assert r.status_code == 201
        wait_for(lambda: c.get("/api/status").json()["live"]["fovs_stored"] >= 1, 120, 0.2, "a stored FOV")
    second = subprocess.run([*CLI, "serve", "--profile", str(prof), "--port", "0"], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"in use by another `cyto-edge serve` (pid {p.proc.pid})" in second.stderr
    p.proc.send_signal(signal.SIGHUP)                                   # re-verify and swap the bundle
    wait_for(lambda: any(e.get("msg") == "bundle swapped" for e in p.lines()), 120, 0.1, "the SIGHUP swap")
    tmp = wait_for(lambda: _tmp_file(root / "images"), 120, 0.01, "an image being written")
    seq_in_flight = int(tmp.name.split("-")[0].lstrip(".f"))
    assert p.kill(signal.SIGTERM) == 0
    time.sleep(0.5)
    done.set()
    reader.join(5)
    sock.close()
    assert msgs[0] == "READY=1" and msgs[-1] == "STOPPING=1", msgs
    assert msgs.count("WATCHDOG=1") >= 2 and any(m.startswith("STATUS=camera live") for m in msgs)
    snap = snapshot(root)
    assert seq_in_flight in [r[1] for r in snap["fovs"].values()]        # the FOV in flight was stored
    assert not list((root / "images").rglob(".*.tmp"))
    assert not (root / "results.sqlite-wal").exists() or (root / "results.sqlite-wal").stat().st_size == 0
    text = p.log_path.read_text()
    assert all(s not in text for s in secrets), "a slide id, operator or notes reached the logs"
    events = [json.loads(line) for line in text.splitlines()]
    assert events[-1]["msg"] == "stopped" and any(e["msg"] == "session started" for e in events)


def test_bad_usage_is_one_line_exit_2(tmp_path, gallery_bundle):
    prof = write_profile(tmp_path, gallery_bundle)
    cases = [
        (["--profile", str(tmp_path / "missing.yaml")], "cannot read the profile"),
        (["--profile", str(prof), "--bind", "0.0.0.0", "--port", "0"], "reachable from the network"),
        (["--profile", str(prof), "--log-format", "xml"], "--log-format"),
        (["--profile", str(prof), "--token-file", str(tmp_path / "nope")], "token_file"),
        (["--profile", str(prof), "--bundle", str(tmp_path / "nope.cytobundle")], "no such bundle"),
    ]
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    cases.append((["--profile", str(prof), "--token-file", str(short)], "at least 16 characters"))
    for args, expected in cases:
        r = subprocess.run([*CLI, "serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
