"""Classes, their Bethesda categories, and the severity order used for grading.

The default taxonomy is CDetector's 11 classes. Organisms map to NILM and raise a flag; they never
raise the grade. Other datasets bring a mapping file (YAML or JSON):

    classes:            # class name -> Bethesda category, in model output order
      koilocyte: LSIL
      dyskeratotic: HSIL
      superficial: NILM
    aliases:            # optional: other spellings found in annotation files
      koilo: koilocyte
    organisms: []       # optional: classes that are organism flags under NILM
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cyto_edge.errors import BadInput

#: Bethesda categories from least to most severe (DESIGN.md).
BETHESDA_ORDER: tuple[str, ...] = ("NILM", "ASC-US", "LSIL", "ASC-H", "AGC", "HSIL", "SCC")
SEVERITY: dict[str, int] = {c: i for i, c in enumerate(BETHESDA_ORDER)}

DEFAULT_CLASSES: tuple[str, ...] = (
    "ascus", "asch", "lsil", "hsil", "scc", "agc",
    "trichomonas", "candida", "flora", "herps", "actinomyces",
)
DEFAULT_MAPPING: dict[str, str] = {
    "ascus": "ASC-US", "asch": "ASC-H", "lsil": "LSIL", "hsil": "HSIL", "scc": "SCC", "agc": "AGC",
    "trichomonas": "NILM", "candida": "NILM", "flora": "NILM", "herps": "NILM", "actinomyces": "NILM",
}
DEFAULT_ORGANISMS: tuple[str, ...] = ("trichomonas", "candida", "flora", "herps", "actinomyces")
DEFAULT_ALIASES: dict[str, str] = {
    "asc-us": "ascus", "asc_us": "ascus", "asc-h": "asch", "asc_h": "asch",
    "lsil": "lsil", "hsil": "hsil", "scc": "scc", "agc": "agc",
    "trich": "trichomonas", "tric": "trichomonas", "trichomonas vaginalis": "trichomonas",
    "cand": "candida", "candida spp": "candida", "fungi": "candida",
    "flora": "flora", "clue": "flora", "clue cell": "flora", "bacterial flora": "flora",
    "herpes": "herps", "hsv": "herps", "actin": "actinomyces", "actinomycetes": "actinomyces",
    "trichomonad": "trichomonas", "candida albicans": "candida", "yeast": "candida",
    "herpes simplex": "herps", "herpes simplex virus": "herps", "actino": "actinomyces",
    "squamous cell carcinoma": "scc", "atypical glandular cells": "agc",
}


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split()).replace(" ", "_") if name else ""


@dataclass(frozen=True)
class Taxonomy:
    """Class names in model output order, each with its Bethesda category."""

    classes: tuple[str, ...] = DEFAULT_CLASSES
    mapping: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MAPPING))
    organisms: tuple[str, ...] = DEFAULT_ORGANISMS
    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))

    def __post_init__(self):
        for c in self.classes:
            cat = self.mapping.get(c)
            if cat not in SEVERITY:
                raise BadInput(f"class {c!r}: Bethesda category {cat!r} must be one of {', '.join(BETHESDA_ORDER)}")
        for o in self.organisms:
            if o not in self.classes:
                raise BadInput(f"organism {o!r} is not one of the classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int | None:
        """Index of a class given any accepted spelling, or None when unknown."""
        canon = self.canonical(name)
        return self.classes.index(canon) if canon is not None else None

    def canonical(self, name: str) -> str | None:
        raw = str(name).strip()
        if raw in self.classes:
            return raw
        low = raw.lower()
        for key in (low, _norm(low), low.replace("_", "-"), low.replace("_", " ")):
            if key in self.classes:
                return key
            if key in self.aliases and self.aliases[key] in self.classes:
                return self.aliases[key]
        return None

    def category(self, cls: str | int) -> str:
        name = self.classes[cls] if isinstance(cls, int) else cls
        return self.mapping[name]

    def severity(self, cls: str | int) -> int:
        return SEVERITY[self.category(cls)]

    def is_organism(self, cls: str | int) -> bool:
        name = self.classes[cls] if isinstance(cls, int) else cls
        return name in self.organisms

    def to_dict(self) -> dict:
        return {"classes": {c: self.mapping[c] for c in self.classes}, "organisms": list(self.organisms),
                "aliases": dict(self.aliases)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "mapping") -> "Taxonomy":
        if not isinstance(d, dict) or not isinstance(d.get("classes"), dict) or not d["classes"]:
            raise BadInput(f"{source}: 'classes' must be a non-empty mapping of class name -> Bethesda category")
        classes = tuple(str(k) for k in d["classes"])
        mapping = {str(k): str(v) for k, v in d["classes"].items()}
        organisms = tuple(d.get("organisms", ()) or ())
        aliases = {str(k).lower(): str(v) for k, v in (d.get("aliases") or {}).items()}
        try:
            return cls(classes=classes, mapping=mapping, organisms=organisms, aliases=aliases)
        except BadInput as e:
            raise BadInput(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise BadInput(f"{p}: cannot read class-mapping file ({e.strerror})") from None
        try:
            if p.suffix.lower() == ".json":
                d = json.loads(text)
            else:
                import yaml

                d = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - any parse error becomes one line
            raise BadInput(f"{p}: malformed class-mapping file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return cls.from_dict(d, source=str(p))

    @classmethod
    def for_classes(cls, names: list[str] | tuple[str, ...]) -> "Taxonomy":
        """A taxonomy over a subset / reordering of the default classes."""
        base = cls()
        canon = []
        for n in names:
            c = base.canonical(n)
            if c is None:
                raise BadInput(f"class {n!r} is not in the default taxonomy; give a class-mapping file")
            canon.append(c)
        return cls(classes=tuple(canon), mapping={c: DEFAULT_MAPPING[c] for c in canon},
                   organisms=tuple(c for c in canon if c in DEFAULT_ORGANISMS))


DEFAULT = Taxonomy()


def most_severe(categories: list[str]) -> str:
    """The most severe Bethesda category of a list (NILM for an empty list)."""
    return max(categories, key=lambda c: SEVERITY[c], default="NILM")
