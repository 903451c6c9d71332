"""`cyto-edge doctor`: the real probes on this machine (ONNX Runtime and OpenVINO installed, no TensorRT,
pycuda, picamera2 or camera), and the parsers behind them on text from other machines."""
from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cyto_edge import doctor

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"python", "platform", "cpu", "numpy", "opencv", "torch", "onnxruntime", "openvino", "tensorrt", "pycuda",
        "picamera2", "cameras", "extras_missing", "missing_extras", "warnings"}


@pytest.fixture(scope="module")
def report() -> dict:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cyto_edge.cli", "doctor", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30, "doctor took over 30 s (a probe that hangs?)"
    return json.loads(r.stdout)


def test_report_has_the_documented_keys(report):
    assert KEYS <= set(report)
    assert not [k for k, v in report.items() if isinstance(v, dict) and set(v) == {"error"}], "a probe failed"
    assert report["python"]["executable"] and report["python"]["version"] == platform.python_version()
    assert report["platform"]["arch"] == platform.machine()


def test_backends_installed_here(report):
    from cyto_edge.runtime import boxes

    assert report["opencv"]["nms"] == ("opencv" if boxes._CV_NMS is not None else "numpy (OpenCV < 4.7: slower)")
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert "CPU" in report["openvino"]["devices"]
    import onnxruntime
    import openvino

    assert report["onnxruntime"]["version"] == onnxruntime.__version__
    assert report["openvino"]["version"] == openvino.get_version()


@pytest.mark.parametrize("name,extra", [("tensorrt", "jetson"), ("pycuda", "jetson"), ("picamera2", "picamera")])
def test_absent_hardware_libraries_name_their_extra(report, name, extra):
    info = report[name]
    if importlib.util.find_spec(name) is not None:  # on the device itself
        assert info["installed"] is True
        return
    assert info["installed"] is False and info["extra"] == extra
    assert f"cyto-edge[{extra}]" in info["install"]
    assert extra in report["missing_extras"]


def test_picamera2_hint_names_the_system_package(report):
    if report["picamera2"]["installed"]:
        pytest.skip("picamera2 is installed here")
    hint = report["picamera2"]["hint"]
    assert "python3-picamera2" in hint and "--system-site-packages" in hint


def test_torch_reported_with_cuda_state(report):
    import torch

    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()


def test_cpu_flags_match_proc_cpuinfo(report):
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith(("flags", "Features"))).split(":")[1].split())
    got = report["cpu"]["int8_flags"]
    if platform.machine() == "x86_64":
        assert got["AVX2"] == ("avx2" in flags) and got["AVX512_VNNI"] == ("avx512_vnni" in flags)
        assert got["AMX-INT8"] == ("amx_int8" in flags)
    assert report["cpu"]["logical_cores"] >= 1 and report["cpu"]["int8_note"]


def test_no_cameras_here_and_no_hang(report):
    if not list(Path("/dev").glob("video*")):
        assert report["cameras"] == []


def test_table_output(capsys):
    from cyto_edge.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("onnxruntime", "CPUExecutionProvider", "openvino", "tensorrt", "cyto-edge[jetson]", "extras"):
        assert word in out, word


def test_a_non_camera_node_is_reported_not_opened(tmp_path):
    fake = tmp_path / "video0"
    fake.write_bytes(b"\0" * 64)
    t0 = time.monotonic()
    cams = doctor.probe_cameras(timeout=2.0, pattern=str(tmp_path / "video*"))
    assert time.monotonic() - t0 < 10
    assert len(cams) == 1 and cams[0]["opened"] is False and cams[0]["index"] == 0


# ------------------------------------------------------------------------------- parsers, other machines

ORIN_CPUINFO = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat
CPU implementer\t: 0x41
CPU part\t: 0xd42
"""
NANO_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU part\t: 0xd07
"""


def test_arm_cpuinfo_parsed():
    orin = doctor.parse_cpuinfo(ORIN_CPUINFO)
    assert orin["model"] == "Cortex-A78AE"
    flags = doctor.int8_flags(orin["flags"], "aarch64")
    assert flags == {"ASIMDDP (SDOT/UDOT)": True, "I8MM": False}
    assert "dot product" in doctor.int8_note(flags)
    nano = doctor.int8_flags(doctor.parse_cpuinfo(NANO_CPUINFO)["flags"], "aarch64")
    assert not any(nano.values()) and "slower" in doctor.int8_note(nano)


def test_x86_cpuinfo_parsed():
    info = doctor.parse_cpuinfo("model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f amx_tile amx_int8\n")
    flags = doctor.int8_flags(info["flags"], "x86_64")
    assert info["model"] == "Intel(R) Xeon(R)" and flags["AMX-INT8"] and not flags["AVX512_VNNI"]
    assert doctor.int8_note(flags).startswith("AMX-INT8")


def test_opencv_gstreamer_and_the_jetson_shadow_warning():
    jetpack = "  Video I/O:\n    FFMPEG:                      NO\n    GStreamer:                   YES (1.16.3)\n"
    pip = "  Video I/O:\n    GStreamer:                   NO\n"
    assert doctor.opencv_has_gstreamer(jetpack) and not doctor.opencv_has_gstreamer(pip)
    warn = doctor.opencv_warning("aarch64", False, ["opencv-python-headless"])
    assert warn and "pip uninstall opencv-python-headless" in warn and "--system-site-packages" in warn
    assert doctor.opencv_warning("aarch64", True, []) is None         # JetPack's own OpenCV
    assert doctor.opencv_warning("x86_64", False, ["opencv-python-headless"]) is None


def test_extras_table_matches_pyproject():
    """Every dependency of every extra in pyproject.toml is checked by doctor (under its import name)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    import_names = {"opencv-python-headless": "cv2", "pyyaml": "yaml", "scikit-learn": "sklearn"}
    for extra, reqs in extras.items():
        if extra == "all":
            continue
        assert extra in doctor.EXTRAS, f"doctor does not check the extra {extra!r}"
        for req in reqs:
            dist = req.split(";")[0].split("[")[0]
            for op in "<>=!~ ":
                dist = dist.split(op)[0]
            mod = import_names.get(dist.lower(), dist.lower().replace("-", "_"))
            assert mod in doctor.EXTRAS[extra], f"doctor's EXTRAS[{extra!r}] lacks {mod!r} ({req})"


def test_board_venv_warning():
    w = doctor.board_warning("NVIDIA Jetson Orin Nano Developer Kit", True, True, False)
    assert w and "TensorRT" in w and "--system-site-packages" in w
    assert "picamera2" in doctor.board_warning("Raspberry Pi 5 Model B Rev 1.0", False, True, False)
    assert doctor.board_warning("Raspberry Pi 5 Model B Rev 1.0", False, True, True) is None
    assert doctor.board_warning(None, False, True, False) is None     # a PC: nothing to say
