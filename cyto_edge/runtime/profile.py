"""Device profiles: one YAML per device in firmware_configs/, parsed into `DeviceProfile`.

Every section forbids unknown keys, so a typo is an error with its path
(`firmware_configs/x.yaml: camera.fsp: unknown field; did you mean 'fps'?`). The camera is chosen by
`kind` (opencv | gstreamer | picamera2 | folder | synth), the engine by `backend`
(onnxruntime | openvino | tensorrt). A profile sets operating choices only: what the model was trained
with (input size, normalisation, scale, classes) comes from the bundle and cannot be overridden here.
Relative paths resolve against the profile's directory. The models do no I/O; `load_profile` does.
"""
from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cyto_edge.errors import BadInput
from cyto_edge.runtime.profile_errors import one_line_error
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- camera -----------------------------------------------------------------------------------------
class ExposureLock(_M):
    lock: bool = True                                  # fixed exposure: a sparse field must not brighten
    time_us: int | None = Field(None, gt=0)            # None: the automatic value at start, then locked
    gain: float | None = Field(None, ge=1.0)           # analogue gain (picamera2)
    value: float | None = None                         # backend units for CAP_PROP_EXPOSURE (opencv / v4l2)


class WhiteBalanceLock(_M):
    lock: bool = True
    colour_gains: tuple[float, float] | None = None    # (red, blue) gains (picamera2)
    temperature_k: int | None = Field(None, ge=1000, le=15000)  # CAP_PROP_WB_TEMPERATURE (opencv / v4l2)


class _Camera(_M):
    width: int | None = Field(None, gt=0)              # pixels; None: the camera's default
    height: int | None = Field(None, gt=0)
    fps: float = Field(30.0, gt=0)
    um_per_px: float = Field(..., gt=0)                # at the sensor, through the objective in use
    exposure: ExposureLock = Field(default_factory=ExposureLock)
    white_balance: WhiteBalanceLock = Field(default_factory=WhiteBalanceLock)
    timeout_s: float = Field(10.0, gt=0)               # a camera that does not open by then is an error


class OpenCVCamera(_Camera):
    kind: Literal["opencv"]
    uri: str | None = None                             # file://, v4l2:///dev/video0, rtsp://, http://
    index: int | None = Field(None, ge=0)              # a USB camera by index
    fourcc: str | None = Field(None, min_length=4, max_length=4)  # e.g. MJPG for 1080p30 on USB cameras

    @model_validator(mode="after")
    def _one_target(self):
        if (self.uri is None) == (self.index is None):
            raise ValueError("give exactly one of uri or index")
        if self.uri is not None and self.uri.startswith(("gst://", "picam2://", "folder://", "synth://")):
            raise ValueError(f"uri {self.uri.split(':')[0]}:// belongs to another camera kind")
        return self


class GStreamerCamera(_Camera):
    kind: Literal["gstreamer"]
    pipeline: str = Field(..., min_length=1)           # may use {width} {height} {fps} {sensor_id}
    sensor_id: int = Field(0, ge=0)

    @field_validator("pipeline")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f}
        bad = names - {"width", "height", "fps", "sensor_id"}
        if bad:
            raise ValueError(f"unknown placeholder {{{sorted(bad)[0]}}}; use {{width}} {{height}} {{fps}} {{sensor_id}}")
        return v


class Picamera2Camera(_Camera):
    kind: Literal["picamera2"]
    index: int = Field(0, ge=0)
    width: int | None = Field(2028, gt=0)
    height: int | None = Field(1520, gt=0)
    still: bool = False                                # still configuration: best quality, lower rate
    settle_s: float = Field(1.0, ge=0)                 # automatic exposure / white balance settle, then lock


class FolderCamera(_Camera):
    kind: Literal["folder"]
    path: Path
    loop: bool = False


class SynthCamera(_Camera):
    kind: Literal["synth"]
    seed: int = 0
    realtime: bool = True
    options: dict[str, Union[bool, int, float, str]] = Field(default_factory=dict)  # passed to synth://


Camera = Annotated[Union[OpenCVCamera, GStreamerCamera, Picamera2Camera, FolderCamera, SynthCamera],
                   Field(discriminator="kind")]


# -- engine -----------------------------------------------------------------------------------------
class _Engine(_M):
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    threads: int | None = Field(None, gt=0)            # None: the backend's default


