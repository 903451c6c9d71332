"""OpenCVSource on real files written by OpenCV and ffmpeg, images of every pixel format, damaged files,
sources that never open, and a live HTTP MJPEG stream that goes away and comes back."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import open_source
from cyto_edge.runtime.sources.opencv import OpenCVSource, gstreamer_available, parse_uri
from tests.conftest import require_binary

SIZE = (160, 120)  # (W, H)


def numbered(i: int, size=SIZE) -> np.ndarray:
    """A frame whose brightness encodes its number: mean grey ~ 8 * i + const."""
    f = np.full((size[1], size[0], 3), 8 * i + 20, np.uint8)
    cv2.rectangle(f, (10, 10), (60, 60), (255, 255, 255), -1)
    return f


def write_video(path: Path, fourcc: str, n: int = 20, fps: float = 10.0) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    assert w.isOpened(), f"this OpenCV cannot write {fourcc}"
    for i in range(n):
        w.write(numbered(i))
    w.release()
    return path


@pytest.mark.parametrize("name,fourcc", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_video_written_by_opencv_reads_in_order(tmp_path, name, fourcc):
    path = write_video(tmp_path / name, fourcc)
    with open_source(f"file://{path}") as src:
        frames = list(src)
        assert src.state == "ended" and not src.live
        stats = src.stats()
    assert len(frames) == 20 and stats["frames"] == 20 and stats["frame_count"] == 20
    assert all(f.image.shape == (SIZE[1], SIZE[0], 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.index for f in frames] == list(range(20))
    means = [float(f.image[80:, 80:].mean()) for f in frames]
    assert np.all(np.diff(means) > 4), means   # frames come in order
    assert [f.meta["pos_frames"] for f in frames] == list(range(20))
    assert stats["missing_frames"] == 0 and stats["dropped"] == 0


def test_video_written_by_ffmpeg(tmp_path):
    ffmpeg = require_binary("ffmpeg")
    out = tmp_path / "ffmpeg.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=192x144:rate=10", "-frames:v", "15",
                    "-c:v", "mpeg4", "-pix_fmt", "yuv420p", str(out)], check=True, timeout=60)
    with open_source(f"file://{out}") as src:
        frames = list(src)
    assert len(frames) == 15
    assert frames[0].image.shape == (144, 192, 3)
    assert frames[0].image.std() > 20  # the test pattern, not a blank frame


def test_relative_and_bare_paths(tmp_path, monkeypatch):
    write_video(tmp_path / "v.avi", "MJPG", n=3)
    monkeypatch.chdir(tmp_path)
    assert len(list(open_source("file://v.avi"))) == 3
    assert len(list(open_source("v.avi"))) == 3
    assert parse_uri("file:///a/b%20c.mp4").target == "/a/b c.mp4"


def test_loop_and_realtime_pacing(tmp_path):
    path = write_video(tmp_path / "v.avi", "MJPG", n=5)
    with OpenCVSource(f"file://{path}", loop=True) as src:
        frames = [src.read() for _ in range(12)]
    assert all(f is not None for f in frames) and [f.index for f in frames] == list(range(12))
    t0 = time.monotonic()
    with OpenCVSource(f"file://{path}", realtime=True, fps=50) as src:
        n = len(list(src))
    assert n == 5 and time.monotonic() - t0 >= 4 / 50 * 0.9


def test_single_image_once_or_looped(tmp_path):
    cv2.imwrite(str(tmp_path / "f.png"), numbered(3))
    with open_source(f"file://{tmp_path / 'f.png'}") as src:
        f = src.read()
        assert f is not None and f.image.shape == (SIZE[1], SIZE[0], 3) and f.meta["path"].endswith("f.png")
        assert src.read() is None and src.state == "ended"
    with OpenCVSource(str(tmp_path / "f.png"), loop=True) as src:
        assert [src.read().index for _ in range(3)] == [0, 1, 2]


def test_grayscale_16bit_and_bgra_images_become_bgr8(tmp_path):
    gray = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (10, 1))                       # (10, 128)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    g = open_source(str(tmp_path / "g.png")).read().image
    assert g.shape == (10, 128, 3) and np.array_equal(g[:, :, 0], gray) and np.array_equal(g[:, :, 2], gray)

    twelve = np.zeros((8, 8), np.uint16)
    twelve[0, 0], twelve[0, 1], twelve[0, 2] = 4095, 2048, 16          # 12-bit data in a 16-bit PNG
    cv2.imwrite(str(tmp_path / "d12.png"), twelve)
    d = open_source(str(tmp_path / "d12.png")).read().image
    assert d.dtype == np.uint8 and d.shape == (8, 8, 3)
    assert (d[0, 0, 0], d[0, 1, 0], d[0, 2, 0]) == (255, 128, 1)       # scaled by 2**4, full range kept

    full = np.full((4, 4, 3), 65535, np.uint16)
    full[0, 0] = (256, 32768, 0)
    cv2.imwrite(str(tmp_path / "d16.png"), full)
    e = open_source(str(tmp_path / "d16.png")).read().image
    assert tuple(e[1, 1]) == (255, 255, 255) and tuple(e[0, 0]) == (1, 128, 0)

    bgra = np.zeros((6, 6, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 10
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    a = open_source(str(tmp_path / "a.png")).read().image
    assert a.shape == (6, 6, 3) and a[0, 0, 0] == 200


def test_truncated_and_damaged_videos_do_not_crash(tmp_path):
    avi = write_video(tmp_path / "v.avi", "MJPG")
    data = avi.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    with open_source(str(tmp_path / "cut.avi")) as src:
        frames = list(src)
        stats = src.stats()
    assert 0 < len(frames) < 20 and stats["missing_frames"] == 20 - len(frames) and src.state == "ended"

    bad = bytearray(data)
    bad[len(bad) // 2: len(bad) // 2 + 300] = b"\xaa" * 300              # garbage inside one frame
    (tmp_path / "bad.avi").write_bytes(bytes(bad))
    with open_source(str(tmp_path / "bad.avi")) as src:
        frames = list(src)
    assert len(frames) + src.dropped >= 19 and src.dropped >= 1           # the damaged frame skipped, counted
    assert frames[-1].meta["pos_frames"] >= 18

    mp4 = write_video(tmp_path / "v.mp4", "mp4v").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])            # no index (moov) at all
    with pytest.raises(BadInput, match=r"cut\.mp4: OpenCV cannot decode"):
        open_source(str(tmp_path / "cut.mp4"))


def test_missing_and_empty_files_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="nope.mp4: no such file"):
        open_source(f"file://{tmp_path}/nope.mp4")
    (tmp_path / "zero.avi").write_bytes(b"")
    with pytest.raises(BadInput, match="zero.avi: empty file"):
        open_source(str(tmp_path / "zero.avi"))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BadInput, match="junk.png: OpenCV cannot read this image"):
        open_source(str(tmp_path / "junk.png"))
    with pytest.raises(BadInput, match="source option width='wide'"):
        open_source("v4l2:///dev/video0?width=wide")


def test_a_camera_that_never_opens_fails_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(BadInput, match=r"v4l2:///dev/video97: did not open within 1 s.*ls /dev/video"):
        open_source("v4l2:///dev/video97", timeout_s=1.0, backoff_s=0.2)
    assert 0.9 <= time.monotonic() - t0 < 5


def test_a_stream_that_never_answers_fails_after_the_timeout():
    """A server that accepts the connection and then says nothing: the open must not hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    uri = f"rtsp://127.0.0.1:{srv.getsockname()[1]}/stream"
    try:
        t0 = time.monotonic()
        with pytest.raises(BadInput, match=rf"{uri}: did not open within 1.5 s"):
            open_source(uri, timeout_s=1.5)
        assert 1.4 <= time.monotonic() - t0 < 8
    finally:
        srv.close()


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_gstreamer_says_what_to_do():
    with pytest.raises(BadInput, match=r"built without GStreamer.*Jetson.*--system-site-packages"):
        open_source("gst://nvarguscamerasrc ! nvvidconv ! appsink")
    assert parse_uri("gst://videotestsrc").target.endswith("appsink drop=true max-buffers=1 sync=false")


