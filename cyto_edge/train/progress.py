"""A rich progress bar for training: step, loss, lr, it/s; plain lines when not on a terminal."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Console | None = None):
        self.total, self.enabled = total, enabled
        self.console = console or Console(stderr=True)
        self.t_last, self.s_last, self.rate = time.time(), start, 0.0
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not enabled, transient=False)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float) -> None:
        now = time.time()
        if now - self.t_last > 2.0:
            self.rate = (step - self.s_last) / (now - self.t_last)
            self.t_last, self.s_last = now, step
        self.bar.update(self.task, completed=step, info=f"loss {loss:.3f} lr {lr:.2e} {self.rate:.2f} it/s")

    def note(self, text: str) -> None:
        self.bar.update(self.task, info=text)

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)
