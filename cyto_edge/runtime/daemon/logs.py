"""Structured logs for the daemon: one line per event, plain text or JSON lines (`--log-format json`).

    log = get_logger("store")
    event(log, "fov stored", session=3, fov=41, grade="LSIL", ms=38.2)

Privacy: the daemon never logs a slide id, an operator name or notes (they may identify a patient);
sessions are named by their number. Query strings are never logged (a `?token=` may be in them).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys

ROOT = "cyto_edge.daemon"
_FIELDS = "_fields"


class JsonFormatter(logging.Formatter):
    """{"ts": UTC ISO time, "level", "logger", "msg", ...fields}; an exception as "exc" (its last line)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info).strip().splitlines()[-1]
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`2025-01-01T10:00:00Z info store: fov stored session=3 fov=41`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        fields = getattr(record, _FIELDS, None) or {}
        kv = " ".join(f"{k}={v}" for k, v in fields.items())
        name = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        line = f"{ts} {record.levelname.lower()} {name}: {record.getMessage()}" + (f" {kv}" if kv else "")
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).strip().splitlines()[-1]
        return line


def setup(fmt: str = "text", level: str = "info", stream=None) -> None:
    """Configure the root logger once: one handler on stderr, text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "multipart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name}")


def event(logger: logging.Logger, msg: str, *, level: int = logging.INFO, exc_info=None, **fields) -> None:
    """Log `msg` with structured fields (shown as key=value in text, as keys in JSON)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={_FIELDS: fields}, exc_info=exc_info)