class MJPEGServer:
    """An IP camera: multipart/x-mixed-replace JPEG stream over HTTP; can go down and come back."""

    def __init__(self):
        self.port = 0
        self.srv = None
        self.sent = 0

    def start(self) -> "MJPEGServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while owner.srv is self.server:
                        ok, buf = cv2.imencode(".jpg", numbered(owner.sent % 25))
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(buf) + buf.tobytes() + b"\r\n")
                        owner.sent += 1
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        srv.daemon_threads = True
        srv.allow_reuse_address = True
        self.port, self.srv = srv.server_address[1], srv
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()


def test_live_stream_that_disconnects_and_returns():
    cam = MJPEGServer().start()
    src = open_source(f"http://127.0.0.1:{cam.port}/video.mjpg", timeout_s=3, backoff_s=0.1, backoff_max_s=0.4)
    try:
        assert src.live and src.state == "live"
        assert all(src.read() is not None for _ in range(5))
        cam.stop()
        states: list[str] = []
        got: list = []
        reader = threading.Thread(target=lambda: got.append(src.read()), daemon=True)
        reader.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and src.state != "lost":
            time.sleep(0.01)
        states.append(src.state)
        time.sleep(0.5)                        # down for a while: the source keeps retrying with back-off
        cam.start()                            # same port
        reader.join(10)
        assert states == ["lost"]
        assert got and got[0] is not None and got[0].image.shape == (SIZE[1], SIZE[0], 3)
        assert src.state == "live" and src.reconnects == 1
        assert src.read() is not None
    finally:
        src.close()
        cam.stop()
    assert src.state == "ended" and src.read() is None


def test_reader_reports_a_stream_reconnecting_on_its_own():
    from cyto_edge.runtime.sources.threaded import LatestFrameReader

    cam = MJPEGServer().start()
    src = open_source(f"http://127.0.0.1:{cam.port}/video.mjpg", timeout_s=3, backoff_s=0.1, backoff_max_s=0.3)
    reader = LatestFrameReader(src)
    try:
        assert reader.read(timeout=3) is not None and reader.state == "live"
        cam.stop()
        t0 = time.monotonic()
        while reader.state != "lost" and time.monotonic() - t0 < 3:
            time.sleep(0.01)
        assert reader.state == "lost"
        cam.start()
        t0 = time.monotonic()
        while (reader.state != "live" or src.reconnects < 1) and time.monotonic() - t0 < 8:
            reader.read(timeout=0.1)
        assert reader.state == "live" and src.reconnects == 1
        assert reader.read(timeout=3) is not None
    finally:
        reader.close()
        cam.stop()
    assert reader.state == "ended" and not reader._thread.is_alive()
