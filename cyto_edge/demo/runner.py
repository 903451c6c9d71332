"""Run the demo's steps one after another, each as its own process with its output in OUT/logs/.

    steps = StepRunner(paths.logs, console, expect_s=size.expect_s)
    code = steps.run("teacher", "train the teacher", argv)          # raises StepFailed on a non-zero exit
    code = steps.run("export", ..., argv, ok_codes=(0, 1))          # the caller decides what exit 1 means

The display: one live line per running step (spinner, `[n/N] title`, elapsed, the last line its process
printed), then one permanent line with its time and a short result. A failed step: one line naming the
step and its log (StepFailed, exit 1). Each log starts with the command as a user would type it.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cyto_edge.demo.plan import STEPS, shown
from cyto_edge.errors import CheckFailed

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BOX = re.compile(r"^[\s│┃║|━─┏┓┗┛┡┩└┘╇╈┼┳┻┠┨├┤═╭╮╰╯]*$")


class StepFailed(CheckFailed):
    """A step of the demo exited with an error (exit 1); the message names the step and its log."""


@dataclass
class StepRecord:
    key: str
    title: str
    command: str
    log: str
    seconds: float = 0.0             # wall clock
    cpu_seconds: float = 0.0         # user + system time of the step's process (load-independent)
    exit_code: int | None = None
    result: str = ""
    extra: dict = field(default_factory=dict)


def child_env(threads: int) -> dict:
    """The steps' environment: wide logs, no buffering, the thread count."""
    env = dict(os.environ)
    env.setdefault("COLUMNS", "120")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def busy_cores(window_s: float = 0.4) -> float | None:
    """CPU cores in use by other processes right now (Linux /proc/stat over `window_s`), None elsewhere."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)      # total, idle + iowait (jiffies)

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def wait_policy(env: dict) -> str | None:
    """OpenMP threads that spin while they wait are fastest on an idle machine and many times slower when
    other processes hold the cores (measured: a training step 1.07 s idle, 3.4 s beside one busy
    process; with OMP_WAIT_POLICY=PASSIVE 1.7 s and 2.2 s). So: PASSIVE when the machine is shared."""
    if "OMP_WAIT_POLICY" in os.environ:
        return None
    busy = busy_cores()
    if busy is not None and busy > 0.3:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"other processes use {busy:.1f} cores: OMP_WAIT_POLICY=PASSIVE"
    env.pop("OMP_WAIT_POLICY", None)
    return None


def last_line(log: Path, limit: int = 70) -> str:
    """The last informative line of a log (no table borders, no colour codes), shortened."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]+", ANSI.sub("", tail))):
        line = line.strip()
        if line and not BOX.match(line):
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def error_line(log: Path) -> str:
    """The child's own `error: ...` line, if it printed one, else its last line."""
    try:
        lines = ANSI.sub("", log.read_text(errors="replace")).splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:") or "Error:" in line:
            return line.strip()[:300]
    return last_line(log, 300)


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class StepRunner:
    def __init__(self, logs: Path, console, *, expect_s: dict | None = None, threads: int = 2):
        self.logs, self.console = Path(logs), console
        self.expect_s = expect_s or {}
        self.env = child_env(threads)
        self.records: list[StepRecord] = []
        self.index = {k: i + 1 for i, (k, _) in enumerate(STEPS)}

    def label(self, key: str, title: str) -> str:
        return f"[{self.index[key]}/{len(STEPS)}] {title}"

    def run(self, key: str, title: str, argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> StepRecord:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.index[key]:02d}-{key}.log"
        rec = StepRecord(key, title, shown(argv), str(log))
        self.records.append(rec)
        note = wait_policy(self.env)
        with open(log, "w") as f:
            f.write(f"$ {rec.command}\n" + (f"# {note}\n" if note else "") + "\n")
        t0, r0 = time.monotonic(), _children_cpu()
        try:
            rec.exit_code = self._execute(argv, log, self.label(key, title), self.expect_s.get(key))
        except KeyboardInterrupt:
            self.console.print(f"[yellow]interrupted[/] during {self.label(key, title)}; its output is in {log}")
            raise
        rec.seconds = round(time.monotonic() - t0, 1)
        rec.cpu_seconds = round(_children_cpu() - r0, 1)
        if rec.exit_code not in ok_codes:
            raise self.failed(rec)
        return rec

    def failed(self, rec: StepRecord) -> StepFailed:
        """The one line of a failed step: which step, its exit code, its own reason, and its log."""
        self.console.print(f"[red]✗[/] {self.label(rec.key, rec.title)} failed after {rec.seconds:.1f} s")
        why = re.sub(r"^error:\s*", "", error_line(Path(rec.log)))
        return StepFailed(f"demo step {self.index[rec.key]}/{len(STEPS)} '{rec.title}' failed (exit {rec.exit_code}): "
                          f"{why}; its output is in {rec.log}")

    def done(self, rec: StepRecord, result: str = "", ok: bool = True) -> None:
        """The permanent line of a finished step."""
        rec.result = result
        mark = "[green]✓[/]" if ok else "[yellow]![/]"
        self.console.print(f"{mark} {self.label(rec.key, rec.title)}  [dim]{rec.seconds:6.1f} s[/]"
                           + (f"  {result}" if result else ""))

    def _execute(self, argv: list[str], log: Path, label: str, expect: float | None) -> int:
        with open(log, "a") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env)
        try:
            if self.console.is_terminal:
                self._watch(proc, log, label, expect)
            else:
                self.console.print(f"  {label} ...")
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise

    def _watch(self, proc: subprocess.Popen, log: Path, label: str, expect: float | None) -> None:
        """A live line until the process ends: spinner, label, elapsed, its last output line."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        hint = f" (~{expect:.0f} s)" if expect else ""
        with Progress(SpinnerColumn(), TextColumn(label + hint), TimeElapsedColumn(),
                      TextColumn("[dim]{task.fields[status]}"), console=self.console, transient=True) as bar:
            task = bar.add_task(label, total=None, status="")
            stop = threading.Event()

            def tail():
                while not stop.wait(0.5):
                    bar.update(task, status=last_line(log))

            t = threading.Thread(target=tail, daemon=True)
            t.start()
            try:
                proc.wait()
            finally:
                stop.set()
                t.join()
