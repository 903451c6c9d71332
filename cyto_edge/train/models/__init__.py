"""Detector builders, registered by name. `create_model(name, num_classes=C, input_size=S, **kw)`."""
from cyto_edge.train.models.detector import MODELS, SSDDetector, create_model, model_info  # noqa: F401
