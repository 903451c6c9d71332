"""Re-scoring of SSD detections by the refined MIL scores (LD-WSCCD D.3, OICR refinement), torch-free.

A detector trained with the MIL head exports a third output beside `loc` and `logits`:

    mil     float32 (N, P, C+1)  per prior, a class distribution (column 0 background): for the top-K
                                 priors of each image (by the SSD's best foreground probability) the mean
                                 of the OICR refinement stages' softmax over their decoded boxes; for every
                                 other prior a copy of the SSD's own softmax (so re-scoring leaves it as is)

The re-scored class distribution of each prior is the mixture

    q = (1 - w) softmax(logits) + w mil,      w = manifest `output.mil.weight` in [0, 1]

which is again a distribution over the C+1 classes. It is handed to the one decoder as logits log(q)
(softmax(log q) = q), so thresholds, NMS and tile merging are those of every other detector: the device,
`eval` of a bundle and the training-side evaluation all re-score in `runtime/tiling.detect_frame`.
"""
from __future__ import annotations

import numpy as np

from cyto_edge.runtime.decode import softmax

EPS = 1e-12


def check_shapes(logits: np.ndarray, mil: np.ndarray) -> None:
    if mil.shape != logits.shape:
        raise ValueError(f"MIL output has shape {tuple(mil.shape)}, the class logits {tuple(logits.shape)}; "
                         "they must match (one C+1 distribution per prior)")


def rescore_probs(logits: np.ndarray, mil: np.ndarray, weight: float) -> np.ndarray:
    """(…, P, C+1) logits and MIL distributions -> (…, P, C+1) float32 re-scored distributions q."""
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"re-scoring weight must be in [0, 1], got {weight}")
    check_shapes(logits, mil)
    p = softmax(logits.astype(np.float32, copy=False))
    q = (1.0 - weight) * p + weight * np.clip(mil.astype(np.float32, copy=False), 0.0, 1.0)
    return (q / q.sum(axis=-1, keepdims=True)).astype(np.float32)


def rescored_logits(logits: np.ndarray, mil: np.ndarray, weight: float) -> np.ndarray:
    """Logits whose softmax is the re-scored distribution: what `decode.postprocess` takes instead."""
    return np.log(np.maximum(rescore_probs(logits, mil, weight), EPS)).astype(np.float32)
