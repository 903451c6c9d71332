"""The parameters of a synthetic set, validated into one-line `BadInput` errors (exit 2)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cyto_edge.errors import BadInput


@dataclass(frozen=True)
class SynthOptions:
    images: int = 100                 # fields in train + test
    size: int = 1024                  # field side in pixels (square)
    seed: int = 0
    drop: float = 0.0                 # label noise (train): fraction of boxes removed
    jitter: float = 0.0               # label noise (train): max shift / resize as a fraction of box size
    weak_fraction: float = 0.0        # train images that keep only image-level labels
    test_fraction: float = 0.2
    um_per_px: float = 1.0
    max_object_px: float = 160.0      # no labelled object longer than this (tile overlap of the runtime)
    slide: bool = True
    slide_width: int = 4096
    slide_height: int = 3072
    stops: int = 12                   # stops of the moving-stage schedule
    workers: int = 1

    def __post_init__(self):
        _check(self.images >= 1, "--images", "must be at least 1", self.images)
        _check(64 <= self.size <= 8192, "--size", "must be between 64 and 8192 pixels", self.size)
        _check(self.seed >= 0, "--seed", "must be >= 0", self.seed)
        _check(0.0 <= self.drop < 1.0, "--label-noise drop", "must be in [0, 1)", self.drop)
        _check(0.0 <= self.jitter < 1.0, "--label-noise jitter", "must be in [0, 1)", self.jitter)
        _check(0.0 <= self.weak_fraction <= 1.0, "--weak-fraction", "must be in [0, 1]", self.weak_fraction)
        _check(0.0 <= self.test_fraction < 1.0, "--test-fraction", "must be in [0, 1)", self.test_fraction)
        _check(0.1 <= self.um_per_px <= 10.0, "--um-per-px", "must be between 0.1 and 10", self.um_per_px)
        _check(16 <= self.max_object_px <= self.size, "--max-object-px", f"must be between 16 and --size ({self.size})",
               self.max_object_px)
        _check(self.stops >= 1, "--stops", "must be at least 1", self.stops)
        _check(self.workers >= 1, "--workers", "must be at least 1", self.workers)
        if self.slide:
            _check(self.slide_width >= 640 and self.slide_height >= 480, "--slide-size",
                   "must be at least 640x480", f"{self.slide_width}x{self.slide_height}")

    @property
    def n_test(self) -> int:
        n = int(round(self.images * self.test_fraction))
        if self.test_fraction > 0 and self.images >= 2:
            n = min(max(n, 1), self.images - 1)
        return n

    @property
    def n_train(self) -> int:
        return self.images - self.n_test

    def to_dict(self) -> dict:
        """Every parameter that shapes the output (`workers` does not: the files are the same)."""
        d = asdict(self)
        d.pop("workers")
        return d


def _check(ok: bool, name: str, what: str, got) -> None:
    if not ok:
        raise BadInput(f"{name}: {what} (got {got})")


def parse_label_noise(text: str | None) -> tuple[float, float]:
    """'drop=0.2,jitter=0.1' -> (0.2, 0.1); either key may be left out."""
    vals = {"drop": 0.0, "jitter": 0.0}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in vals:
            raise BadInput(f"--label-noise: expected drop=F,jitter=F (got {part!r})")
        try:
            vals[key] = float(val)
        except ValueError:
            raise BadInput(f"--label-noise {key}: {val!r} is not a number") from None
    return vals["drop"], vals["jitter"]


def parse_size(text: str, name: str = "--slide-size") -> tuple[int, int]:
    """'4096x3072' -> (4096, 3072)."""
    w, sep, h = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(w), int(h)
    except ValueError:
        raise BadInput(f"{name}: expected WIDTHxHEIGHT in pixels, e.g. 4096x3072 (got {text!r})") from None
