"""Class names found in annotation files -> class indices, through a taxonomy and its aliases.

Names are matched by name, never by position. A mapping file (YAML or JSON, see
`cyto_edge.runtime.taxonomy`) may also list names to drop:

    classes: {koilocyte: LSIL, dyskeratotic: HSIL}
    aliases: {koilo: koilocyte}
    ignore: [superficial, "Negative for intraepithelial lesion"]   # not classes: skipped, not errors
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.runtime.taxonomy import DEFAULT, Taxonomy

#: Returned by `LabelMap.index` for a name that is deliberately skipped (e.g. NILM cells in CRIC).
IGNORED = -1

#: CRIC Cervix's Bethesda names: the abnormal ones are default classes (through the default aliases);
#: negative cells are not a class of the detector.
CRIC_IGNORE = ("negative for intraepithelial lesion", "nilm", "negative", "normal")


def _key(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


@dataclass(frozen=True)
class LabelMap:
    taxonomy: Taxonomy = DEFAULT
    ignore: frozenset[str] = field(default_factory=frozenset)  # normalised with `_key`
    source: str = "the default taxonomy"

    @property
    def classes(self) -> list[str]:
        return list(self.taxonomy.classes)

    def index(self, name) -> int | None:
        """Class index of `name` (any accepted spelling), IGNORED for a skipped name, None if unknown."""
        if name is None or str(name).strip() == "":
            return None
        if _key(name) in self.ignore:
            return IGNORED
        return self.taxonomy.index(str(name))

    def with_ignore(self, names) -> "LabelMap":
        return LabelMap(self.taxonomy, self.ignore | {_key(n) for n in names}, self.source)

    def unknown_hint(self) -> str:
        if self.source == "the default taxonomy":
            return "known classes: " + ", ".join(self.classes) + "; give --mapping FILE for other classes"
        return f"add it to {self.source} (classes, aliases or ignore)"


def _read_mapping_file(p: Path) -> dict:
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInput(f"{p}: cannot read class-mapping file ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        mark = getattr(e, "problem_mark", None)  # yaml's position
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        first = getattr(e, "problem", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise BadInput(f"{p}: malformed class-mapping file{where} ({first})") from None


def load_label_map(mapping=None, *, default_ignore=()) -> LabelMap:
    """`mapping`: None (default taxonomy), a path to a mapping file, a Taxonomy or a LabelMap."""
    if isinstance(mapping, LabelMap):
        return mapping.with_ignore(default_ignore) if default_ignore else mapping
    if isinstance(mapping, Taxonomy):
        return LabelMap(mapping, frozenset(_key(n) for n in default_ignore), "the given taxonomy")
    if mapping is None:
        return LabelMap(DEFAULT, frozenset(_key(n) for n in default_ignore))
    p = Path(mapping)
    d = _read_mapping_file(p)
    tax = Taxonomy.from_dict(d, source=str(p))
    ignore = d.get("ignore") or []
    if not isinstance(ignore, list):
        raise BadInput(f"{p}: ignore: must be a list of names")
    # A mapping file replaces the built-in ignore list: the user says exactly what to drop.
    return LabelMap(tax, frozenset(_key(n) for n in ignore), str(p))
