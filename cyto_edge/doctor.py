"""`cyto-edge doctor`: what this machine has (Python, CPU and its INT8 instructions, backends, cameras).

Every probe is a small function returning a JSON-able dict and imports what it inspects inside the call:
`cyto-edge --help` never pays for torch, OpenCV or OpenVINO. A probe that raises is reported as that
probe's error; doctor itself always exits 0.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import platform
import re
import sys
import threading
from pathlib import Path

import typer

# Extras of pyproject.toml -> the import names that stand for them (presence checked with find_spec).
EXTRAS: dict[str, list[str]] = {
    "runtime": ["numpy", "cv2", "onnxruntime", "pydantic", "yaml", "typer", "rich", "fastapi", "uvicorn",
                "jinja2", "psutil"],
    "train": ["torch", "torchvision", "pycocotools", "tensorboard", "matplotlib"],
    "export": ["onnx", "onnxscript", "onnxruntime", "onnxslim", "openvino"],
    "openvino": ["openvino"],
    "jetson": ["tensorrt", "pycuda"],
    "picamera": ["picamera2"],
    "dev": ["pytest", "pytest_timeout", "httpx", "sklearn"],
}

# /proc/cpuinfo flag -> display name, for the instructions that decide whether INT8 pays off.
INT8_FLAGS_X86 = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_vnni": "AVX512_VNNI",
                  "avx_vnni": "AVX_VNNI", "amx_tile": "AMX-TILE", "amx_int8": "AMX-INT8"}
INT8_FLAGS_ARM = {"asimddp": "ASIMDDP (SDOT/UDOT)", "i8mm": "I8MM"}

# ARM "CPU part" ids of the cores on supported boards (lscpu's table, abridged).
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
             "0xd42": "Cortex-A78AE", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1"}

PICAMERA_HINT = ("comes from Raspberry Pi OS: sudo apt install python3-picamera2, and create the venv "
                 "with --system-site-packages")
OPENCV_DISTS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                "opencv-contrib-python-headless")


def _missing(extra: str, hint: str = "") -> dict:
    out = {"installed": False, "extra": extra, "install": f"pip install 'cyto-edge[{extra}]'"}
    if hint:
        out["hint"] = hint
    return out


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------ CPU

def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo text -> {"model", "flags" (set of x86 flags or ARM Features), "arm_part"}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = val.strip()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("cpu model") or ""
    part = fields.get("cpu part", "").lower()
    if not model and part:
        model = ARM_PARTS.get(part, f"ARM part {part}")
    return {"model": model, "flags": flags, "arm_part": part or None}


def int8_flags(flags: set[str], arch: str) -> dict[str, bool]:
    """The INT8-relevant instructions of this architecture, each present or not."""
    table = INT8_FLAGS_ARM if arch in ("aarch64", "arm64", "armv7l") else INT8_FLAGS_X86
    return {name: flag in flags for flag, name in table.items()}


def int8_note(present: dict[str, bool]) -> str:
    if present.get("AMX-INT8"):
        return "AMX-INT8: INT8 matrix tiles; INT8 models should be much faster than FP32"
    if present.get("AVX512_VNNI") or present.get("AVX_VNNI"):
        return "VNNI: INT8 dot products in one instruction; INT8 can beat FP32 (measure per model)"
    if present.get("I8MM") or present.get("ASIMDDP (SDOT/UDOT)"):
        return "ARM INT8 dot product: INT8 can beat FP32 (measure per model)"
    if present.get("AVX2"):
        return "AVX2 without VNNI: INT8 gains are small; measure before choosing int8"
    return "no INT8 dot-product instructions: INT8 may be slower than FP32; prefer fp32/fp16"


def cpu_info() -> dict:
    """CPU model, core counts and INT8 flags (also used by the benchmarks' provenance line)."""
    arch = platform.machine()
    try:
        parsed = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        parsed = {"model": "", "flags": set(), "arm_part": None}
    present = int8_flags(parsed["flags"], arch)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {"model": parsed["model"] or platform.processor() or "unknown", "arch": arch,
            "logical_cores": os.cpu_count(), "usable_cores": usable, "int8_flags": present,
            "int8_note": int8_note(present)}


# ------------------------------------------------------------------------------------- platform

def board_model() -> str | None:
    """Jetson / Raspberry Pi board name from the device tree, if any."""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(p).read_text(errors="replace").strip("\x00 \n") or None
        except OSError:
            continue
    return None


def probe_python() -> dict:
    base = getattr(sys, "base_prefix", sys.prefix)
    venv = sys.prefix != base
    system_site = None
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if venv and cfg.is_file():
        m = re.search(r"include-system-site-packages\s*=\s*(\w+)", cfg.read_text())
        system_site = bool(m and m.group(1).lower() == "true")
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable, "venv": venv, "system_site_packages": system_site}


