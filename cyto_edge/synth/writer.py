"""Write a synthetic set in the CDetector layout.

    OUT/train/*.jpg, OUT/test/*.jpg     fields, JPEG quality 95
    OUT/train.json, OUT/test.json       COCO; train with label noise and weak images, test exact
    OUT/train.clean.json                exact boxes of every train image (before noise / weakening)
    OUT/train_labels.csv                the weak train images: `file,labels` (';'-separated class names;
                                        `file` relative to OUT/train/, like COCO's file_name)
    OUT/synth.json                      every parameter and the counts
    OUT/slide/                          slide.jpg, schedule.json, slide.json (with --slide)

Determinism: image i is rendered from SeedSequence([seed, i]) and the set-level choices (kinds,
classes, splits, weak images, label noise) from SeedSequence([seed, PLAN_KEY]); the same options give
byte-identical files, whatever the number of workers.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from cyto_edge import __version__
from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES, DEFAULT_ORGANISMS
from cyto_edge.synth.coco import GENERATOR, ImageEntry, apply_label_noise, coco_document
from cyto_edge.synth.field import KIND_P, plan_field, render_field
from cyto_edge.synth.optics import FOCUS_SIGMA_UM
from cyto_edge.synth.options import SynthOptions

PLAN_KEY = 0x5EED
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Job:
    index: int                    # global image index (file name and seed)
    split: str                    # train | test
    kind: str                     # lesion | nilm | sparse | empty
    classes: tuple[str, ...]      # labelled classes to draw
    size: int
    um_per_px: float
    max_object_px: float
    seed: int

    @property
    def file_name(self) -> str:
        return f"synth_{self.index:06d}.jpg"


def plan_jobs(opts: SynthOptions) -> tuple[list[Job], set[int]]:
    """Every image's split, kind and labelled classes, and which train images are weak (indices).

    Classes are dealt from a shuffled deck of the 11 classes so that every class appears about equally
    often, in both splits, even in small sets.
    """
    rng = np.random.default_rng(np.random.SeedSequence([opts.seed, PLAN_KEY]))
    kinds = rng.choice(list(KIND_P), size=opts.images, p=list(KIND_P.values()))
    test_idx = set(rng.permutation(opts.images)[:opts.n_test].tolist())
    deck: list[str] = []
    jobs = []
    for i, kind in enumerate(kinds):
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])) if kind == "lesion" else int(kind == "sparse" and rng.random() < 0.5)
        classes = []
        while len(classes) < n:
            if not deck:
                deck = list(rng.permutation(list(DEFAULT_CLASSES)))
            c = deck.pop()
            if c in classes:
                deck.insert(0, c)
                continue
            classes.append(str(c))
        jobs.append(Job(i, "test" if i in test_idx else "train", str(kind), tuple(classes), opts.size,
                        opts.um_per_px, opts.max_object_px, opts.seed))
    train = [j.index for j in jobs if j.split == "train"]
    n_weak = int(round(opts.weak_fraction * len(train)))
    weak = set(np.asarray(train)[rng.permutation(len(train))[:n_weak]].tolist()) if n_weak else set()
    return jobs, weak


def render_job(job: Job) -> tuple[bytes, ImageEntry]:
    """Render one field: JPEG bytes and its entry (exact boxes, truth). Pure function of the job."""
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    area_mm2 = (job.size * job.um_per_px / 1000.0) ** 2
    plan = plan_field(rng, area_mm2, classes=list(job.classes) or None, kind=job.kind)
    f = render_field(rng, job.size, job.size, job.um_per_px, plan, job.max_object_px)
    ok, buf = cv2.imencode(".jpg", f.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV without a JPEG codec
        raise RuntimeError("OpenCV could not encode JPEG")
    truth = dict(f.truth)
    truth["focus_sigma_px"] = round(truth["focus"] * FOCUS_SIGMA_UM / job.um_per_px, 3)
    return buf.tobytes(), ImageEntry(job.file_name, job.size, job.size, f.boxes, f.labels, truth)


def _render_all(jobs: list[Job], workers: int, progress: Callable[[], None] | None):
    if workers <= 1 or len(jobs) < 2:
        for j in jobs:
            item = render_job(j)
            if progress:
                progress()
            yield item
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (OpenCV, rich)
    with ctx.Pool(min(workers, len(jobs))) as pool:
        for item in pool.imap(render_job, jobs, chunksize=1):
            if progress:
                progress()
            yield item


def generate(out: Path, opts: SynthOptions, progress: Callable[[], None] | None = None) -> dict:
    """Write the whole set under `out`; returns the summary also written to synth.json."""
    out = Path(out)
    jobs, weak = plan_jobs(opts)
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for stale in (out / split).glob("synth_*.jpg"):  # a previous set written here (--force)
            stale.unlink()
    entries: dict[str, list[ImageEntry]] = {"train": [], "test": []}
    for job, (jpeg, entry) in zip(jobs, _render_all(jobs, opts.workers, progress)):
        (out / job.split / job.file_name).write_bytes(jpeg)
        entry.weak = job.index in weak
        entries[job.split].append(entry)
    rng = np.random.default_rng(np.random.SeedSequence([opts.seed, PLAN_KEY, 1]))
    noise = apply_label_noise(rng, entries["train"], opts.drop, opts.jitter)
    info = {"um_per_px": opts.um_per_px, "seed": opts.seed, "size": opts.size,
            "focus": f"0 sharp .. 1 very blurred; blur sigma = focus * {FOCUS_SIGMA_UM} um"}
    _write_json(out / "test.json", coco_document(entries["test"], {**info, "split": "test"}, "test"))
    _write_json(out / "train.clean.json", coco_document(entries["train"], {**info, "split": "train", "clean": True}, "clean"))
    _write_json(out / "train.json", coco_document(entries["train"], {
        **info, "split": "train", "label_noise": {"drop": opts.drop, "jitter": opts.jitter},
        "weak_fraction": opts.weak_fraction}, "train"))
    _write_csv(out / "train_labels.csv", [e for e in entries["train"] if e.weak])
    summary = _summary(opts, entries, noise)
    if opts.slide:
        from cyto_edge.synth.slide import SlideParams, write_slide

        summary["slide"] = write_slide(out / "slide", SlideParams.from_options(opts))
    _write_json(out / "synth.json", summary)
    return summary


def _summary(opts: SynthOptions, entries: dict[str, list[ImageEntry]], noise: dict) -> dict:
    def counts(es: list[ImageEntry]) -> dict:
        per = {c: 0 for c in DEFAULT_CLASSES}
        for e in es:
            for c in e.labels:
                per[c] += 1
        kinds = {k: sum(e.truth["kind"] == k for e in es) for k in KIND_P}
        grades: dict[str, int] = {}
        for e in es:
            grades[e.truth["fov_grade"]] = grades.get(e.truth["fov_grade"], 0) + 1
        return {"images": len(es), "boxes": sum(per.values()), "per_class": per, "kinds": kinds,
                "fov_grades": dict(sorted(grades.items())), "weak": sum(e.weak for e in es)}

    return {"generator": GENERATOR, "version": __version__, "options": opts.to_dict(),
            "classes": list(DEFAULT_CLASSES), "organisms": list(DEFAULT_ORGANISMS),
            "focus_sigma_um_at_1": FOCUS_SIGMA_UM,
            "train": counts(entries["train"]), "test": counts(entries["test"]), "label_noise": noise,
            "files": {"train": "train.json", "test": "test.json", "clean": "train.clean.json",
                      "weak_labels": "train_labels.csv"}}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _write_csv(path: Path, weak: list[ImageEntry]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "labels"])
    for e in weak:
        w.writerow([e.file_name, ";".join(e.image_labels)])
    path.write_text(buf.getvalue())
