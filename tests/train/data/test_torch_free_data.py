"""The torch-free runtime's `eval BUNDLE --data D` reuses the readers: none of them may import torch."""
import pkgutil
import subprocess
import sys

import cyto_edge.train.data as data_pkg


def test_data_modules_do_not_import_torch():
    mods = ["cyto_edge.train.data"] + [m.name for m in pkgutil.walk_packages(data_pkg.__path__, "cyto_edge.train.data.")
                                       if m.name != "cyto_edge.train.data.torch_data"]
    for expected in ("coco", "voc", "cric", "weak", "classification", "load", "split", "check", "summary", "cli"):
        assert f"cyto_edge.train.data.{expected}" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "from cyto_edge.train.data import load_detection, split_dataset, load_classification\n"
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
