"""The trained student behind benchmarks/export.py: a cached `cyto-edge synth` set and a cached checkpoint of
the CPU student recipe (`cyto-edge train student_cpu`), so repeated benchmark runs export the same model."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from _cache import cached
from _multicell import synth_dir

RECIPE = "student_cpu"


def settings(small: bool) -> dict:
    """The recipe as shipped (10 epochs of 60 steps of 16 crops); --small trains on fewer, smaller fields."""
    if small:
        return dict(images=160, size=768, epochs=10, steps=60, test_images=16)
    return dict(images=300, size=1024, epochs=10, steps=60, test_images=40)


def trained_student(st: dict, threads: int = 1) -> tuple[Path, Path, dict]:
    """(data root, checkpoint path, training result) of the student recipe on the cached synth set."""
    data = synth_dir(st["images"], st["size"], seed=0, um_per_px=1.0)
    sets = [f"data.root={data}", f"schedule.epochs={st['epochs']}", f"schedule.steps_per_epoch={st['steps']}",
            "tensorboard=false", "workers=0", "seed=0"]
    key = {"what": "export-bench-student", "recipe": RECIPE, "sets": sets[1:], "data": str(data)}
    sets.append(f"threads={threads}")   # not in the key: the thread count does not change the recipe

    def build(d: Path) -> None:
        from cyto_edge.train.config import load_config
        from cyto_edge.train.loop import Trainer

        t0 = time.monotonic()
        res = Trainer(load_config(RECIPE, [*sets, f"out_dir={d / 'runs'}", "name=student"])).run()
        shutil.copy(res["best"], d / "best.pt")
        (d / "train.json").write_text(__import__("json").dumps(
            {"best_map50": res["best_map50"], "minutes": round((time.monotonic() - t0) / 60, 1),
             "command": f"cyto-edge train {RECIPE} " + " ".join(f"--set {s}" for s in sets)}))

    d = cached(key, build, kind="ckpt")
    return data, d / "best.pt", __import__("json").loads((d / "train.json").read_text())


if __name__ == "__main__":  # train (or find) the student: python benchmarks/_export_model.py [--small]
    import torch

    torch.set_num_threads(1)
    print(trained_student(settings("--small" in sys.argv)))
