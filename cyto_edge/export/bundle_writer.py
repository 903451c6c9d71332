"""Write a model bundle from a checkpoint: manifest (runtime/bundle.py), priors, model files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import (InputSpec, Manifest, MilOutputSpec, OutputSpec, PostprocessSpec, TileSpec,
                                      file_entry, sha256_file, write_manifest)


def mil_output_spec(ck: dict) -> MilOutputSpec | None:
    """The manifest's `output.mil` for a checkpoint trained with a re-scoring MIL head (train/mil.py), else None."""
    for sd in ck.get("components") or []:
        if isinstance(sd, dict) and sd.get("kind") == "mil":
            m = sd["meta"]
            if m["refine_stages"] and m["rescore"] > 0:
                return MilOutputSpec(weight=m["rescore"], topk=m["proposals"], refine_stages=m["refine_stages"])
    return None


def manifest_from_checkpoint(ck: dict, ckpt_path: Path, name: str) -> Manifest:
    S = ck["model"]["input_size"]
    norm = ck["normalization"]
    return Manifest(
        name=name, classes=list(ck["classes"]), bethesda=dict(ck["bethesda"]), organisms=list(ck["organisms"]),
        um_per_px=float(ck["um_per_px"]),
        input=InputSpec(size=(S, S), color=norm.get("color", "RGB"), scale=norm["scale"], mean=tuple(norm["mean"]),
                        std=tuple(norm["std"])),
        output=OutputSpec(num_priors=int(ck["priors"].shape[0]), variances=tuple(ck["variances"]),
                          mil=mil_output_spec(ck)),
        postprocess=PostprocessSpec(tile=TileSpec(size=S, overlap=int(ck.get("tile_overlap", 160)))),
        provenance={"model": ck["model"], "training_config": ck.get("config"),
                    "dataset_fingerprint": ck.get("dataset_fingerprint"), "checkpoint": str(ckpt_path),
                    "checkpoint_sha256": sha256_file(ckpt_path), "git_revision": ck.get("git_revision"),
                    "train_versions": ck.get("versions"), "step": ck.get("step")},
        quality={"torch_val_map50": ck.get("best_map50")},
    )


def start_bundle(out: Path, ck: dict, ckpt_path: Path, overwrite: bool = True) -> tuple[Path, Manifest]:
    """Create the bundle directory with priors.npy and an initial manifest (no model files yet)."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise BadInput(f"{out} exists; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    name = out.name.removesuffix(".cytobundle")
    m = manifest_from_checkpoint(ck, Path(ckpt_path), name)
    np.save(out / m.output.priors_file, np.asarray(ck["priors"], np.float32))
    m.files.append(file_entry(out, m.output.priors_file, "priors", role="priors"))
    return out, m


def add_file(out: Path, m: Manifest, rel: str, kind: str, precision: str | None, role: str = "detector", **meta) -> None:
    m.files = [f for f in m.files if f.path != rel]
    m.files.append(file_entry(out, rel, kind, precision, role, **meta))
    write_manifest(out, m)


def export_fp32_bundle(ckpt_path: str | Path, out: str | Path) -> Path:
    """The minimal bundle: priors + fp32 ONNX (no verification gate; `cyto-edge export` adds that)."""
    from cyto_edge.export.onnx import export_onnx, onnx_opset
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.mil import inference_model_from_checkpoint

    ck = load_checkpoint(ckpt_path)
    out, m = start_bundle(Path(out), ck, Path(ckpt_path))
    export_onnx(inference_model_from_checkpoint(ck), out / "model.onnx")   # + the MIL output when trained with one
    add_file(out, m, "model.onnx", "onnx", "fp32", opset=onnx_opset(out / "model.onnx"))
    return out
