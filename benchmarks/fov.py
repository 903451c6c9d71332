"""Per-frame cost of the quality and stage-still measures at 1280x960 (focus, stillness, empty field, and
FovTracker.update with all of them), on one OpenCV thread.

The frames are a textured field panned by a few pixels per frame (so phase correlation has real work),
rendered once before timing. Targets (issue 7): a few ms per frame, far below a 30 fps frame period.
"""
from __future__ import annotations

import cv2
import numpy as np
from _common import emit, parser, timer

from cyto_edge.runtime.fov import FovTracker
from cyto_edge.runtime.quality import QualityConfig, _resize, analyze, focus_score, tissue_fraction
from cyto_edge.runtime.sources import Frame

W, H = 1280, 960


def make_frames(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """(H, W, 3) uint8 BGR frames of a cell-like field, each shifted by ~3 px from the previous one."""
    big = np.empty((H + 64, W + 3 * n + 64, 3), np.float32)
    big[:] = (232, 228, 236)
    for _ in range(big.shape[0] * big.shape[1] // 6000):
        x, y = rng.uniform(0, big.shape[1]), rng.uniform(0, big.shape[0])
        cv2.ellipse(big, (int(x), int(y)), tuple(int(a) for a in rng.uniform(25, 60, 2)), rng.uniform(0, 180),
                    0, 360, tuple(float(c) for c in rng.uniform(110, 230, 3)), -1, cv2.LINE_AA)
    big += rng.normal(0, 3, big.shape).astype(np.float32)
    big = np.clip(big, 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(big[32:32 + H, 3 * i:3 * i + W]) for i in range(n)]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cv2.setNumThreads(1)
    cfg = QualityConfig()
    n, iters = (60, 200) if args.small else (120, 2000)
    for seed in args.seeds:
        frames = make_frames(np.random.default_rng(seed), n)
        smalls = [analyze(f, cfg).small_gray.astype(np.float32) for f in frames]
        win = cv2.createHanningWindow((smalls[0].shape[1], smalls[0].shape[0]), cv2.CV_32F)
        it = iter(range(1 << 62))

        def focus():
            mid, _ = _resize(frames[next(it) % n], cfg.focus_side)
            focus_score(cv2.cvtColor(mid, cv2.COLOR_BGR2GRAY))

        def still():
            i = next(it) % (n - 1)
            cv2.phaseCorrelate(smalls[i], smalls[i + 1], win)

        def empty():
            small, _ = _resize(frames[next(it) % n], cfg.small_side)
            tissue_fraction(small, cfg)

        tracker = FovTracker()

        def update():
            i = next(it)
            tracker.update(Frame(frames[i % n], i, 0.0))

        figures = {}
        for name, fn in (("focus", focus), ("still", still), ("empty", empty), ("fov_update", update)):
            figures.update(timer(fn, warmup=10, iters=iters).figures(f"{name}_ms"))
        emit("fov", figures, seed=seed, frame=[W, H], opencv_threads=1, focus_side=cfg.focus_side,
             small_side=cfg.small_side, iters=iters)


if __name__ == "__main__":
    main()
