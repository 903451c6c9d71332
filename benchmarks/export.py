"""Exported files of the CPU student: mAP@0.5 and ms per 320² tile, FP32 vs INT8, ONNX Runtime vs OpenVINO.

Model: the `student_cpu` recipe trained on a cached `cyto-edge synth` set (benchmarks/_export_model.py),
exported with `cyto-edge export --target openvino --precision int8` (PTQ, --calib-method, 64 calibration
tiles of the train split). One JSON line per exported file and engine:
  model.onnx            ONNX Runtime fp32        openvino/model.xml       OpenVINO fp32 (f32 hint)
  model.int8.onnx       ONNX Runtime int8        openvino/model.int8.xml  OpenVINO int8
  model.int8.u8.onnx    ONNX Runtime, uint8 asymmetric activations (a diagnostic: not in the bundle,
                        TensorRT refuses it; shows what the symmetric int8 file costs ONNX Runtime)
  model.int8.qout.onnx  ONNX Runtime and OpenVINO: the bundle's int8 file with Q/DQ pairs on the head's
                        raw outputs too (ONNX Runtime's default placement; a diagnostic: what float
                        outputs save, see cyto_edge/export/quantize.py unquantize_outputs)
Figures: mAP@0.5 on the clean test split (tiled as on the device), ms per tile at batch 1 and 8
(p50 of interleaved rounds, same thread count for every engine), the INT8/FP32 speed ratio of the
same engine measured in this run, the QDQ weight fraction, OpenVINO's convolution precisions, and the
load average (the machine may be shared: speeds are noisy when it is above the core count).
Targets (counted only when the FP32 model reaches mAP@0.5 >= 0.5): INT8 costs <= 0.5 mAP point and
runs >= 1.5x faster than FP32 with OpenVINO.

    python benchmarks/export.py --small                          # the cached student (run_all)
    python benchmarks/export.py --ckpt runs/teacher_cpu/best.pt  # any detector checkpoint of the same data

--ckpt measures another checkpoint trained on the same cached synth set (or any 1 µm/px COCO set with
--data): e.g. the ResNet-18 teacher, whose dense 3x3 convolutions are where INT8 pays on a CPU, against
the student's depthwise MobileNetV3 blocks, where it does not (OpenVINO's CPU plugin gains little from
INT8 on MobileNetV3; openvinotoolkit/openvino#11898 reports the same for the classifier).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from _common import emit, parser, timer
from _export_model import settings, trained_student

VARIANTS = [("model.onnx", "onnxruntime", "fp32"), ("model.int8.onnx", "onnxruntime", "int8"),
            ("model.int8.u8.onnx", "onnxruntime", "int8"), ("openvino/model.xml", "openvino", "fp32"),
            ("openvino/model.int8.xml", "openvino", "int8"), ("model.int8.onnx", "openvino", "int8"),
            ("model.int8.qout.onnx", "onnxruntime", "int8"), ("model.int8.qout.onnx", "openvino", "int8")]
DIAGNOSTIC = ("model.int8.u8.onnx", "model.int8.qout.onnx")   # beside the bundle's files, not in its gate


def export(ckpt: Path, data: Path, out: Path, method: str, threads: int):
    from cyto_edge.export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(target="openvino", precision="int8", out=out, calib=data, calib_images=64,
                         calib_method=method, val_images=16, threads=threads)
    return export_bundle(ckpt, opts, show_progress=False, check=False)


def add_diagnostic_variants(bundle: Path, data: Path, method: str) -> None:
    """Two INT8 files beside the bundle's, recorded with the role "diagnostic" (see engine):
    model.int8.u8.onnx (uint8 asymmetric activations) and model.int8.qout.onnx (the head's raw outputs
    quantized too), with the same calibration tiles and method as the bundle's file."""
    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.export.quantize import export_int8
    from cyto_edge.runtime.bundle import Bundle, file_entry
    from cyto_edge.train.data import load_detection

    b = Bundle.open(bundle)
    tiles = calibration_tiles(load_detection(data, "train"), b.manifest, 64)
    fp32 = bundle / "model.onnx"
    export_int8(fp32, bundle / DIAGNOSTIC[0], tiles, method, activations="uint8")
    export_int8(fp32, bundle / DIAGNOSTIC[1], tiles, method, float_outputs=False)
    for name in DIAGNOSTIC:
        b.manifest.files.append(file_entry(bundle, name, "onnx", "int8-qdq", role="diagnostic"))
    b.save()


def engine(b, path: str, backend: str, precision: str, threads: int):
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.engines import load_engine

    if path in DIAGNOSTIC:          # a diagnostic file: load it as the detector of a bundle view
        view = Bundle(b.path, b.manifest.model_copy(deep=True))
        for f in view.manifest.files:
            f.role = "detector" if f.path == path else ("other" if f.role == "detector" else f.role)
        return load_engine(view, backend, precision=precision, threads=threads, file=path)
    return load_engine(b, backend, precision=precision, threads=threads, file=path)


