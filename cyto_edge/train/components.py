"""Loss components a recipe switches on: local distillation (`distill:`), MIL (`mil:`)."""
from __future__ import annotations

from cyto_edge.train.config import TrainConfig


def build_components(cfg: TrainConfig) -> list:
    comps = []
    if cfg.distill is not None and cfg.distill.teacher is not None:
        from cyto_edge.train.distill import LocalDistillation

        comps.append(LocalDistillation(cfg.distill))
    if cfg.mil is not None:
        try:
            from cyto_edge.train.mil import MilComponent
        except ImportError as e:  # pragma: no cover - until the MIL detector lands
            from cyto_edge.errors import NotAvailable

            raise NotAvailable(f"mil: the MIL detector is not available in this version ({e})") from None
        comps.append(MilComponent(cfg.mil))
    return comps