def probe_platform() -> dict:
    from cyto_edge import __version__

    return {"cyto_edge": __version__, "os": platform.system(), "release": platform.release(),
            "arch": platform.machine(), "board": board_model(), "jetson": Path("/etc/nv_tegra_release").exists()}


# ------------------------------------------------------------------------------------ libraries

def _version_probe(module: str, extra: str, hint: str = ""):
    """A probe that only reports whether `module` imports and its __version__."""
    def probe() -> dict:
        if not _has(module):
            return _missing(extra, hint)
        return {"installed": True, "version": importlib.import_module(module).__version__}
    return probe


def opencv_has_gstreamer(build_info: str) -> bool:
    """cv2.getBuildInformation() text -> whether the Video I/O section says `GStreamer: YES`."""
    m = re.search(r"^\s*GStreamer:\s*(\S+)", build_info, re.MULTILINE)
    return bool(m and m.group(1).upper().startswith("YES"))


def opencv_warning(arch: str, gstreamer: bool, pip_dists: list[str]) -> str | None:
    """On a Jetson (aarch64) a pip OpenCV without GStreamer shadows JetPack's, which has it."""
    if arch == "aarch64" and pip_dists and not gstreamer:
        return (f"pip's {', '.join(pip_dists)} (no GStreamer) shadows the system OpenCV: on a Jetson "
                f"run `pip uninstall {' '.join(pip_dists)}` and use a venv with --system-site-packages "
                "so CSI cameras work through GStreamer")
    return None


def _pip_opencv() -> list[str]:
    from importlib import metadata

    found = []
    for d in OPENCV_DISTS:
        try:
            metadata.version(d)
            found.append(d)
        except metadata.PackageNotFoundError:
            continue
    return found


def probe_opencv() -> dict:
    if not _has("cv2"):
        return _missing("runtime", "on a Jetson use JetPack's OpenCV (python3-opencv) instead")
    import cv2

    gst = opencv_has_gstreamer(cv2.getBuildInformation())
    dists = _pip_opencv()
    nms = "opencv" if hasattr(getattr(cv2, "dnn", None), "NMSBoxesBatched") else "numpy (OpenCV < 4.7: slower)"
    out = {"installed": True, "version": cv2.__version__, "gstreamer": gst, "pip_distributions": dists,
           "path": str(Path(cv2.__file__).parent), "nms": nms}
    warn = opencv_warning(platform.machine(), gst, dists)
    if warn:
        out["warning"] = warn
    return out


def probe_torch() -> dict:
    if not _has("torch"):
        return _missing("train")
    import torch

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    tv = None
    if _has("torchvision"):
        from importlib import metadata

        tv = metadata.version("torchvision")
    return {"installed": True, "version": torch.__version__, "torchvision": tv, "cuda_available": cuda,
            "cuda_version": torch.version.cuda, "cuda_devices": devices, "threads": torch.get_num_threads()}


def probe_onnxruntime() -> dict:
    if not _has("onnxruntime"):
        return _missing("runtime")
    import onnxruntime as ort

    return {"installed": True, "version": ort.__version__, "providers": ort.get_available_providers()}


def probe_openvino() -> dict:
    if not _has("openvino"):
        return _missing("openvino")
    import openvino as ov

    core = ov.Core()
    devices = {}
    for d in core.available_devices:
        try:
            devices[d] = str(core.get_property(d, "FULL_DEVICE_NAME"))
        except RuntimeError as e:  # a device that lists but cannot describe itself
            devices[d] = f"(no name: {e})"
    version = getattr(ov, "__version__", None) or ov.get_version()
    return {"installed": True, "version": version, "devices": list(devices), "device_names": devices}