def _device(pattern: str, choices: str):
    """A validator for `device`: the regex, or a message listing the valid spellings."""
    def check(cls, v: str) -> str:
        if not re.fullmatch(pattern, v):
            raise ValueError(f"{v!r} is not a device of this backend; use {choices}")
        return v
    return field_validator("device")(classmethod(check))


class OnnxRuntimeEngine(_Engine):
    backend: Literal["onnxruntime"]
    device: str = "cpu"
    spin_wait: bool = False     # intra-op threads busy-waiting between runs take the CPU from preview and web server
    _dev = _device(r"cpu|cuda(:\d+)?|tensorrt(:\d+)?", "cpu, cuda, cuda:N or tensorrt (execution providers)")


class OpenVINOEngine(_Engine):
    backend: Literal["openvino"]
    device: str = "CPU"
    _dev = _device(r"CPU|GPU(\.\d+)?|NPU|AUTO(:[A-Z0-9.,]+)?", "CPU, GPU, GPU.N, NPU or AUTO")


class TensorRTEngine(_Engine):
    backend: Literal["tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    device: str = "cuda:0"
    dla_core: int | None = Field(None, ge=0)           # Orin: run on a DLA core instead of the GPU
    _dev = _device(r"cuda:\d+", "cuda:N")


Engine = Annotated[Union[OnnxRuntimeEngine, OpenVINOEngine, TensorRTEngine], Field(discriminator="backend")]
TAGS = {"camera": "kind", "engine": "backend"}   # discriminated sections and their tag field


# -- pipeline, grading, storage, server ---------------------------------------------------------------
class PipelineSettings(_M):
    tile_overlap_px: int | None = Field(None, ge=0)    # None: the bundle's (>= the largest object)
    edge_margin: float | None = Field(None, ge=0)      # None: the bundle's
    batch_size: int = Field(4, gt=0)                   # tiles per engine call
    preview_max_side: int = Field(960, ge=64)          # the live view is downscaled to this
    focus_relative: float = Field(0.85, gt=0, le=1)    # sharp: focus >= this x the best of the stop
    focus_floor: float = Field(0.0, ge=0)              # never capture below this variance of the Laplacian
    focus_min_recent: float = Field(0.35, ge=0, le=1)  # never capture below this x the recent best (blurred)
    still_threshold_px: float = Field(1.5, gt=0)       # motion per frame (frame pixels) below which it is still
    still_frames: int = Field(3, ge=1)                 # consecutive still frames before a stop counts
    settle_frames: int = Field(3, ge=1)                # frames without focus improvement: focus has peaked
    max_wait_frames: int = Field(24, ge=1)             # then the best frame of the stop is taken
    plateau_frames: int = Field(8, ge=1)               # no better focus for this long: a less sharp field is
                                                       # taken before max_wait (fields differ in sharpness)
    empty_threshold: float = Field(0.005, ge=0, le=1)  # tissue fraction below which a field is empty

    def fov_config(self):
        from cyto_edge.runtime.fov import FovConfig

        return FovConfig(**{k: getattr(self, k) for k in FovConfig.__dataclass_fields__ if hasattr(self, k)})


FORBIDDEN_OVERRIDES = {"input", "input_size", "size", "mean", "std", "scale", "normalisation", "normalization",
                       "um_per_px", "classes", "bethesda", "priors", "color", "layout"}


class GradingOverrides(_M):
    """Operating choices over the bundle's defaults; class and category names are checked."""

    score_threshold: float | None = Field(None, ge=0, le=1)
    class_thresholds: dict[str, float] = Field(default_factory=dict)  # class -> threshold in [0, 1]
    min_count: int | None = Field(None, ge=1)          # k: detections needed to grade a category
    category_min_count: dict[str, int] = Field(default_factory=dict)  # Bethesda category -> k
    organism_min_count: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _not_model_facts(cls, data: Any):
        if isinstance(data, dict):
            for k in data:
                if str(k).lower() in FORBIDDEN_OVERRIDES:
                    raise ValueError(f"{k}: what the model was trained with comes from the bundle and "
                                     "cannot be overridden in a profile")
        return data

    @field_validator("class_thresholds")
    @classmethod
    def _thr(cls, v: dict[str, float]) -> dict[str, float]:
        for c, t in v.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"{c}: threshold {t} must be in [0, 1]")
        return v

    @field_validator("category_min_count")
    @classmethod
    def _cats(cls, v: dict[str, int]) -> dict[str, int]:
        for c, k in v.items():
            if c not in BETHESDA_ORDER:
                raise ValueError(f"{c!r} is not a Bethesda category ({', '.join(BETHESDA_ORDER)})")
            if k < 1:
                raise ValueError(f"{c}: count must be >= 1")
        return v


