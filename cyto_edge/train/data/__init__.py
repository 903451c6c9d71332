"""Datasets. The readers here are torch-free (numpy + OpenCV) so the runtime's `eval` can use them;
the torch Dataset wrappers live in `torch_data.py`.

    load_detection(path, split=None, mapping=None) -> DetectionDataset      (COCO, VOC, CRIC, weak CSV)
    load_classification(path, mapping=None) -> ClassificationDataset        (SIPaKMeD, class folders)
    split_dataset(ds, val_fraction, seed) -> (train, val)
"""
from cyto_edge.train.data.types import (  # noqa: F401
    ClassificationDataset, ClassItem, DetectionDataset, ImageRecord,
)

_LAZY = {
    "load_detection": "cyto_edge.train.data.load",
    "load_classification": "cyto_edge.train.data.load",
    "detect_format": "cyto_edge.train.data.load",
    "available_splits": "cyto_edge.train.data.load",
    "split_dataset": "cyto_edge.train.data.split",
    "write_coco": "cyto_edge.train.data.coco",
    "verify_images": "cyto_edge.train.data.check",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cyto_edge.train.data' has no attribute {name!r}")