def measure(engines: dict, tiles: np.ndarray, rounds: int, iters: int) -> dict:
    """{(variant, batch): ms per tile}: p50 per round, rounds interleaved across engines, best round kept."""
    res: dict = {}
    for _ in range(rounds):
        for key, eng in engines.items():
            for bs in (1, 8):
                x = tiles[:bs]
                t = timer(lambda: eng.infer(x), warmup=3, iters=iters)
                res[(key, bs)] = min(res.get((key, bs), np.inf), t.p50_ms / bs)
    return res


def map_on_test(eng, b, data: Path, n: int) -> float | None:
    from cyto_edge.export.verify import run_images, settings_for
    from cyto_edge.train.data import load_detection

    s = settings_for(load_detection(data, "test"), b.manifest, n)
    return run_images(eng.infer, b.manifest, b.priors(), s).map50


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="Threads for every engine (and torch).")
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds (best p50 kept).")
    p.add_argument("--ckpt", type=Path, default=None, help="Measure this detector checkpoint instead of the "
                   "cached student (trained on --data, default the benchmark's cached synth set).")
    p.add_argument("--data", type=Path, default=None, help="Calibration and test data of --ckpt.")
    p.add_argument("--test-images", type=int, default=None, help="Test fields for mAP (default: 40, --small 16).")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    st = settings(args.small)
    if args.test_images is not None:
        st["test_images"] = args.test_images
    if args.ckpt:
        from _multicell import synth_dir

        if not args.ckpt.is_file():
            raise SystemExit(f"--ckpt {args.ckpt}: no such checkpoint")
        data = args.data or synth_dir(st["images"], st["size"], seed=0, um_per_px=1.0)
        ckpt, train = args.ckpt, {"checkpoint": str(args.ckpt)}
    else:
        data, ckpt, train = trained_student(st, threads=args.threads)
    out = Path(tempfile.mkdtemp(prefix="export-bench-")) / "student.cytobundle"
    summary = export(ckpt, data, out, args.calib_method, args.threads)
    add_diagnostic_variants(out, data, args.calib_method)
    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.export.quantize import qdq_coverage
    from cyto_edge.export.verify import conv_precisions
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.train.data import load_detection

    b = Bundle.open(out)
    tiles = calibration_tiles(load_detection(data, "test"), b.manifest, 8, seed=1)
    load_before = os.getloadavg()
    engines = {(f, be): engine(b, f, be, pr, args.threads) for f, be, pr in VARIANTS}
    maps = {k: map_on_test(e, b, data, st["test_images"]) for k, e in engines.items()}
    ms = measure(engines, tiles, args.rounds, 20 if args.small else 60)
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()],
            "cores": os.cpu_count()}
    fp32 = {"onnxruntime": ("model.onnx", "onnxruntime"), "openvino": ("openvino/model.xml", "openvino")}
    for (f, be), eng in engines.items():
        ref = fp32[be]
        fig = {"map50": maps[(f, be)], "fp32_map50": maps[ref],
               "map50_drop_points": None if maps[ref] is None else round(100 * (maps[ref] - maps[(f, be)]), 2),
               "ms_per_tile_b1": round(ms[((f, be), 1)], 3), "ms_per_tile_b8": round(ms[((f, be), 8)], 3),
               "int8_speedup_b1": round(ms[(ref, 1)] / ms[((f, be), 1)], 3),
               "int8_speedup_b8": round(ms[(ref, 8)] / ms[((f, be), 8)], 3)}
        if f.endswith(".onnx") and "int8" in f:
            fig["qdq_fraction"] = qdq_coverage(out / f)["fraction"]
        if be == "openvino":
            fig["openvino_convolutions"] = conv_precisions(eng)["convolutions"]
            fig["inference_precision"] = eng.inference_precision
        counts = maps[ref] is not None and maps[ref] >= 0.5
        if be == "openvino" and "int8" in f and f not in DIAGNOSTIC:
            fig["targets"] = {"counted": counts, "drop_le_0.5": fig["map50_drop_points"] <= 0.5,
                              "speedup_ge_1.5_b1": fig["int8_speedup_b1"] >= 1.5,
                              "speedup_ge_1.5_b8": fig["int8_speedup_b8"] >= 1.5}
        emit("export", fig, **{f"{be}_threads": args.threads}, file=f, engine=be, load_average=load,
             calib_method=args.calib_method, student=train, gate=summary["quality"]["gate"]["passed"],
             test_images=st["test_images"], synth={"images": st["images"], "size": st["size"]})
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
