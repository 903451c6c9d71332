"""Turn run_all's JSON into the README's benchmark table (generated, never typed).

    python benchmarks/make_table.py                      # print the Markdown table
    python benchmarks/make_table.py --write-readme       # replace the block between the markers in README.md

The README block is delimited by `<!-- bench-table -->` and `<!-- /bench-table -->`. One row per figure:
benchmark, figure, value, and the command that produced it (the python executable shown as `python`,
paths relative to the repository).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def short_command(cmd: str, python: str | None = None, root: Path = ROOT) -> str:
    """`/venv/bin/python /repo/benchmarks/x.py --small` -> `python benchmarks/x.py --small`."""
    parts = shlex.split(cmd)
    if parts and (parts[0] == python or re.search(r"python[\d.]*$", parts[0])):
        parts[0] = "python"
    prefix = str(root).rstrip("/") + "/"
    return shlex.join(p[len(prefix):] if p.startswith(prefix) else p for p in parts)


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


#: Keys of a result's "extra" that name its variant (the row of a paper's table, the engine and file, ...).
VARIANT_KEYS = ("row", "config", "arm", "arch", "engine", "file")


def label(result: dict) -> str:
    """`classifier (se+sam)`: the benchmark and, when its extra names one, the variant it measured."""
    extra = result.get("extra") or {}
    parts = [str(extra[k]) for k in VARIANT_KEYS if isinstance(extra.get(k), (str, int)) and extra.get(k) != ""]
    return f"{result['benchmark']} ({', '.join(parts)})" if parts else result["benchmark"]


def table(report: dict) -> str:
    """Markdown: a line about the machine, the table, then the failures if any."""
    m = report.get("machine", {})
    cpu, git = m.get("cpu", {}), m.get("git", {})
    rev = (git.get("revision") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    lines = [f"Measured {report.get('finished') or report.get('started')} on {cpu.get('model', '?')} "
             f"({cpu.get('usable_cores', '?')} cores; {', '.join(cpu.get('int8_flags', [])) or 'no INT8 flags'}), "
             f"revision {rev}, by `python benchmarks/run_all.py`.", "",
             "| benchmark | figure | value | command |", "| --- | --- | --- | --- |"]
    for r in report.get("results", []):
        cmd = short_command(r.get("command", ""))
        for name, value in r.get("figures", {}).items():
            lines.append(f"| {label(r)} | {name} | {fmt(value)} | `{cmd}` |")
    if not report.get("results"):
        lines.append("| (no results) | | | |")
    fails = report.get("failures", [])
    if fails:
        lines += ["", "Not measured in this run: " + "; ".join(f"{f['benchmark']} ({f['reason']})" for f in fails) + "."]
    return "\n".join(lines)


class BadInput(Exception):
    """One line for the user; exit 2."""


def write_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise BadInput(f"{readme} has no '{START}' ... '{END}' block: add the two markers where the table belongs")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{START}\n{block}\n{END}{tail}")
    tmp.replace(readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", type=Path, default=HERE / "results" / "latest.json",
                   help="run_all's JSON (default benchmarks/results/latest.json).")
    p.add_argument("--write-readme", action="store_true", help="Replace the table block in the README.")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="The README to rewrite.")
    a = p.parse_args(argv)
    try:
        report = _load(a.results)
        block = table(report)
        if a.write_readme:
            write_readme(a.readme, block)
            print(f"wrote the benchmark table into {a.readme}")
        else:
            print(block)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} not found: run `python benchmarks/run_all.py` first") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e}); re-run benchmarks/run_all.py") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise BadInput(f"{path}: no 'results' list; it is not a benchmarks/run_all.py output")
    return report


if __name__ == "__main__":
    sys.exit(main())
