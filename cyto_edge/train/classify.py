"""Training and evaluation of the attention cell classifier (`cyto-edge train-classifier`).

Crops live in memory as uint8 (N, S, S, 3) RGB; a batch becomes float32 (B, 3, S, S) with
x = (pixel / 255 - mean) / std (ImageNet mean/std, recorded in the checkpoint). Augmentation: the paper's
horizontal / vertical flips plus 90-degree rotations (a cell has no orientation). Evaluation: the paper's
stratified k-fold cross-validation (`folds >= 2`, every fold trained for the same number of epochs and
tested on its held-out fold), or one stratified validation split whose best epoch is kept.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cyto_edge.errors import BadInput
from cyto_edge.train.cellcrops import CropSet
from cyto_edge.train.models.classifier import create_classifier, param_count

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CKPT_FORMAT = "cyto-edge/cell-classifier"


@dataclass
class ClassifierSettings:
    arch: str = "small"
    se: bool = True
    sam: bool = True
    dnl: bool = True
    width: int | None = None          # None: the architecture's default
    img_size: int = 80                # the paper's 80 x 80
    epochs: int = 30
    batch: int = 48                   # the paper's batch
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"          # adamw | sgd (the paper's; momentum 0.9)
    folds: int = 1                    # >= 2: k-fold cross-validation
    val_fraction: float = 0.2         # folds == 1: held-out validation share (0: train on everything)
    seed: int = 0
    threads: int = 0                  # 0: torch's default

    def arch_kw(self) -> dict:
        kw = {"se": self.se, "sam": self.sam, "dnl": self.dnl}
        if self.width:
            kw["width"] = self.width
        return kw

    def check(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise BadInput(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        for name in ("epochs", "batch", "img_size"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 1")
        if self.img_size < 16:
            raise BadInput(f"--img-size {self.img_size} is too small; use at least 16 px")
        if self.folds < 1 or not 0 <= self.val_fraction < 1:
            raise BadInput("--folds must be >= 1 and --val-fraction in [0, 1)")


# ------------------------------------------------------------------------------------------ tensors

def to_input(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB -> float32 (B, 3, S, S) normalised."""
    x = torch.as_tensor(u8).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip, vertical flip and transpose (together: the 8 symmetries)."""
    b = x.shape[0]
    for op in (lambda t: t.flip(3), lambda t: t.flip(2), lambda t: t.transpose(2, 3)):
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], op(x), x)
    return x


# ------------------------------------------------------------------------------------------ splits

def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index in [0, k): every class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def splits(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train_idx, test_idx)] for k-fold CV, or one stratified train/validation split."""
    if folds >= 2:
        small = np.bincount(labels).min()
        if small < folds:
            raise BadInput(f"a class has only {small} crops, fewer than --folds {folds}; lower --folds")
        f = stratified_folds(labels, folds, seed)
        return [(np.flatnonzero(f != i), np.flatnonzero(f == i)) for i in range(folds)]
    if val_fraction <= 0:
        return [(np.arange(len(labels)), np.zeros(0, np.int64))]
    f = stratified_folds(labels, max(2, int(round(1 / val_fraction))), seed)
    return [(np.flatnonzero(f != 0), np.flatnonzero(f == 0))]


# ----------------------------------------------------------------------------------------- metrics

def report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro F1 and the confusion matrix
    (rows: true class, columns: predicted)."""
    K = len(classes)
    cm = np.zeros((K, K), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros(K), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros(K), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(K), where=(prec + rec) > 0)
    per = {c: {"precision": round(float(prec[i]), 4), "recall": round(float(rec[i]), 4),
               "f1": round(float(f1[i]), 4), "support": int(cm[i].sum())} for i, c in enumerate(classes)}
    present = cm.sum(1) > 0
    return {"accuracy": round(float(tp.sum() / max(cm.sum(), 1)), 4), "per_class": per,
            "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 4),
            "confusion": cm.tolist(), "n": int(cm.sum())}


def confusion_png(cm, classes: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    K = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * K, 1.0 + 0.6 * K), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(K), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(K), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------- training

def build(settings: ClassifierSettings, num_classes: int) -> torch.nn.Module:
    return create_classifier(settings.arch, num_classes=num_classes, **settings.arch_kw())


def _optimizer(model: torch.nn.Module, s: ClassifierSettings) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    other = [p for n, p in model.named_parameters() if p.ndim <= 1]      # norms and biases: no decay
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=s.lr)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, K) probabilities (eval mode)."""
    was = model.training
    model.eval()
    out = [model(to_input(images[i:i + batch])).softmax(-1) for i in range(0, len(images), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, model.fc.out_features), np.float32)


