"""Device profiles: every shipped profile validates; typos, tokens, bad YAML and overrides of classes the
bundle lacks are refused with one line naming the file and the field; `config check|show` exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import InputSpec, Manifest, OutputSpec, file_entry, write_manifest
from cyto_edge.runtime.profile import (DeviceProfile, GStreamerCamera, camera_uri, check_against_bundle,
                                       load_profile, source_options)
from cyto_edge.runtime.sources import scheme_of
from tests.conftest import ROOT

PROFILES = sorted((ROOT / "firmware_configs").glob("*.yaml"))
EXPECTED = {"jetson-orin-nano", "jetson-nano", "raspberry-pi-5", "intel-nuc", "desktop-cpu"}


def test_the_device_profiles_are_all_there():
    assert EXPECTED <= {p.stem for p in PROFILES}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_shipped_profile_validates(path):
    prof = load_profile(path)
    assert prof.name == path.stem
    assert 0.05 < prof.camera.um_per_px < 5
    assert prof.bundle.is_absolute() and prof.bundle.parent.parent == path.parent.resolve()
    uri = camera_uri(prof)
    assert scheme_of(uri) in {"gstreamer": {"gst"}, "picamera2": {"picam2"}, "opencv": {"v4l2", "file", "rtsp", "http"},
                              "synth": {"synth"}, "folder": {"folder"}}[prof.camera.kind]
    if isinstance(prof.camera, GStreamerCamera):
        assert "{" not in uri and f"width={prof.camera.width}" in uri and "appsink" in uri
    assert "token" not in yaml.safe_load(path.read_text()).get("server", {})


def test_shipped_profiles_cover_the_devices_design_asks_for():
    by = {p.stem: load_profile(p) for p in PROFILES}
    assert (by["jetson-orin-nano"].camera.kind, by["jetson-orin-nano"].engine.backend) == ("gstreamer", "tensorrt")
    assert "nvarguscamerasrc" in by["jetson-orin-nano"].camera.pipeline
    assert by["jetson-nano"].engine.precision == "fp16"
    pi = by["raspberry-pi-5"]
    assert (pi.camera.kind, pi.camera.width, pi.camera.height) == ("picamera2", 2028, 1520)
    assert (pi.engine.backend, pi.engine.precision, pi.engine.threads) == ("onnxruntime", "int8", 4)
    assert camera_uri(pi) == "picam2://0?width=2028&height=1520&fps=10"
    assert source_options(pi)["lock_exposure"] is True
    nuc = by["intel-nuc"]
    assert (nuc.camera.kind, nuc.engine.backend, nuc.engine.device) == ("opencv", "openvino", "CPU")
    assert by["desktop-cpu"].camera.kind == "synth" and by["desktop-cpu"].engine.precision == "fp32"


BASE = {"name": "t", "camera": {"kind": "opencv", "index": 0, "um_per_px": 0.3},
        "engine": {"backend": "onnxruntime"}, "bundle": "models/x.cytobundle"}


def write(tmp_path: Path, data: dict | str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def with_(path: str, value) -> dict:
    d = json.loads(json.dumps(BASE))
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    ("camera.fps", 0, "camera.fps: must be greater than 0"),
    ("camera.um_per_px", -1, "camera.um_per_px: must be greater than 0"),
    ("camera.fsp", 30, "camera.fsp: unknown field; did you mean 'fps'?"),
    ("camera.exposure.lok", True, "camera.exposure.lok: unknown field; did you mean 'lock'?"),
    ("engine.threds", 2, "engine.threds: unknown field; did you mean 'threads'?"),
    ("pipeline.still_frame", 3, "pipeline.still_frame: unknown field; did you mean 'still_frames'?"),
    ("camera.kind", "usb", "camera.kind: 'usb' is not one of 'opencv', 'gstreamer', 'picamera2', 'folder', 'synth'"),
    ("engine.backend", "tflite", "engine.backend: 'tflite' is not one of"),
    ("engine.precision", "int4", "engine.precision: must be 'fp32', 'fp16' or 'int8'"),
    ("engine.device", "gpu", "engine.device: 'gpu' is not a device of this backend"),
    ("server.token", "s3cret", "server: a token must not be written in the profile"),
    ("server.bind", "0.0.0.0", "server: bind 0.0.0.0 is reachable from the network: set token_file or token_env"),
    ("grading.input_size", [320, 320], "grading: input_size: what the model was trained with comes from the bundle"),
    ("grading.um_per_px", 0.5, "grading: um_per_px: what the model was trained with"),
    ("grading.class_thresholds", {"hsil": 1.5}, "hsil: threshold 1.5 must be in [0, 1]"),
    ("grading.category_min_count", {"HSL": 2}, "'HSL' is not a Bethesda category"),
    ("storage.jpeg_quality", 0, "storage.jpeg_quality: must be greater than or equal to 1"),
    ("storagee", {}, "storagee: unknown field; did you mean 'storage'?"),
])
def test_wrong_fields_are_reported_with_their_path(tmp_path, path, value, message):
    p = write(tmp_path, with_(path, value))
    with pytest.raises(BadInput) as e:
        load_profile(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and message in msg, msg
    assert "\n" not in msg


def test_missing_fields_and_camera_targets(tmp_path):
    d = json.loads(json.dumps(BASE))
    del d["camera"]["um_per_px"], d["bundle"]
    with pytest.raises(BadInput, match=r"camera\.um_per_px: required; bundle: required"):
        load_profile(write(tmp_path, d))
    with pytest.raises(BadInput, match="camera: give exactly one of uri or index"):
        load_profile(write(tmp_path, with_("camera.uri", "file://a.mp4")))
    d = with_("camera", {"kind": "gstreamer", "pipeline": "nvarguscamerasrc ! {widht}", "um_per_px": 1})
    with pytest.raises(BadInput, match=r"camera\.pipeline: .*unknown placeholder \{widht\}"):
        load_profile(write(tmp_path, d))


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "name: x\ncamera:\n  kind: opencv\n   index: 0\n")
    with pytest.raises(BadInput, match=r"p\.yaml: line 4, column \d+: malformed YAML"):
        load_profile(p)
    with pytest.raises(BadInput, match="must be a YAML mapping"):
        load_profile(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(BadInput, match="cannot read the profile"):
        load_profile(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_profile(tmp_path):
    d = with_("camera", {"kind": "opencv", "uri": "file://videos/a.mp4", "um_per_px": 0.3})
    d["storage"] = {"root": "store"}
    d["server"] = {"token_file": "secrets/token", "bind": "0.0.0.0"}
    (tmp_path / "sub").mkdir()
    prof = load_profile(write(tmp_path / "sub", d))
    base = (tmp_path / "sub").resolve()
    assert prof.bundle == base / "models/x.cytobundle" and prof.storage.root == base / "store"
    assert prof.server.token_file == base / "secrets/token"
    assert camera_uri(prof) == f"file://{base}/videos/a.mp4"
    folder = load_profile(write(tmp_path, with_("camera", {"kind": "folder", "path": "frames", "um_per_px": 1,
                                                           "fps": 5})))
    assert camera_uri(folder) == f"folder://{tmp_path.resolve()}/frames?fps=5&loop=0"
    abs_root = load_profile(write(tmp_path, with_("storage.root", "/var/lib/x")))
    assert abs_root.storage.root == Path("/var/lib/x")


def test_profile_camera_opens_through_the_registry(tmp_path):
    import cv2

    from cyto_edge.runtime.profile import open_camera

    (tmp_path / "frames").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "frames" / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    prof = load_profile(write(tmp_path, with_("camera", {"kind": "folder", "path": "frames", "um_per_px": 1})))
    with open_camera(prof) as src:
        assert [f.image.shape for f in src] == [(20, 30, 3)] * 3


def make_bundle(tmp_path: Path, classes=("hsil", "lsil", "candida"), um_per_px=0.5) -> Path:
    d = tmp_path / "m.cytobundle"
    d.mkdir()
    np.save(d / "priors.npy", np.zeros((4, 4), np.float32))
    (d / "model.onnx").write_bytes(b"onnx")
    files = [file_entry(d, "priors.npy", "priors", role="priors"), file_entry(d, "model.onnx", "onnx", "fp32")]
    m = Manifest(classes=list(classes), bethesda={"hsil": "HSIL", "lsil": "LSIL", "candida": "NILM"},
                 organisms=["candida"], um_per_px=um_per_px, input=InputSpec(size=(320, 320)),
                 output=OutputSpec(num_priors=4), files=files)
    write_manifest(d, m)
    return d


def test_overrides_must_name_classes_of_the_bundle(tmp_path):
    from cyto_edge.runtime.bundle import Bundle

    b = Bundle.open(make_bundle(tmp_path))
    ok = DeviceProfile.model_validate(with_("grading.class_thresholds", {"hsil": 0.2}))
    assert check_against_bundle(ok, b.manifest) == ["camera.um_per_px 0.3 vs the model's 0.5: frames are "
                                                     "rescaled by 0.6"]
    bad = DeviceProfile.model_validate(with_("grading.class_thresholds", {"hsl": 0.2}))
    with pytest.raises(BadInput, match="grading.class_thresholds: class 'hsl' is not in the bundle; did you mean 'hsil'"):
        check_against_bundle(bad, b.manifest, source="p.yaml")
    int8 = DeviceProfile.model_validate(with_("engine.precision", "int8"))
    assert any("no detector file" in w for w in check_against_bundle(int8, b.manifest))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cyto_edge.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_config_check_and_show_commands(tmp_path):
    bundle = make_bundle(tmp_path)
    good = write(tmp_path, with_("grading.class_thresholds", {"hsil": 0.2}), "good.yaml")
    r = cli("config", "check", str(good), "--bundle", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["bundle_checked"] == str(bundle) and "rescaled by 0.6" in out["warnings"][0]

    bad = write(tmp_path, with_("grading.class_thresholds", {"ascus": 0.2}), "bad.yaml")
    r = cli("config", "check", str(bad), "--bundle", str(bundle))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "bad.yaml: grading.class_thresholds: class 'ascus' is not in the bundle" in r.stderr

    typo = write(tmp_path, with_("camera.fsp", 3), "typo.yaml")
    r = cli("config", "check", str(typo))
    assert r.returncode == 2 and "typo.yaml: camera.fsp: unknown field; did you mean 'fps'?" in r.stderr

    r = cli("config", "check", str(ROOT / "firmware_configs" / "raspberry-pi-5.yaml"))
    assert r.returncode == 0 and "raspberry-pi-5" in r.stdout

    r = cli("config", "show", str(good), "--json")
    shown = json.loads(r.stdout)
    assert r.returncode == 0 and shown["pipeline"]["still_frames"] == 3 and shown["server"]["bind"] == "127.0.0.1"
    assert list(shown["camera"])[0] == "kind"
    r = cli("config", "show", str(good))
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["storage"]["retention_days"] == 90