def probe_pycuda() -> dict:
    if not _has("pycuda"):
        return _missing("jetson")
    import pycuda.driver as cuda

    try:
        cuda.init()
    except cuda.Error as e:
        return {"installed": True, "device_count": 0, "error": f"CUDA driver: {e}"}
    names = [cuda.Device(i).name() for i in range(cuda.Device.count())]
    return {"installed": True, "device_count": len(names), "devices": names}


def probe_picamera2() -> dict:
    if not _has("picamera2"):
        return _missing("picamera", PICAMERA_HINT)
    from picamera2 import Picamera2

    cams = [{k: str(v) for k, v in c.items()} for c in Picamera2.global_camera_info()]
    return {"installed": True, "cameras": cams}


# -------------------------------------------------------------------------------------- cameras

def probe_video_device(path: str, timeout: float = 3.0) -> dict:
    """Open one V4L2 node with OpenCV and read a frame, giving up after `timeout` seconds."""
    import cv2

    result: dict = {"path": path, "opened": False}

    def work():
        cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
        try:
            if cap.isOpened():
                result["opened"] = True
                ok, frame = cap.read()
                result["frame"] = list(frame.shape) if ok and frame is not None else None
        finally:
            cap.release()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        result["error"] = f"no answer within {timeout:g} s"
    return result


def _v4l2_name(path: str) -> str | None:
    try:
        return Path(f"/sys/class/video4linux/{Path(path).name}/name").read_text().strip()
    except OSError:
        return None


def probe_cameras(timeout: float = 3.0, pattern: str = "/dev/video*") -> list[dict]:
    """Every /dev/video* node (= OpenCV index N on Linux) that OpenCV can open; empty when there is none."""
    nodes = sorted(glob.glob(pattern), key=lambda p: (len(p), p))
    if not nodes or not _has("cv2"):
        return [{"path": p, "opened": False, "error": "OpenCV is not installed"} for p in nodes]
    out = []
    for p in nodes[:8]:
        r = probe_video_device(p, timeout)
        m = re.search(r"(\d+)$", p)
        r.update(index=int(m.group(1)) if m else None, name=_v4l2_name(p), uri=f"v4l2://{p}")
        out.append(r)
    return out


def probe_extras() -> dict:
    return {extra: [m for m in mods if not _has(m)] for extra, mods in EXTRAS.items()}


def board_warning(board: str | None, jetson: bool, venv: bool, system_site: bool | None) -> str | None:
    """A venv on a Jetson / Raspberry Pi that cannot see the system's TensorRT, OpenCV or picamera2."""
    kind = "Jetson" if jetson or (board and "jetson" in board.lower()) else (
        "Raspberry Pi" if board and "raspberry pi" in board.lower() else None)
    if kind and venv and not system_site:
        what = "JetPack's TensorRT and GStreamer OpenCV" if kind == "Jetson" else "picamera2 and libcamera"
        return (f"this venv has no system site-packages, so it cannot see {what} on this {kind}: "
                "recreate it with python3 -m venv --system-site-packages")
    return None


# ------------------------------------------------------------------------------------- assemble

TENSORRT_HINT = ("on a Jetson TensorRT comes with JetPack (python3-libnvinfer): use a venv with "
                 "--system-site-packages")
PROBES = {"python": probe_python, "platform": probe_platform, "cpu": cpu_info,
          "numpy": _version_probe("numpy", "runtime"), "opencv": probe_opencv, "torch": probe_torch,
          "onnxruntime": probe_onnxruntime, "openvino": probe_openvino,
          "tensorrt": _version_probe("tensorrt", "jetson", TENSORRT_HINT), "pycuda": probe_pycuda,
          "picamera2": probe_picamera2}


def collect(camera_timeout: float = 3.0) -> dict:
    """Run every probe; a probe that raises is recorded as {"error": ...}, never propagated."""
    report: dict = {}
    for name, fn in [*PROBES.items(), ("cameras", lambda: probe_cameras(camera_timeout)),
                     ("extras_missing", probe_extras)]:
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - doctor reports a broken library instead of crashing
            report[name] = {"error": f"{type(e).__name__}: {e}"}
    extras = report.get("extras_missing")
    report["missing_extras"] = sorted(k for k, v in extras.items() if v) if isinstance(extras, dict) else []
    report["warnings"] = [v["warning"] for v in report.values() if isinstance(v, dict) and v.get("warning")]
    pf, py = report.get("platform", {}), report.get("python", {})
    if "error" not in pf and "error" not in py:
        warn = board_warning(pf["board"], pf["jetson"], py["venv"], py["system_site_packages"])
        report["warnings"] += [warn] if warn else []
    return report