def fit(model, images: np.ndarray, labels: np.ndarray, s: ClassifierSettings, val=None, on_step=None):
    """Train for `s.epochs` (warm-up then cosine LR). With `val=(images, labels)`, keep the weights of
    the epoch with the best validation accuracy. Returns (model, history [{epoch, loss, val_acc}])."""
    gen = torch.Generator().manual_seed(s.seed)
    opt = _optimizer(model, s)
    steps_per_epoch = max(1, math.ceil(len(labels) / s.batch))
    total, warm = s.epochs * steps_per_epoch, min(steps_per_epoch, 50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, total) / total)))
    y_all = torch.as_tensor(labels)
    best, history = (-1.0, None), []
    model.train()
    for epoch in range(s.epochs):
        perm = torch.randperm(len(labels), generator=gen)
        losses = []
        for i in range(0, len(labels), s.batch):
            idx = perm[i:i + s.batch]
            if len(idx) < 2:                                   # BatchNorm needs two samples
                continue
            x = augment(to_input(images[idx.numpy()]), gen)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if on_step:
                on_step(epoch, losses[-1])
        rec = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)) if losses else float("nan"), 4)}
        if val is not None and len(val[1]):
            acc = float((predict(model, val[0]).argmax(1) == val[1]).mean())
            rec["val_acc"] = round(acc, 4)
            if acc > best[0]:
                best = (acc, copy.deepcopy(model.state_dict()))
        history.append(rec)
    if best[1] is not None:
        model.load_state_dict(best[1])
    return model, history


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def check_crops(crops: CropSet) -> None:
    counts = crops.counts()
    if len(crops.classes) < 2:
        raise BadInput(f"{crops.source}: classes: found {len(crops.classes)}; a classifier needs at least two")
    empty = [c for c, n in zip(crops.classes, counts) if n == 0]
    if empty:
        raise BadInput(f"{crops.source}: class {empty[0]!r} has no crops; add images or drop the class")
    if crops.images.ndim != 4 or crops.images.shape[3] != 3 or crops.images.dtype != np.uint8:
        raise BadInput(f"{crops.source}: crops must be uint8 (N, S, S, 3) RGB, got {crops.images.dtype} "
                       f"{crops.images.shape}")


# -------------------------------------------------------------------------------------- checkpoints

def checkpoint(model, s: ClassifierSettings, crops: CropSet, metrics: dict | None = None, **provenance) -> dict:
    """Everything export and the runtime need: weights, classes, Bethesda mapping, preprocessing."""
    return {"format": CKPT_FORMAT, "version": 1, "arch": s.arch, "arch_kw": s.arch_kw(),
            "state_dict": model.state_dict(), "classes": list(crops.classes), "bethesda": crops.bethesda,
            "input": {"size": [s.img_size, s.img_size], "layout": "NCHW", "color": "RGB", "scale": 1 / 255,
                      "mean": list(MEAN), "std": list(STD), "resize": "resize"},
            "crop": crops.spec.to_dict() if crops.spec else None, "settings": asdict(s),
            "metrics": metrics or {}, "provenance": {"data": crops.source, **provenance}}


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, checkpoint dict without the weights); BadInput for anything else."""
    p = Path(path)
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise BadInput(f"{p}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any unpickling error is a bad file
        raise BadInput(f"{p}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise BadInput(f"{p}: not a cell-classifier checkpoint (format {ck.get('format') if isinstance(ck, dict) else None!r}); "
                       "train one with `cyto-edge train-classifier`")
    model = create_classifier(ck["arch"], num_classes=len(ck["classes"]), **ck["arch_kw"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, {k: v for k, v in ck.items() if k != "state_dict"}


# ------------------------------------------------------------------------------------------ driver

def _summarise(results: list[dict], y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    accs = [r["report"]["accuracy"] for r in results if r["report"]["n"]]
    return {"folds": len(results), "accuracy_mean": round(float(np.mean(accs)), 4) if accs else None,
            "accuracy_std": round(float(np.std(accs)), 4) if accs else None, "fold_accuracy": accs,
            "pooled": report(y_true, y_pred, classes) if len(y_true) else None}


class Steps:
    """Rich progress bars, one task per fold; disabled: silent."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not enabled)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def task(self, label: str, total: int):
        t = self.bar.add_task(label, total=total, info="")
        return lambda info="": self.bar.update(t, advance=1, info=info)


