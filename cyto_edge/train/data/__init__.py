"""Datasets. The readers here are torch-free (numpy + OpenCV) so the runtime's `eval` can use them;
the torch Dataset wrappers live in `torch_data.py`."""
from cyto_edge.train.data.types import DetectionDataset, ImageRecord  # noqa: F401
