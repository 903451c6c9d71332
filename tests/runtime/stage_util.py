"""Second stages built here for the tests: a tiny learned FOV grader exported to ONNX (untrained weights,
seeded), cells chosen from the nuclei as the runtime chooses them."""
from __future__ import annotations

import numpy as np

CELLS = {"source": "nuclei", "max_cells": 16, "row_px": 32.0, "rank": "nuclear_area", "window_um": 48.0,
         "um_per_px": 1.0, "merge": {}}


def grader_onnx(tmp_path):
    """(exported grader.onnx with grades NILM, LSIL, HSIL, its GraderSettings)."""
    import torch

    from cyto_edge.export.second_stage import export_grader
    from cyto_edge.train.cellcrops import CropSpec
    from cyto_edge.train.grade_train import FovSet, GraderSettings, checkpoint
    from cyto_edge.train.models.grader import FOVGrader

    s = GraderSettings(crop=24, width=4, hidden=8, vit_dim=16, vit_layers=1, vit_heads=2, max_cells=16,
                       window_um=48.0)
    torch.manual_seed(0)
    model = FOVGrader(s.config(3)).eval()
    fs = FovSet([], np.zeros(0, np.int64), ["NILM", "LSIL", "HSIL"], [], CELLS, CropSpec(context=0.0, fixed_side=48))
    torch.save(checkpoint(model, s, fs, {}), tmp_path / "grader.pt")
    return export_grader(tmp_path / "grader.pt", tmp_path / "grader.onnx"), s
