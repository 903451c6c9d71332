"""Small helpers shared by the command modules."""
from __future__ import annotations

import json
import sys

from cyto_edge.errors import NotAvailable


def not_yet(command: str, issue: str) -> None:
    """Commands whose implementation has not landed say so plainly (exit 2)."""
    raise NotAvailable(f"`cyto-edge {command}` is not available in this version yet ({issue})")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
