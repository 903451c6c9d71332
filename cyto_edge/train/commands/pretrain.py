"""`cyto-edge pretrain`: self-supervised 3x3 jigsaw pretraining of a backbone on unlabeled frames."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

HELP = """Self-supervised jigsaw pretraining on a folder of unlabeled frames.

Every image under --unlabeled (recursively; jpg/png/bmp/tif; e.g. the frames a device has stored) is cut into 3x3 puzzles at its own scale; the backbone, shared by the nine tiles, learns to tell which of --permutations shufflings was applied. Unreadable files are skipped and counted; images smaller than 3 x --cell px are refused (each named).

--arch picks the backbone that will receive the weights: a detector name (its backbone, e.g. ssdlite320_mobilenetv3, tiny) or a classifier (rcan, rcan-noca, plain). Give the same keyword arguments as the target model with --arch-kw (e.g. --arch-kw width_mult=0.5), so that every tensor matches by name and shape.

Use the result: `cyto-edge train RECIPE --set model.init=pretrained.pt` for a detector (pretrain with --arch set to the recipe's model), or in code load_pretrained_backbone(model, "pretrained.pt") from cyto_edge.train.pretrain, which reports the tensors that matched.
"""


def _arch_kwargs(items: list[str]) -> dict:
    import yaml

    from cyto_edge.errors import BadInput

    out = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key:
            raise BadInput(f"--arch-kw {it!r}: give key=value, e.g. width_mult=0.5")
        out[key.strip()] = yaml.safe_load(val)
    return out


def _report_scan(scan) -> None:
    for p, reason in scan.unreadable[:5]:
        typer.secho(f"skipped unreadable {p} ({reason})", err=True, fg="yellow")
    for p, w, h in scan.too_small[:10]:
        typer.secho(f"refused {scan.too_small_message(p, w, h)}", err=True, fg="yellow")
    more = len(scan.too_small) - 10
    if more > 0:
        typer.secho(f"refused {more} more image(s) smaller than {scan.min_side} px", err=True, fg="yellow")
    typer.echo(f"{len(scan.usable)} frame(s) usable, {len(scan.unreadable)} unreadable skipped, "
               f"{len(scan.too_small)} too small refused")


def _split(files: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """About 10% of the frames (at least one when there are 5 or more) held out for jigsaw accuracy."""
    import numpy as np

    if len(files) < 5:
        return files, []
    idx = np.random.default_rng(seed).permutation(len(files))
    k = max(1, len(files) // 10)
    return [files[i] for i in sorted(idx[k:])], [files[i] for i in sorted(idx[:k])]


def register(app: typer.Typer) -> None:
    @app.command("pretrain", help=HELP)
    def _cmd(
        unlabeled: Path = typer.Option(..., "--unlabeled", help="Folder of unlabeled frames (searched recursively)."),
        arch: str = typer.Option("ssdlite320_mobilenetv3", "--arch", help="Backbone to pretrain (see above)."),
        arch_kw: List[str] = typer.Option([], "--arch-kw", help="key=value for the backbone builder (repeatable)."),
        epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the frames."),
        out: Path = typer.Option(Path("pretrained.pt"), "--out", help="Where to write the pretrained weights."),
        permutations: int = typer.Option(100, "--permutations", min=2, help="Size of the permutation set (classes)."),
        cell: int = typer.Option(64, "--cell", min=8, help="Grid cell in px; images need at least 3 x cell per side."),
        tile: Optional[int] = typer.Option(None, "--tile", min=8,
                                           help="Tile cut from each cell, px (cell - tile = gap + jitter); "
                                                "default 7/8 of --cell."),
        per_image: int = typer.Option(8, "--per-image", min=1, help="Puzzles cut from each frame per epoch."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, one-cycle)."),
        minutes: Optional[float] = typer.Option(None, "--minutes", help="Time budget: stop when it is spent (the schedule follows it)."),
        seed: int = typer.Option(0, "--seed"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        from cyto_edge.errors import BadInput

        from cyto_edge.train.pretrain import PretrainConfig, PuzzleSpec, scan_frames

        spec = PuzzleSpec(cell=cell, tile=tile or max(8, round(cell * 7 / 8)))
        scan = scan_frames(unlabeled, spec.crop)
        if not as_json:
            _report_scan(scan)
        if not scan.usable:
            if scan.too_small:
                p, w, h = scan.too_small[0]
                raise BadInput(f"no usable frame under {unlabeled}: {scan.too_small_message(p, w, h)}; "
                               "lower --cell or give larger frames")
            raise BadInput(f"no readable frame (jpg/png/bmp/tif) under {unlabeled}")
        cfg = PretrainConfig(arch=arch, trunk_kwargs=_arch_kwargs(arch_kw), epochs=epochs, batch_size=batch_size,
                             lr=lr, num_perms=permutations, per_image=per_image, seed=seed, puzzle=spec,
                             time_budget_s=minutes * 60 if minutes else None)
        result = _train(cfg, scan, out, threads, as_json)
        _print_result(result, as_json)


def _train(cfg, scan, out: Path, threads: Optional[int], quiet: bool) -> dict:
    import torch
    from rich.progress import Progress

    from cyto_edge.train.models.jigsaw import hamming_permutations
    from cyto_edge.train.pretrain import jigsaw_accuracy, pretrain, save_pretrained

    if threads:
        torch.set_num_threads(threads)
    train_files, val_files = _split(scan.usable, cfg.seed)
    per_epoch = len(train_files) * cfg.per_image
    with Progress(transient=True, disable=quiet) as prog:
        task = prog.add_task("jigsaw", total=cfg.epochs * per_epoch)
        net, stats = pretrain(train_files, cfg, progress=lambda ep, seen: prog.update(task, completed=ep * per_epoch + seen))
    perms = hamming_permutations(cfg.num_perms, cfg.seed, cfg.criterion)
    held = val_files or train_files
    stats["heldout_accuracy"] = round(jigsaw_accuracy(net, held, cfg.puzzle, perms, n=256, seed=cfg.seed + 1), 4)
    stats["heldout_frames"] = len(val_files) if val_files else "none (fewer than 5 frames): fresh puzzles of the training frames"
    stats["scan"] = {**scan.summary(), "unreadable_files": [str(p) for p, _ in scan.unreadable],
                     "too_small_files": [str(p) for p, _, _ in scan.too_small]}
    save_pretrained(out, net, cfg, stats)
    return {"out": str(out), "arch": cfg.arch, "trunk_kwargs": cfg.trunk_kwargs, "tensors": len(net.trunk.target_state_dict()),
            **stats}


def _print_result(res: dict, as_json: bool) -> None:
    from cyto_edge._cli_util import print_json

    if as_json:
        return print_json(res)
    for h in res["history"]:
        typer.echo(f"epoch {h['epoch']}: loss {h['loss']:.4f}, jigsaw accuracy {h['accuracy']:.3f}")
    p = res["permutations"]
    typer.echo(f"permutations: {p['count']} (minimum Hamming distance {p['min_hamming']}, mean {p['mean_hamming']}); "
               f"chance {res['chance']:.3f}; held-out jigsaw accuracy {res['heldout_accuracy']:.3f}")
    typer.echo(f"wrote {res['out']} ({res['tensors']} backbone tensors of {res['arch']}, {res['seconds']} s); "
               f"use it with: cyto-edge train RECIPE --set model.init={res['out']} (model {res['arch']})")
