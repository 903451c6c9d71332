"""FolderSource replays images in name order, skips and counts unreadable files, handles size changes;
to_bgr8 converts or refuses every pixel format."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import open_source
from cyto_edge.runtime.sources.base import to_bgr8
from cyto_edge.runtime.sources.folder import FolderSource


def _img(v: int, size=(64, 48)) -> np.ndarray:
    return np.full((size[1], size[0], 3), v, np.uint8)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "fields"
    d.mkdir()
    for i, name in enumerate(["f1.png", "f2.jpg", "f10.png", "f3.bmp"]):
        cv2.imwrite(str(d / name), _img(10 * (i + 1)))
    (d / "f4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")          # unreadable
    (d / "f5.png").write_bytes(b"")                                  # empty
    (d / "notes.txt").write_text("ignored")
    cv2.imwrite(str(d / "f6.png"), _img(200, size=(80, 60)))         # another size
    return d


def test_name_order_unreadable_skipped_and_size_change(folder):
    with open_source(f"folder://{folder}") as src:
        frames = list(src)
        stats = src.stats()
    names = [f.meta["name"] for f in frames]
    assert names == ["f1.png", "f2.jpg", "f3.bmp", "f6.png", "f10.png"]     # natural order
    assert [f.index for f in frames] == list(range(5))
    assert stats["dropped"] == 2 and sorted(p.rsplit("/", 1)[1] for p in stats["unreadable"]) == ["f4.png", "f5.png"]
    assert frames[3].meta["size_changed"] == {"from": [64, 48], "to": [80, 60]}
    assert frames[4].meta["size_changed"] == {"from": [80, 60], "to": [64, 48]}
    assert stats["size_changes"] == 2 and src.state == "ended"


def test_fps_and_loop_from_the_uri(folder):
    src = FolderSource(f"folder://{folder}?fps=40&loop=1")
    t0 = time.monotonic()
    frames = [src.read() for _ in range(12)]
    elapsed = time.monotonic() - t0
    src.close()
    assert [f.meta["name"] for f in frames[5:7]] == ["f1.png", "f2.jpg"]      # wrapped around
    assert elapsed >= 11 / 40 * 0.9
    assert src.dropped == 4                                                   # the two bad files, twice
    assert src.read() is None


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(BadInput, match="no such folder"):
        open_source(f"folder://{tmp_path}/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images in the folder"):
        open_source(f"folder://{tmp_path}/empty")
    with pytest.raises(BadInput, match="fps='fast'"):
        open_source(f"folder://{tmp_path}?fps=fast")


def test_a_folder_of_only_broken_files_ends_cleanly(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    src = FolderSource(str(tmp_path), loop=True)
    assert src.read() is None and src.dropped == 1 and src.state == "ended"


def test_to_bgr8_conversions_and_refusals():
    g, _ = to_bgr8(np.full((4, 5, 1), 7, np.uint8))
    assert g.shape == (4, 5, 3) and g.flags.c_contiguous
    f, _ = to_bgr8(np.full((2, 2, 3), 0.5, np.float32))
    assert f[0, 0, 0] == 127
    ten = np.array([[1023, 512]], np.uint16)
    out, depth = to_bgr8(ten)
    assert depth == 10 and tuple(out[0, :, 0]) == (255, 128)
    dim, depth2 = to_bgr8(np.array([[100]], np.uint16), bit_depth=depth)    # sticky depth: no flicker
    assert depth2 == 10 and dim[0, 0, 0] == 100 >> 2
    for bad, msg in [(np.zeros((0, 5, 3), np.uint8), "empty"), (None, "empty"),
                     (np.zeros((4, 4, 2), np.uint8), "shape"), (np.zeros((4, 4), np.int32), "pixel type")]:
        with pytest.raises(ValueError, match=msg):
            to_bgr8(bad)
