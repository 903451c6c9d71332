"""Run every benchmark at its small setting and collect the results into one JSON file.

    python benchmarks/run_all.py                      # all of benchmarks/*.py, --small, 60-minute budget
    python benchmarks/run_all.py decode --full        # one benchmark at its full setting
    python benchmarks/make_table.py --write-readme    # the README table from the JSON

Each benchmark runs as its own process (its own session, so a timeout kills its children too) with
`--small`, a per-benchmark timeout and what is left of the overall budget. A benchmark that fails, times
out or emits nothing is recorded under "failures" and the run goes on. Exit status 1 when anything failed.
Output: {"started", "finished", "machine", "runs", "results", "failures"}; logs beside it in logs/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import OUT_ENV, machine  # noqa: E402

NOT_BENCHMARKS = {"run_all.py", "make_table.py"}


def discover(directory: Path, only: list[str] | None = None) -> list[Path]:
    """benchmarks/*.py except helpers (`_*.py`) and the runners; `only` filters by stem."""
    found = sorted(p for p in directory.glob("*.py") if not p.name.startswith("_") and p.name not in NOT_BENCHMARKS)
    if only:
        unknown = set(only) - {p.stem for p in found}
        if unknown:
            raise SystemExit(f"error: no benchmark named {', '.join(sorted(unknown))} in {directory} "
                             f"(have: {', '.join(p.stem for p in found) or 'none'})")
        found = [p for p in found if p.stem in only]
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def run_one(script: Path, timeout: float, log: Path, small: bool = True) -> dict:
    """Run one benchmark; {"benchmark", "status", "seconds", "returncode", "results", "log"}."""
    fd, res_name = tempfile.mkstemp(prefix=f"{script.stem}-", suffix=".jsonl")
    os.close(fd)
    env = {**os.environ, OUT_ENV: res_name,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(script), *(["--small"] if small else [])]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            rc = proc.wait()
            status = "timeout"
    try:
        results = _read_lines(Path(res_name))
    except json.JSONDecodeError as e:
        results, status = [], f"bad result line: {e}"
    finally:
        os.unlink(res_name)
    if status == "ok" and not results:
        status = "no results"
    return {"benchmark": script.stem, "status": status, "seconds": round(time.monotonic() - t0, 1),
            "returncode": rc, "results": results, "log": str(log)}


def run_all(scripts: list[Path], out: Path, timeout: float, budget: float, small: bool = True) -> dict:
    report = {"started": _now(), "finished": None, "machine": machine(), "runs": [], "results": [], "failures": []}
    deadline = time.monotonic() + budget
    for script in scripts:
        left = deadline - time.monotonic()
        if left <= 0:
            report["failures"].append({"benchmark": script.stem, "reason": "skipped: overall budget used up"})
            continue
        print(f"[run_all] {script.stem} (timeout {min(timeout, left):.0f} s)", flush=True)
        r = run_one(script, min(timeout, left), out.parent / "logs" / f"{script.stem}.log", small)
        report["runs"].append({**{k: r[k] for k in ("benchmark", "status", "seconds", "returncode", "log")},
                               "result_lines": len(r["results"])})
        report["results"].extend(r["results"])
        if r["status"] != "ok":
            report["failures"].append({"benchmark": r["benchmark"], "reason": r["status"],
                                       "returncode": r["returncode"], "log_tail": _tail(Path(r["log"]))})
        _write(report, out)             # after every benchmark: an interrupted run keeps what it measured
    report["finished"] = _now()
    _write(report, out)
    return report


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)


def summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"benchmarks -> {out}")
    for c in ("benchmark", "status", "seconds", "results"):
        t.add_column(c)
    for run in report["runs"]:     # result lines per run (a benchmark may emit under several names: pipeline_*)
        style = "green" if run["status"] == "ok" else "red"
        t.add_row(run["benchmark"], f"[{style}]{run['status']}[/]", f"{run['seconds']}", str(run["result_lines"]))
    for f in report["failures"]:
        if f["reason"].startswith("skipped"):
            t.add_row(f["benchmark"], f"[red]{f['reason']}[/]", "-", "0")
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="Run only these benchmarks (file stems); default all.")
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest.json", help="The JSON file to write.")
    p.add_argument("--timeout", type=float, default=20 * 60, help="Seconds allowed to each benchmark.")
    p.add_argument("--budget", type=float, default=60.0, help="Minutes allowed to the whole run.")
    p.add_argument("--full", action="store_true", help="Run at the full setting (without --small).")
    p.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # other benchmark folders (tests)
    p.add_argument("--list", action="store_true", help="List the benchmarks and exit.")
    a = p.parse_args(argv)
    scripts = discover(a.dir, a.names)
    if a.list:
        print("\n".join(s.stem for s in scripts))
        return 0
    report = run_all(scripts, a.out, a.timeout, a.budget * 60, small=not a.full)
    summary(report, a.out)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
