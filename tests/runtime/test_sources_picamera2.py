"""picamera2 exists only on a Raspberry Pi: here, the clean error; on the device (-m picamera), real frames
with exposure and white balance locked."""
from __future__ import annotations

import importlib.util

import pytest

from cyto_edge.errors import MissingExtra
from cyto_edge.runtime.sources import SOURCES, open_source


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed")
def test_missing_picamera2_names_the_extra_and_the_system_package():
    with pytest.raises(MissingExtra) as e:
        open_source("picam2://0?width=2028&height=1520")
    assert e.value.extra == "picamera"
    msg = str(e.value)
    assert "cyto-edge[picamera]" in msg and "apt install python3-picamera2" in msg
    assert "--system-site-packages" in msg


def test_registry_maps_picam2_to_the_picamera2_module():
    assert "picam2" in SOURCES.names()


@pytest.mark.picamera
def test_hq_camera_frames_with_locked_exposure():
    from cyto_edge.runtime.sources.threaded import LatestFrameReader

    with open_source("picam2://0?width=2028&height=1520&fps=10", settle_s=1.0) as cam:
        assert cam.controls["AeEnable"] is False and cam.controls["AwbEnable"] is False
        frames = [cam.read() for _ in range(5)]
        assert all(f is not None and f.image.shape == (1520, 2028, 3) for f in frames)
        exposures = {f.meta["exposure_us"] for f in frames[2:]}
        assert len(exposures) == 1                     # locked: the exposure does not follow the field
        with LatestFrameReader(cam) as r:
            assert r.read(timeout=3.0) is not None
