"""The demo's sizes (one table, QUICK and FULL) and the command line of each step.

Every size the demo uses is in `DemoSize` below: images, training steps, calibration and gate images,
the slide, and the seconds each step is expected to take on 2 free CPU cores (shown beside the step
while it runs; retune them together with the budgets). The training budgets are steps, not minutes:
the trainer runs `steps` optimizer steps in `epochs` epochs and validates after each epoch.
Recipes are referenced by name and shortened with `--set` overrides; no recipe file is changed.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoSize:
    name: str
    # -- cyto-edge synth: the dataset (train + test) and the slide of the moving stage
    images: int                      # fields, train + test
    image_size: int                  # field side, px (1 µm/px)
    label_noise: str                 # train boxes: drop=F (removed), jitter=F (shift/resize)
    weak_fraction: float             # train images with image-level labels only (MIL learns from them)
    test_fraction: float
    slide_size: str                  # WIDTHxHEIGHT px
    stops: int                       # stops of the moving stage over the slide
    synth_workers: int
    # -- validation split (data split; the same seed and fraction as the trainer's own split)
    val_fraction: float
    val_images: int                  # at most this many validation images per evaluation
    # -- teacher: cyto-edge train RECIPE
    teacher_recipe: str
    teacher_model: str | None        # None: the recipe's model
    teacher_steps: int
    teacher_epochs: int
    teacher_batch: int
    # -- student: cyto-edge distill RECIPE --teacher (local distillation + MIL)
    student_recipe: str
    student_model: str | None
    student_steps: int
    student_epochs: int
    student_batch: int
    bag_proposals: int | None        # MIL proposals per weak field (None: the recipe's)
    # -- export --target cpu --precision int8, calibrate, eval
    calib_images: int                # model-size tiles for INT8 calibration
    gate_images: int                 # validation images of the export gate
    target_recall: float             # calibrate: per-class operating thresholds
    test_images: int | None          # eval on the test split (None: all)
    # -- expected seconds per step on 2 free cores (progress display only)
    expect_s: dict = field(default_factory=dict)


QUICK = DemoSize(
    name="quick", images=24, image_size=768, label_noise="drop=0.2,jitter=0.1", weak_fraction=0.25,
    test_fraction=0.2, slide_size="2048x1536", stops=4, synth_workers=1,
    val_fraction=0.2, val_images=4,
    teacher_recipe="tiny", teacher_model=None, teacher_steps=40, teacher_epochs=1, teacher_batch=8,
    student_recipe="student_ld_mil", student_model="tiny", student_steps=40, student_epochs=1, student_batch=8,
    bag_proposals=100,
    calib_images=8, gate_images=4, target_recall=0.9, test_images=None,
    expect_s={"synth": 5, "split": 1, "teacher": 20, "student": 40, "export": 30, "calibrate": 6,
              "evaluate": 8, "run": 9, "report": 8},
)

FULL = DemoSize(
    name="full", images=64, image_size=1024, label_noise="drop=0.2,jitter=0.1", weak_fraction=0.3,
    test_fraction=0.2, slide_size="3072x2304", stops=8, synth_workers=2,
    val_fraction=0.1, val_images=8,
    teacher_recipe="teacher_cpu", teacher_model=None, teacher_steps=100, teacher_epochs=1, teacher_batch=8,
    student_recipe="student_ld_mil", student_model=None, student_steps=170, student_epochs=1, student_batch=8,
    bag_proposals=None,
    calib_images=32, gate_images=8, target_recall=0.9, test_images=8,
    expect_s={"synth": 10, "split": 1, "teacher": 165, "student": 340, "export": 50, "calibrate": 12,
              "evaluate": 20, "run": 16, "report": 10},
)

SIZES = {"quick": QUICK, "full": FULL}

# (key, title) of each step, in order; the key names its log file (OUT/logs/NN-key.log)
STEPS = (
    ("synth", "synthesize a dataset and a slide"),
    ("split", "carve the validation split"),
    ("teacher", "train the teacher"),
    ("student", "distil the student (LD + MIL)"),
    ("export", "export the INT8 bundle through the gate"),
    ("calibrate", "calibrate operating thresholds"),
    ("evaluate", "evaluate the bundle on the test split"),
    ("run", "run the bundle on the moving stage"),
    ("report", "grade the slide in the daemon, save the report"),
)
SLIDE_ID = "DEMO-SLIDE"


@dataclass(frozen=True)
class Paths:
    """Where each step writes, under OUT (absolute paths)."""

    out: Path
    data: Path          # the synthetic set (CDetector layout) and data/slide/
    slide: Path
    teacher: Path       # runs/teacher/best.pt
    student: Path
    bundle: Path
    eval: Path          # metrics.json, pr_*.png
    video: Path
    fovs: Path          # JSON lines of `run`, one per graded FOV, then the summary
    report: Path        # standalone HTML
    report_json: Path
    store: Path         # the daemon's SQLite store and images
    profiles: Path
    logs: Path
    summary: Path
    marker: Path

    @classmethod
    def of(cls, out: str | Path) -> "Paths":
        o = Path(out).expanduser().resolve()
        return cls(out=o, data=o / "data", slide=o / "data" / "slide", teacher=o / "runs" / "teacher",
                   student=o / "runs" / "student", bundle=o / "demo.cytobundle", eval=o / "eval",
                   video=o / "slide.mp4", fovs=o / "fovs.jsonl", report=o / "report.html",
                   report_json=o / "report.json", store=o / "daemon", profiles=o / "profiles", logs=o / "logs",
                   summary=o / "summary.json", marker=o / MARKER)

    @property
    def runs(self) -> Path:
        return self.teacher.parent

    @property
    def pr_curves(self) -> Path:
        return self.eval / "pr_all.png"


MARKER = ".cyto-edge-demo"


def cli(*args) -> list[str]:
    """argv of a `cyto-edge` command run with this interpreter."""
    return [sys.executable, "-m", "cyto_edge.cli", *map(str, args)]


def task(*args) -> list[str]:
    """argv of a demo task (cyto_edge/demo/tasks.py) run with this interpreter."""
    return [sys.executable, "-m", "cyto_edge.demo.tasks", *map(str, args)]


def shown(argv: list[str]) -> str:
    """The command as a user would type it."""
    if argv[1:3] == ["-m", "cyto_edge.cli"]:
        return shlex.join(["cyto-edge", *argv[3:]])
    return shlex.join(["python", *argv[1:]])


def synth_cmd(p: Paths, s: DemoSize) -> list[str]:
    return cli("synth", p.data, "--images", s.images, "--size", s.image_size, "--seed", 0,
               "--label-noise", s.label_noise, "--weak-fraction", s.weak_fraction, "--test-fraction", s.test_fraction,
               "--slide-size", s.slide_size, "--stops", s.stops, "--workers", s.synth_workers)


def split_cmd(p: Paths, s: DemoSize) -> list[str]:
    return cli("data", "split", p.data, "--val-fraction", s.val_fraction, "--seed", 0)


def _train_sets(p: Paths, s: DemoSize, who: str, threads: int, mil: bool) -> list[str]:
    """--set overrides that shorten a recipe to the demo's size (teacher or student)."""
    steps, epochs, batch = (getattr(s, f"{who}_{k}") for k in ("steps", "epochs", "batch"))
    sets = [f"data.val_fraction={s.val_fraction}", "data.split_seed=0", f"data.max_val_images={s.val_images}",
            f"schedule.epochs={epochs}", f"schedule.steps_per_epoch={max(1, steps // epochs)}",
            f"optim.batch_size={batch}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"threads={threads}", "tensorboard=false"]
    model = getattr(s, f"{who}_model")
    if model:
        sets += [f"model.name={model}", "model.kwargs={}"]
    if mil and s.bag_proposals:
        sets.append(f"mil.bag_proposals={s.bag_proposals}")
    return [a for x in sets for a in ("--set", x)]


def teacher_cmd(p: Paths, s: DemoSize, threads: int, recipe: str | None = None) -> list[str]:
    return cli("train", recipe or s.teacher_recipe, "--data", p.data, "--out", p.runs, "--name", "teacher",
               *_train_sets(p, s, "teacher", threads, mil=False))


def student_cmd(p: Paths, s: DemoSize, threads: int, recipe: str | None = None) -> list[str]:
    recipe = recipe or s.student_recipe
    return cli("distill", recipe, "--teacher", p.teacher / "best.pt", "--data", p.data, "--out", p.runs,
               "--name", "student", *_train_sets(p, s, "student", threads, mil=_has_mil(recipe)))


def _has_mil(recipe: str) -> bool:
    """Whether a shipped recipe (or a YAML file) has a `mil:` section (a --set mil.x would add one)."""
    from cyto_edge.train.config import CONFIG_DIR

    f = Path(recipe) if Path(recipe).exists() else CONFIG_DIR / f"{recipe}.yaml"
    try:
        return any(line.startswith("mil:") for line in f.read_text().splitlines())
    except OSError:
        return False


def export_cmd(p: Paths, s: DemoSize, threads: int) -> list[str]:
    return cli("export", p.student / "best.pt", "--target", "cpu", "--precision", "int8",
               "--calib-images", s.calib_images, "--val-images", s.gate_images, "--threads", threads,
               "--out", p.bundle)


def calibrate_cmd(p: Paths, s: DemoSize, threads: int) -> list[str]:
    return cli("calibrate", p.bundle, "--data", p.data, "--split", "val", "--target-recall", s.target_recall,
               "--threads", threads, "--max-images", s.val_images)


def evaluate_cmd(p: Paths, s: DemoSize, threads: int, precision: str) -> list[str]:
    extra = ["--max-images", s.test_images] if s.test_images else []
    return task("evaluate", p.bundle, "--data", p.data, "--split", "test", "--out", p.eval,
                "--precision", precision, "--threads", threads, *extra)


def run_cmd(p: Paths, threads: int, precision: str) -> list[str]:
    source = f"synth://?realtime=0&path={p.slide}"
    return cli("run", p.bundle, "--source", source, "--precision", precision, "--threads", threads,
               "--out", p.video, "--jsonl", p.fovs)


def report_cmd(p: Paths) -> list[str]:
    return task("report", "--profile", p.profiles / "report.yaml", "--html", p.report, "--json", p.report_json,
                "--slide-id", SLIDE_ID)


def serve_cmd(p: Paths) -> list[str]:
    return cli("serve", "--profile", p.profiles / "serve.yaml", "--start-session", SLIDE_ID + "-LIVE")