def train_classifier(crops: CropSet, s: ClassifierSettings, out_dir: Path | None = None,
                     progress: bool = True) -> dict:
    """Train (k-fold CV or one validation split), write checkpoints, metrics.json and confusion PNGs
    into `out_dir`; returns the summary (per-fold reports, mean/std accuracy, parameter count)."""
    s.check()
    check_crops(crops)
    set_threads(s.threads)
    parts = splits(crops.labels, s.folds, s.val_fraction, s.seed)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    results, n_params, y_true, y_pred = [], None, [], []
    with Steps(progress) as bar:
        for k, (tr, te) in enumerate(parts):
            torch.manual_seed(s.seed * 1000 + k)
            model = build(s, len(crops.classes))
            n_params = param_count(model)
            label = f"fold {k + 1}/{len(parts)}" if len(parts) > 1 else "train"
            steps = s.epochs * math.ceil(len(tr) / s.batch)
            tick = bar.task(label, steps)
            val = (crops.images[te], crops.labels[te]) if s.folds == 1 and len(te) else None
            model, hist = fit(model, crops.images[tr], crops.labels[tr], s, val=val,
                              on_step=lambda e, loss: tick(f"epoch {e + 1}/{s.epochs} loss {loss:.3f}"))
            pred = predict(model, crops.images[te]).argmax(1) if len(te) else np.zeros(0, np.int64)
            rep = report(crops.labels[te], pred, crops.classes)
            y_true.append(crops.labels[te])
            y_pred.append(pred)
            results.append({"fold": k + 1, "train": int(len(tr)), "test": int(len(te)), "history": hist,
                            "report": rep})
            if out_dir:
                _write_fold(out_dir, model, s, crops, rep, k, len(parts))
    summary = {"classes": crops.classes, "counts": crops.counts().tolist(), "params": n_params,
               "settings": asdict(s), **_summarise(results, np.concatenate(y_true), np.concatenate(y_pred), crops.classes),
               "per_fold": results}
    if out_dir:
        import json

        (Path(out_dir) / "metrics.json").write_text(json.dumps(summary, indent=2))
        if summary["pooled"]:
            title = f"{s.arch} se={s.se} sam={s.sam} dnl={s.dnl}: acc {summary['accuracy_mean']}"
            confusion_png(summary["pooled"]["confusion"], crops.classes, Path(out_dir) / "confusion.png", title)
    return summary


def _write_fold(out_dir: Path, model, s: ClassifierSettings, crops: CropSet, rep: dict, k: int, n: int) -> None:
    name = "classifier.pt" if n == 1 else f"fold{k + 1}.pt"
    torch.save(checkpoint(model, s, crops, rep, fold=k + 1 if n > 1 else None), Path(out_dir) / name)
    if n > 1 and rep["n"]:
        confusion_png(rep["confusion"], crops.classes, Path(out_dir) / f"confusion_fold{k + 1}.png",
                      f"fold {k + 1}: acc {rep['accuracy']}")