class StorageSettings(_M):
    root: Path = Path("data")                          # sessions, FOV images, crops, the SQLite store
    retention_days: int | None = Field(90, gt=0)       # None: keep forever
    disk_budget_mb: int = Field(20_000, gt=0)          # oldest sessions go first beyond this
    jpeg_quality: int = Field(90, ge=1, le=100)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServerSettings(_M):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    token_file: Path | None = None                     # a file holding the API token (mode 600)
    token_env: str | None = None                       # or an environment variable holding it

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_literal_token(cls, data: Any):
        if isinstance(data, dict) and any(str(k).lower() in ("token", "api_token", "password") for k in data):
            raise ValueError("a token must not be written in the profile: use token_file (a file only the "
                             "service can read) or token_env (an environment variable)")
        return data

    @model_validator(mode="after")
    def _token_for_network(self):
        if self.bind not in LOOPBACK and not (self.token_file or self.token_env):
            raise ValueError(f"bind {self.bind} is reachable from the network: set token_file or token_env")
        return self


class DeviceProfile(_M):
    name: str = Field(..., min_length=1)
    description: str = ""
    camera: Camera
    engine: Engine
    bundle: Path                                       # the .cytobundle (directory or archive)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    grading: GradingOverrides = Field(default_factory=GradingOverrides)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)


