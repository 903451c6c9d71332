"""The device installs cyto-edge[runtime] only: nothing under cyto_edge.runtime may import torch."""
import pkgutil
import subprocess
import sys

import cyto_edge.runtime as rt


def _runtime_modules() -> list[str]:
    mods = ["cyto_edge.runtime"]
    for m in pkgutil.walk_packages(rt.__path__, prefix="cyto_edge.runtime."):
        mods.append(m.name)
    return mods


def test_runtime_modules_do_not_import_torch():
    mods = _runtime_modules()
    assert "cyto_edge.runtime.decode" in mods and "cyto_edge.runtime.bundle" in mods
    code = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if 'torch' in str(e): bad.append((m, str(e)))\n"
        "        continue\n"
        "    for forbidden in ('torch', 'torchvision', 'cyto_edge.train', 'cyto_edge.export'):\n"
        "        if forbidden in sys.modules: bad.append((m, forbidden)); sys.modules.pop(forbidden)\n"
        "print(repr(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_does_not_import_torch():
    code = "import sys; import cyto_edge.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
