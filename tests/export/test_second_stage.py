"""Second-stage ONNX export: round trips through ONNX Runtime, variable cell counts, bundle class checks."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cyto_edge.errors import BadInput
from cyto_edge.export.second_stage import add_to_bundle, export_classifier, export_grader, stage_info
from cyto_edge.runtime.bundle import Bundle, InputSpec, Manifest, OutputSpec, file_entry, write_manifest
from cyto_edge.train.cellcrops import CropSet, CropSpec
from cyto_edge.train.classify import ClassifierSettings, build, checkpoint
from cyto_edge.train.grade_train import FovSet, GraderSettings
from cyto_edge.train.grade_train import checkpoint as grader_checkpoint
from cyto_edge.train.models.grader import FOVGrader

torch.set_num_threads(1)


def _perturb_bn(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that the export is checked on more than the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.2 + 1)


@pytest.fixture()
def classifier_ckpt(tmp_path):
    s = ClassifierSettings(arch="small", width=4, img_size=32)
    torch.manual_seed(0)
    model = build(s, 3)
    _perturb_bn(model)
    crops = CropSet(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), ["lsil", "hsil", "normal"],
                    {"lsil": "LSIL", "hsil": "HSIL", "normal": "NILM"}, CropSpec(context=0.25), "test")
    path = tmp_path / "classifier.pt"
    torch.save(checkpoint(model.eval(), s, crops, {"accuracy": 0.9}), path)
    return path


def grader_ckpt(tmp_path, local: bool = True):
    s = GraderSettings(crop=24, width=4, hidden=8, vit_dim=16, vit_layers=1, vit_heads=2, local=local)
    torch.manual_seed(0)
    model = FOVGrader(s.config(3))
    _perturb_bn(model)
    fs = FovSet([], np.zeros(0, np.int64), ["NILM", "LSIL", "HSIL"], [], {"source": "nuclei", "max_cells": 48},
                CropSpec(fixed_side=64))
    path = tmp_path / f"grader_{local}.pt"
    torch.save(grader_checkpoint(model.eval(), s, fs, {"accuracy": 0.7}), path)
    return path, model.eval()


def make_bundle(root, classes=("lsil", "hsil"), bethesda=None):
    root.mkdir()
    np.save(root / "priors.npy", np.zeros((4, 4), np.float32))
    bethesda = bethesda or {"lsil": "LSIL", "hsil": "HSIL"}
    m = Manifest(classes=list(classes), bethesda={c: bethesda[c] for c in classes}, um_per_px=1.0,
                 input=InputSpec(size=(64, 64)), output=OutputSpec(num_priors=4),
                 files=[file_entry(root, "priors.npy", "priors", role="priors")])
    write_manifest(root, m)
    return root


def test_classifier_round_trip_with_a_dynamic_batch(tmp_path, classifier_ckpt):
    path = export_classifier(classifier_ckpt, tmp_path / "clf.onnx")
    st = stage_info(path)
    assert st["kind"] == "classifier" and st["classes"] == ["lsil", "hsil", "normal"]
    assert st["max_abs_diff"] < 1e-4 and st["inputs"]["crops"] == ["N", 3, 32, 32]
    assert st["input"]["mean"] == [0.485, 0.456, 0.406] and st["crop"]["context"] == 0.25
    from cyto_edge.train.classify import load_checkpoint

    model, _ = load_checkpoint(classifier_ckpt)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        got = sess.run(None, {"crops": x.numpy()})[0]
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, model(x).softmax(-1).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("local", [True, False])
def test_grader_round_trip_with_a_variable_number_of_cells(tmp_path, local):
    ckpt, model = grader_ckpt(tmp_path, local)
    path = export_grader(ckpt, tmp_path / "grader.onnx")
    st = stage_info(path)
    assert st["kind"] == "grader" and st["classes"] == ["NILM", "LSIL", "HSIL"] and st["max_abs_diff"] < 1e-4
    assert ("cell_probs" in st["outputs"]) == local and st["cells"]["source"] == "nuclei"
    assert st["empty_fov"] == {"grade": "NILM", "probability": 0.5}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (0, 1, 4, 23):
        x = torch.randn(n, 3, 24, 24)
        outs = sess.run(None, {"cells": x.numpy()})
        with torch.no_grad():
            ref = model(x[None], torch.ones(1, n, dtype=torch.bool))
        np.testing.assert_allclose(outs[0], ref["probs"].numpy(), atol=1e-4)
        np.testing.assert_allclose(outs[1], ref["cell_scores"][0].numpy(), atol=1e-4)
        assert outs[1].shape == (n,) and np.isfinite(outs[0]).all()
        if n == 0:
            np.testing.assert_allclose(outs[0], [[0.5, 0.25, 0.25]], atol=1e-6)
        else:
            assert outs[1].sum() == pytest.approx(1, abs=1e-5)
        if local:
            assert outs[2].shape == (n, 3) and ((outs[2] >= 0) & (outs[2] <= 1)).all()


def test_second_stages_join_a_bundle_when_classes_match(tmp_path, classifier_ckpt):
    bundle = make_bundle(tmp_path / "b.cytobundle")
    add_to_bundle(bundle, export_classifier(classifier_ckpt, tmp_path / "clf.onnx"))
    add_to_bundle(bundle, export_grader(grader_ckpt(tmp_path)[0], tmp_path / "grader.onnx"))
    b = Bundle.open(bundle)                                              # hashes re-verified
    assert set(b.manifest.stages) == {"classifier", "grader"}
    assert b.model_file("onnx", role="grader").name == "grader.onnx"
    assert b.manifest.stages["classifier"]["classes"] == ["lsil", "hsil", "normal"]


def test_add_stage_command_exports_checks_and_adds_either_stage(tmp_path, classifier_ckpt, capsys):
    import json

    from cyto_edge.cli import main

    bundle = make_bundle(tmp_path / "b.cytobundle")
    assert main(["add-stage", str(classifier_ckpt), str(bundle)]) == 0
    assert "classifier classifier.onnx added (3 classes" in capsys.readouterr().out
    assert main(["add-stage", str(grader_ckpt(tmp_path)[0]), str(bundle), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kind"] == "grader" and rec["max_abs_diff"] <= 1e-4
    b = Bundle.open(bundle)                                              # hashes re-verified
    assert set(b.manifest.stages) == {"classifier", "grader"} and (b.path / "grader.onnx").is_file()
    again = export_classifier(classifier_ckpt, tmp_path / "clf.onnx")    # an exported file is taken as it is
    assert main(["add-stage", str(again), str(bundle)]) == 0
    assert [f.role for f in Bundle.open(bundle).manifest.files].count("classifier") == 1
    capsys.readouterr()
    detector_like = tmp_path / "best.pt"
    torch.save({"format": "cyto-edge/detector", "state_dict": {}}, detector_like)
    assert main(["add-stage", str(detector_like), str(bundle)]) == 2
    assert "not a second-stage checkpoint (format 'cyto-edge/detector')" in capsys.readouterr().err
    assert main(["add-stage", str(tmp_path / "missing.pt"), str(bundle)]) == 2
    other = make_bundle(tmp_path / "other.cytobundle", classes=("ascus", "scc"),
                        bethesda={"ascus": "ASC-US", "scc": "SCC"})
    assert main(["add-stage", str(classifier_ckpt), str(other)]) == 2    # classes do not match: refused
    assert "are not classes of the bundle" in capsys.readouterr().err and Bundle.open(other).manifest.stages == {}


def test_a_second_stage_whose_classes_do_not_match_is_refused(tmp_path, classifier_ckpt):
    clf = export_classifier(classifier_ckpt, tmp_path / "clf.onnx")
    other = make_bundle(tmp_path / "other.cytobundle", classes=("ascus", "scc"),
                        bethesda={"ascus": "ASC-US", "scc": "SCC"})
    with pytest.raises(BadInput, match=r"classifier classes \['lsil', 'hsil'\] are not classes of the bundle"):
        add_to_bundle(other, clf)
    with pytest.raises(BadInput, match="grader grades"):
        add_to_bundle(other, export_grader(grader_ckpt(tmp_path)[0], tmp_path / "grader.onnx"))
    assert Bundle.open(other).manifest.stages == {}
    remapped = make_bundle(tmp_path / "remap.cytobundle", bethesda={"lsil": "LSIL", "hsil": "SCC"})
    with pytest.raises(BadInput, match="maps 'hsil' to HSIL, the bundle to SCC"):
        add_to_bundle(remapped, clf)


def test_stage_info_refuses_a_plain_onnx_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), tmp_path / "plain.onnx")
    with pytest.raises(BadInput, match="not a cyto-edge second-stage model"):
        stage_info(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(BadInput, match="not a readable ONNX file"):
        stage_info(tmp_path / "junk.onnx")
