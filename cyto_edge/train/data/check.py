"""Decode every image of a set (the part of `data check` that loading skips): missing or unreadable
files, and sizes that differ from the annotation, are one-line BadInput errors."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from cyto_edge.errors import BadInput

PROGRESS_FROM = 50  # show a progress bar from this many images


@contextmanager
def _native_stderr_silenced():
    """Decoders (libjpeg, libpng) print their own complaints on fd 2; the error we raise says it in
    one line. Yields the stream for the progress bar (the real stderr)."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # stderr is captured in Python: leave it alone
        real = False
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield sys.stderr
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    out = os.fdopen(os.dup(saved), "w") if real else None
    try:
        yield out or sys.stderr
    finally:
        if out is not None:
            out.flush()
            out.close()
        os.dup2(saved, 2)
        os.close(saved)


def _decode_size(path: str) -> tuple[int, int] | None:
    import cv2

    im = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return None if im is None else (int(im.shape[1]), int(im.shape[0]))


def decode_sizes(files: list[Path], progress: bool = True, workers: int | None = None) -> list[tuple[int, int] | None]:
    """(width, height) of each file after a full decode (None: missing or unreadable), in order."""
    workers = workers or min(4, os.cpu_count() or 1)
    show = progress and len(files) >= PROGRESS_FROM
    with _native_stderr_silenced() as err, ThreadPoolExecutor(workers) as pool:
        it = pool.map(_decode_size, [str(f) for f in files])
        if not (show and getattr(err, "isatty", lambda: False)()):
            return list(it)
        from rich.console import Console
        from rich.progress import Progress

        out = []
        with Progress(console=Console(file=err), transient=True) as bar:
            task = bar.add_task("decoding images", total=len(files))
            for size in it:
                out.append(size)
                bar.advance(task)
        return out


def verify_images(ds, progress: bool = True) -> None:
    """Decode each image of a DetectionDataset; the first problem raises BadInput naming the file."""
    sizes = decode_sizes([im.file for im in ds.images], progress)
    for im, size in zip(ds.images, sizes):
        _verify_one(Path(im.file), size, (im.width, im.height), f"image id {im.image_id!r}")


def verify_items(ds, progress: bool = True) -> None:
    """Decode each distinct file of a ClassificationDataset."""
    files = sorted({str(it.file) for it in ds.items})
    for f, size in zip(files, decode_sizes([Path(f) for f in files], progress)):
        _verify_one(Path(f), size, None, "cell image")


def _verify_one(file: Path, size, expected, what: str) -> None:
    if size is None:
        if not file.is_file():
            raise BadInput(f"{file}: file: missing ({what}); add the image or remove its annotation")
        raise BadInput(f"{file}: file: cannot be decoded ({what}; corrupt or not an image); replace or remove it")
    if expected is not None and tuple(size) != tuple(expected):
        raise BadInput(f"{file}: width/height: the image is {size[0]}x{size[1]} but the annotation says "
                       f"{expected[0]}x{expected[1]} ({what}); fix the annotation's width and height")