# ------------------------------------------------------------------------------------- printing

def _lib_row(name: str, info) -> tuple[str, str, str]:
    if not isinstance(info, dict):
        return name, "?", str(info)
    if "error" in info and not info.get("installed"):
        return name, "[red]error[/]", info["error"]
    if not info.get("installed", True):
        detail = f"not installed ({info['install']})" + (f"; {info['hint']}" if info.get("hint") else "")
        return name, "[yellow]missing[/]", detail
    details = {"opencv": lambda i: f"GStreamer {'yes' if i['gstreamer'] else 'no'}; NMS {i.get('nms', '?')}",
               "torch": lambda i: (f"CUDA {i['cuda_version']}: {', '.join(i['cuda_devices'])}"
                                   if i["cuda_available"] else "CUDA not available (CPU only)"),
               "onnxruntime": lambda i: ", ".join(i["providers"]),
               "openvino": lambda i: ", ".join(f"{k} ({v})" for k, v in i["device_names"].items()),
               "pycuda": lambda i: i.get("error") or f"{i['device_count']} CUDA device(s)",
               "picamera2": lambda i: f"{len(i['cameras'])} camera(s)"}
    version = str(info.get("version", "yes")).split("-")[0]
    return name, f"[green]{version}[/]", details.get(name, lambda i: "")(info)


def _camera_line(c: dict) -> str:
    if c.get("frame"):
        state = f"frame {c['frame'][1]}x{c['frame'][0]}, open with --source {c['uri']}"
    else:
        state = c.get("error") or ("opened, no frame" if c["opened"] else "cannot open")
    return f"{c['path']} ({c.get('name') or '?'}): {state}"


def _rows(report: dict) -> list[tuple[str, str, str]]:
    """(component, status markup, plain details) for every probe; a failed probe shows its error."""
    rows = []
    for name, info in report.items():
        if isinstance(info, dict) and set(info) == {"error"}:
            rows.append((name, "[red]probe failed[/]", info["error"]))
        elif name == "python":
            rows.append(("python", info["version"], info["executable"] + (" (venv)" if info["venv"] else "")))
        elif name == "platform":
            rows.append(("cyto-edge", info["cyto_edge"], ""))
            board = (info["board"] or "") + (" (Jetson)" if info["jetson"] else "")
            rows.append(("system", f"{info['os']} {info['arch']}", board))
        elif name == "cpu":
            flags = " ".join(f"{'+' if v else '-'}{k}" for k, v in info["int8_flags"].items())
            rows.append(("cpu", f"{info['logical_cores']} cores", f"{info['model']}\n{flags}\n{info['int8_note']}"))
        elif name == "cameras":
            txt = "\n".join(_camera_line(c) for c in info) or "no /dev/video* device"
            rows.append(("cameras", f"{sum(bool(c.get('frame')) for c in info)} usable", txt))
        elif name == "extras_missing":
            missing = [e for e, mods in info.items() if mods]
            status = f"[yellow]{len(missing)} missing[/]" if missing else "[green]complete[/]"
            rows.append(("extras", status, "\n".join(f"{e}: {', '.join(info[e])}" for e in missing)))
        elif name in PROBES:
            rows.append(_lib_row(name, info))
    return rows


def render(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="cyto-edge doctor")
    for col in ("component", "status", "details"):
        t.add_column(col)
    for comp, status, detail in _rows(report):
        t.add_row(comp, status, escape(detail))
    console = Console()
    console.print(t)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
               camera_timeout: float = typer.Option(3.0, "--camera-timeout", min=0.1,
                                                    help="Seconds to wait for each camera to open.")):
        """What this machine has: Python, the CPU's INT8 instructions, backends, accelerators, cameras.

        Lists numpy/OpenCV (and whether OpenCV has GStreamer), torch and CUDA, ONNX Runtime providers,
        OpenVINO devices, TensorRT, pycuda, picamera2, the cameras OpenCV can open, and which
        `pip install 'cyto-edge[EXTRA]'` extras are missing. Always exits 0.
        """
        report = collect(camera_timeout)
        if json_out:
            from cyto_edge._cli_util import print_json

            print_json(report)
        else:
            render(report)
