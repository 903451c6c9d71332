"""Proof of learning: the `tiny` student overfits 8 synthetic fields (mAP@0.5 >= 0.9 on them).

The fields are evaluated exactly as the runtime sees them (whole 512² fields, tiled, one decoder), so this
also exercises priors, matching, the loss, the decoder and the metric together: a bug in any of them
keeps the mAP far below the bar. About 90 s on 2 idle cores.
"""
import pytest

from cyto_edge.train.config import load_config
from cyto_edge.train.data.torch_data import MEAN, STD
from cyto_edge.train.evaluate import evaluate_model
from cyto_edge.train.loop import Trainer

from ..conftest import make_synth

# The overfitting recipe: a high learning rate, crops centred on objects, no colour jitter, no EMA.
OVERFIT = ["optim.lr=0.02", "optim.warmup_steps=20", "optim.ema_decay=null", "aug.pos_fraction=0.9",
           "aug.hue=0", "aug.saturation=0", "aug.value=0", "aug.gamma=0", "aug.blur_p=0", "aug.noise_p=0",
           "schedule.epochs=1", "schedule.steps_per_epoch=260", "optim.batch_size=16", "data.val_fraction=0",
           "workers=0", "tensorboard=false", "threads=2"]


@pytest.fixture(scope="module")
def eight_fields(cache_dir):
    """10 synthetic 512² fields; the 8 of the train split are the ones to overfit."""
    return make_synth(cache_dir / "synth_overfit", images=10, size=512, seed=5, test_fraction=0.2)


def test_tiny_overfits_eight_fields(eight_fields, tmp_path):
    cfg = load_config("tiny", [f"data.root={eight_fields}", f"out_dir={tmp_path}", "name=overfit", *OVERFIT])
    trainer = Trainer(cfg)
    trainer.run()
    train = trainer.train_ds
    assert len(train) == 8 and sum(len(r.boxes) for r in train.images) >= 8
    metrics, _ = evaluate_model(trainer.model.eval(), train, model_um_per_px=trainer.um_per_px,
                                overlap=cfg.eval.tile_overlap, mean=MEAN, std=STD)
    assert metrics.map50 >= 0.9, f"tiny reached only mAP@0.5 {metrics.map50:.3f} on the 8 fields it trained on"