# -- loading --------------------------------------------------------------------------------------------
def load_profile(path: str | Path) -> DeviceProfile:
    """Read, validate and resolve a profile; any problem is a BadInput of one line naming file and field."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInput(f"{p}: cannot read the profile ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{p}:{where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{p}: a profile must be a YAML mapping (name:, camera:, engine:, bundle:, ...)")
    try:
        prof = DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise BadInput(one_line_error(e, str(p), DeviceProfile, TAGS)) from None
    return resolve_paths(prof, p.resolve().parent)


def resolve_paths(prof: DeviceProfile, base: Path) -> DeviceProfile:
    """Relative paths (bundle, storage root, token file, folder camera, file:// URIs) -> under `base`."""
    def r(x: Path | None) -> Path | None:
        return None if x is None else (x.expanduser() if x.expanduser().is_absolute() else base / x)

    upd: dict = {"bundle": r(prof.bundle), "storage": prof.storage.model_copy(update={"root": r(prof.storage.root)}),
                 "server": prof.server.model_copy(update={"token_file": r(prof.server.token_file)})}
    cam = prof.camera
    if isinstance(cam, FolderCamera):
        upd["camera"] = cam.model_copy(update={"path": r(cam.path)})
    elif isinstance(cam, OpenCVCamera) and cam.uri and _is_file_uri(cam.uri):
        path = cam.uri[len("file://"):] if cam.uri.startswith("file://") else cam.uri
        upd["camera"] = cam.model_copy(update={"uri": "file://" + str(r(Path(path)))})
    return prof.model_copy(update=upd)


def _is_file_uri(uri: str) -> bool:
    return uri.startswith("file://") or "://" not in uri and not uri.isdigit()


# -- the camera as a source -------------------------------------------------------------------------------
def camera_uri(profile: DeviceProfile) -> str:
    """The source URI for the profile's camera (options that belong in a URI included)."""
    cam = profile.camera
    size = {k: v for k, v in (("width", cam.width), ("height", cam.height)) if v}
    if isinstance(cam, OpenCVCamera):
        if cam.index is not None:
            return f"v4l2://{cam.index}?" + urlencode({**size, "fps": f"{cam.fps:g}"})
        return cam.uri
    if isinstance(cam, GStreamerCamera):
        return "gst://" + cam.pipeline.format(width=cam.width or 1920, height=cam.height or 1080,
                                              fps=_fraction(cam.fps), sensor_id=cam.sensor_id)
    if isinstance(cam, Picamera2Camera):
        return f"picam2://{cam.index}?" + urlencode({**size, "fps": f"{cam.fps:g}"})
    if isinstance(cam, FolderCamera):
        return f"folder://{cam.path}?" + urlencode({"fps": f"{cam.fps:g}", "loop": int(cam.loop)})
    opts = {"seed": cam.seed, "fps": f"{cam.fps:g}", "realtime": int(cam.realtime), **size}
    opts.update({k: (int(v) if isinstance(v, bool) else v) for k, v in cam.options.items()})
    return "synth://?" + urlencode(opts)


def source_options(profile: DeviceProfile) -> dict:
    """Keyword options for `open_source(camera_uri(profile), **options)`: timeout and locks."""
    cam = profile.camera
    ex, wb = cam.exposure, cam.white_balance
    if isinstance(cam, OpenCVCamera):
        return {"width": cam.width, "height": cam.height, "fps": cam.fps if cam.index is None else None,
                "timeout_s": cam.timeout_s, "fourcc": cam.fourcc, "lock_exposure": ex.lock, "exposure": ex.value,
                "lock_white_balance": wb.lock, "wb_temperature": wb.temperature_k}
    if isinstance(cam, GStreamerCamera):
        return {"timeout_s": cam.timeout_s}
    if isinstance(cam, Picamera2Camera):
        return {"timeout_s": cam.timeout_s, "still": cam.still, "settle_s": cam.settle_s,
                "lock_exposure": ex.lock, "exposure_us": ex.time_us, "analogue_gain": ex.gain,
                "lock_white_balance": wb.lock, "colour_gains": wb.colour_gains}
    return {}


def open_camera(profile: DeviceProfile):
    """The profile's camera as an open Source."""
    from cyto_edge.runtime.sources import open_source

    return open_source(camera_uri(profile), **source_options(profile))


def _fraction(fps: float) -> str:
    """GStreamer framerate caps: 30 -> "30/1", 29.97 -> "2997/100"."""
    if float(fps).is_integer():
        return f"{int(fps)}/1"
    return f"{int(round(fps * 100))}/100"


def summary(profile: DeviceProfile) -> dict:
    """The facts `config check` prints."""
    cam, eng = profile.camera, profile.engine
    size = f"{cam.width}x{cam.height}" if cam.width and cam.height else "camera default"
    uri = re.sub(r"\s+", " ", camera_uri(profile))
    return {"name": profile.name, "camera": f"{cam.kind} {uri}",
            "resolution": size, "fps": cam.fps, "um_per_px": cam.um_per_px,
            "engine": f"{eng.backend} {eng.precision} on {eng.device}" + (f", {eng.threads} threads" if eng.threads else ""),
            "bundle": str(profile.bundle), "storage": str(profile.storage.root),
            "server": f"{profile.server.bind}:{profile.server.port}"}


def check_against_bundle(profile: DeviceProfile, manifest, source: str = "profile") -> list[str]:
    """Raise BadInput when the grading overrides name a class the bundle lacks; return warnings (scale
    mismatch beyond 10%, no model file for the chosen precision)."""
    classes = list(manifest.classes)
    for c in profile.grading.class_thresholds:
        if c not in classes:
            near = difflib.get_close_matches(c, classes, n=1)
            raise BadInput(f"{source}: grading.class_thresholds: class {c!r} is not in the bundle"
                           + (f"; did you mean {near[0]!r}?" if near else f" (its classes: {', '.join(classes)})"))
    warnings = []
    cats = set(manifest.bethesda.values())
    for cat in profile.grading.category_min_count:
        if cat not in cats:
            warnings.append(f"grading.category_min_count: no class of the bundle maps to {cat}")
    ratio = profile.camera.um_per_px / manifest.um_per_px
    if abs(ratio - 1.0) > 0.10:
        warnings.append(f"camera.um_per_px {profile.camera.um_per_px:g} vs the model's {manifest.um_per_px:g}: "
                        f"frames are rescaled by {ratio:.3g}")
    prec = {"int8": ("int8-qdq", "int8"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}[profile.engine.precision]
    if not any(f.precision in prec for f in manifest.files if f.role == "detector"):
        warnings.append(f"engine.precision {profile.engine.precision}: the bundle has no detector file for it")
    return warnings
