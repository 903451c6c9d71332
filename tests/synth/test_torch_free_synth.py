"""cyto_edge.synth runs on the device (synth://): numpy and OpenCV only, never torch."""
import pkgutil
import subprocess
import sys

import cyto_edge.synth as synth


def test_synth_modules_import_without_torch():
    mods = [m.name for m in pkgutil.walk_packages(synth.__path__, prefix="cyto_edge.synth.")]
    assert {"cyto_edge.synth.field", "cyto_edge.synth.slide", "cyto_edge.synth.writer"} <= set(mods)
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'torchvision', 'sklearn', 'cyto_edge.train', 'cyto_edge.export') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
