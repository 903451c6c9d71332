"""Rule-based grading of a field of view (FOV) and of a slide, from frame-level detections.

FOV grade: the most severe Bethesda category (NILM < ASC-US < LSIL < ASC-H < AGC < HSIL < SCC) with at
least k detections at or above their class threshold; NILM otherwise. Organisms are flags under NILM and
never raise the grade, whatever their class maps to.

Suspicion score, in [0, 1]: a noisy-OR over the abnormal (non-NILM, non-organism) detections,
    s = 1 - prod_{i in top m} (1 - w(category_i) * score_i),
where w is the policy's severity weight of the detection's Bethesda category and the product runs over
the m (`suspicion_top`) largest values of w * score. Every detection counts, also below the grading
thresholds, so the score is continuous. It is monotone: raising any detection's score (or adding a
detection) never lowers s, since the top-m product is the smallest product over any m detections.

Adequacy (TBS 2014): a liquid-based preparation needs at least 5000 well-preserved squamous cells
(`min_squamous`, configurable: 8000-12000 for conventional smears); a specimen with abnormal cells is
satisfactory whatever its cellularity (`abnormal_is_satisfactory`). The squamous count of a FOV comes from
`count_squamous` (runtime/nuclei.py; `count_nuclei` counts every nucleus) or from the caller. The slide
total is the sum over the graded FOVs, so it only reaches the TBS figure when enough of the slide is seen.

Configuration: the bundle manifest gives the defaults (post-processing thresholds, `grading` spec), a
device profile may override operating choices (`policy_from_manifest`), never the classes or their
Bethesda mapping. Grading thresholds below the detector's post-processing thresholds have no effect on
detections the decoder has already dropped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cyto_edge.errors import BadInput, format_validation_error
from cyto_edge.runtime.decode import Detections
from cyto_edge.runtime.nuclei import count_nuclei, count_squamous  # noqa: F401  (re-exported: adequacy counters)
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER, SEVERITY, Taxonomy

DEFAULT_WEIGHTS: dict[str, float] = {"NILM": 0.0, "ASC-US": 0.4, "LSIL": 0.55, "ASC-H": 0.7, "AGC": 0.75,
                                     "HSIL": 0.9, "SCC": 1.0}
#: What a device profile may never change: it is fixed by the model the bundle carries.
MODEL_FIXED = {"classes": "the classes", "bethesda": "the class -> Bethesda mapping", "mapping":
               "the class -> Bethesda mapping", "organisms": "which classes are organisms", "taxonomy":
               "the taxonomy", "um_per_px": "the model's scale", "input": "the model input",
               "output": "the model output", "num_classes": "the classes"}


def _categories(d: dict, what: str) -> dict:
    bad = [k for k in d if k not in SEVERITY]
    if bad:
        raise ValueError(f"{what}: {bad[0]!r} is not a Bethesda category ({', '.join(BETHESDA_ORDER)})")
    return d


class GradingPolicy(BaseModel):
    """How detections become a FOV grade and a slide verdict (all operating choices)."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(0.5, ge=0, le=1)            # default per-class grading threshold
    class_thresholds: dict[str, float] = Field(default_factory=dict)  # class name -> threshold
    min_count: int = Field(1, ge=1)                            # k: detections a category needs
    category_min_count: dict[str, int] = Field(default_factory=dict)  # Bethesda category -> k
    organism_threshold: float | None = Field(None, ge=0, le=1)  # None: the class threshold
    organism_min_count: int = Field(1, ge=1)                   # detections that raise an organism flag
    min_squamous: int = Field(5000, ge=0)                      # per slide (TBS, liquid-based)
    abnormal_is_satisfactory: bool = True
    suspicion_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    suspicion_top: int = Field(10, ge=1)                       # m in the noisy-OR
    top_n: int = Field(5, ge=0)                                # suspicious detections kept per FOV
    slide_top_n: int = Field(24, ge=0)                         # gallery size of the slide summary

    @field_validator("class_thresholds")
    @classmethod
    def _thr(cls, v: dict[str, float]) -> dict[str, float]:
        for k, t in v.items():
            if not 0 <= t <= 1:
                raise ValueError(f"{k}: threshold {t} must be in [0, 1]")
        return v

    @field_validator("category_min_count")
    @classmethod
    def _k(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in _categories(v, "category_min_count").items():
            if n < 1:
                raise ValueError(f"{k}: must be >= 1")
        return v

    @field_validator("suspicion_weights")
    @classmethod
    def _w(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in _categories(v, "suspicion_weights").items():
            if not 0 <= w <= 1:
                raise ValueError(f"{k}: weight {w} must be in [0, 1]")
        return {**DEFAULT_WEIGHTS, **v}

    def check_classes(self, taxonomy: Taxonomy, source: str = "grading") -> None:
        unknown = [c for c in self.class_thresholds if c not in taxonomy.classes]
        if unknown:
            raise BadInput(f"{source}: class_thresholds.{unknown[0]}: the bundle has no class {unknown[0]!r} "
                           f"(its classes: {', '.join(taxonomy.classes)})")

    def thresholds(self, taxonomy: Taxonomy) -> np.ndarray:
        """(C,) float32 grading threshold per class in model output order (organisms included)."""
        thr = [self.class_thresholds.get(c, self.score_threshold) for c in taxonomy.classes]
        if self.organism_threshold is not None:
            thr = [self.organism_threshold if taxonomy.is_organism(i) else t for i, t in enumerate(thr)]
        return np.asarray(thr, np.float32)

    def k(self, category: str) -> int:
        return self.category_min_count.get(category, self.min_count)


def policy_from_manifest(manifest: Any, overrides: Mapping | None = None,
                         source: str = "profile grading") -> GradingPolicy:
    """Policy from a bundle manifest (thresholds from `postprocess`, k from `grading`), then a profile's overrides.

    Overrides may set any GradingPolicy field; dict fields are merged key by key. A class name must be one of
    the bundle's (any accepted spelling); anything the model fixes (classes, mapping, scale) is refused.
    """
    m = getattr(manifest, "manifest", manifest)  # a Bundle or its Manifest
    tax = m.taxonomy()
    base = {"score_threshold": m.postprocess.score_threshold,
            "class_thresholds": dict(m.postprocess.class_thresholds),
            "min_count": m.grading.min_count, "category_min_count": dict(m.grading.category_min_count),
            "organism_min_count": m.grading.organism_min_count}
    for key, value in (overrides or {}).items():
        if key in MODEL_FIXED:
            raise BadInput(f"{source}.{key}: a profile may not change {MODEL_FIXED[key]} (fixed by the bundle); "
                           "remove it from the profile")
        if key not in GradingPolicy.model_fields:
            raise BadInput(f"{source}.{key}: unknown grading setting; allowed: "
                           f"{', '.join(GradingPolicy.model_fields)}")
        if key == "class_thresholds":
            value = _canonical_classes(value, tax, f"{source}.{key}")
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    try:
        policy = GradingPolicy.model_validate(base)
    except ValidationError as e:
        raise BadInput(format_validation_error(e, source)) from None
    policy.check_classes(tax, source)
    return policy


def _canonical_classes(value: Any, tax: Taxonomy, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise BadInput(f"{where}: must be a mapping of class name -> threshold")
    out = {}
    for name, thr in value.items():
        canon = tax.canonical(name)
        if canon is None:
            raise BadInput(f"{where}.{name}: the bundle has no class {name!r} (its classes: {', '.join(tax.classes)})")
        out[canon] = thr
    return out


# ------------------------------------------------------------------------------------ FOV grade

@dataclass
class SuspiciousDetection:
    index: int          # index into the FOV's detections
    cls: str
    category: str
    score: float
    weight: float       # severity weight x score: the term in the noisy-OR
    box: list[float]    # xyxy frame px


@dataclass
class FovGrade:
    grade: str                              # Bethesda category
    suspicion: float                        # noisy-OR score in [0, 1]
    class_counts: dict[str, int]            # detections at or above their class threshold, per class
    category_counts: dict[str, int]         # the same for non-organism classes, per Bethesda category
    organisms: dict[str, int]               # organism flags: name -> count (only flagged ones)
    top: list[SuspiciousDetection]          # most suspicious abnormal detections, best first
    n_detections: int
    squamous_count: int | None = None
    focus: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def grade_fov(dets: Detections, taxonomy: Taxonomy, policy: GradingPolicy, squamous_count: int | None = None,
              focus: float | None = None) -> FovGrade:
    """Grade one FOV from its (frame-level, merged) detections; see the module docstring for the rules."""
    C = taxonomy.num_classes
    labels = np.asarray(dets.labels, np.int64)
    scores = np.asarray(dets.scores, np.float64)
    if len(labels) and (labels.min() < 0 or labels.max() >= C):
        raise BadInput(f"detections: label {int(labels.max())} is outside the bundle's {C} classes")
    organism = np.array([taxonomy.is_organism(i) for i in range(C)], bool)            # (C,)
    cat_of = [taxonomy.category(i) for i in range(C)]
    above = scores >= policy.thresholds(taxonomy)[labels] if len(labels) else np.zeros(0, bool)
    per_class = np.bincount(labels[above], minlength=C)                                # (C,)
    cat_counts = {c: 0 for c in BETHESDA_ORDER}
    for i in range(C):
        if not organism[i]:
            cat_counts[cat_of[i]] += int(per_class[i])
    grade = "NILM"
    for cat in BETHESDA_ORDER[1:]:
        if cat_counts[cat] >= policy.k(cat):
            grade = cat                       # BETHESDA_ORDER is ascending: the last hit is the worst
    flags = {taxonomy.classes[i]: int(per_class[i]) for i in range(C)
             if organism[i] and per_class[i] >= policy.organism_min_count}
    suspicion, top = _suspicion(dets, labels, scores, organism, cat_of, taxonomy, policy)
    return FovGrade(grade, suspicion, {c: int(n) for c, n in zip(taxonomy.classes, per_class)}, cat_counts,
                    flags, top, len(labels), None if squamous_count is None else int(squamous_count),
                    None if focus is None else float(focus))


def _suspicion(dets, labels, scores, organism, cat_of, taxonomy, policy) -> tuple[float, list]:
    w = np.array([0.0 if organism[i] else policy.suspicion_weights[cat_of[i]] for i in range(len(cat_of))])
    v = w[labels] * np.clip(scores, 0, 1) if len(labels) else np.zeros(0)             # (K,)
    order = np.argsort(-v, kind="stable")
    order = order[v[order] > 0]
    s = float(1.0 - np.prod(1.0 - v[order[: policy.suspicion_top]]))
    top = [SuspiciousDetection(int(i), taxonomy.classes[labels[i]], cat_of[labels[i]], float(scores[i]),
                               float(v[i]), [float(x) for x in dets.boxes[i]]) for i in order[: policy.top_n]]
    return s, top


# -------------------------------------------------------------------------------- slide summary

@dataclass
class SlideSummary:
    n_fovs: int
    grade_counts: dict[str, int]            # FOVs per grade, BETHESDA_ORDER
    class_counts: dict[str, int]            # detections at or above threshold over the slide
    worst_grade: str
    worst_fovs: list                        # FOV ids graded worst_grade
    max_suspicion: float
    top_cells: list[dict]                   # gallery: {fov, index, cls, category, score, weight, box}
    organisms: dict[str, dict]              # name -> {"count": detections, "fovs": FOVs flagged}
    squamous_total: int | None              # over the FOVs that have a count
    squamous_fovs: int                      # FOVs with a squamous count
    adequacy: str                           # "satisfactory" | "unsatisfactory"
    adequacy_reason: str
    fov_ids: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class SlideAccumulator:
    """The slide summary kept up to date one FOV at a time, in memory independent of the number of FOVs but
    for the ids it reports (worst_fovs, fov_ids): counts, the worst grade, the top cells (the best
    `slide_top_n` so far, ties in FOV order), the squamous total. `summarize_slide` is this over a list."""

    def __init__(self, policy: GradingPolicy):
        self.policy = policy
        self.n = 0
        self.grade_counts = {c: 0 for c in BETHESDA_ORDER}
        self.class_counts: dict[str, int] = {}
        self.organisms: dict[str, dict] = {}
        self.worst, self.worst_fovs = "NILM", []
        self.max_suspicion = 0.0
        self.cells: list[dict] = []
        self.squamous_total, self.squamous_fovs = 0, 0
        self.fov_ids: list = []

    def add(self, fid, g: FovGrade) -> None:
        self.n += 1
        self.fov_ids.append(fid)
        self.grade_counts[g.grade] += 1
        for c, n in g.class_counts.items():
            self.class_counts[c] = self.class_counts.get(c, 0) + n
        for o, n in g.organisms.items():
            e = self.organisms.setdefault(o, {"count": 0, "fovs": 0})
            e["count"], e["fovs"] = e["count"] + n, e["fovs"] + 1
        if self.n == 1 or SEVERITY[g.grade] > SEVERITY[self.worst]:
            self.worst, self.worst_fovs = g.grade, []
        if g.grade == self.worst:
            self.worst_fovs.append(fid)
        self.max_suspicion = g.suspicion if self.n == 1 else max(self.max_suspicion, g.suspicion)
        if g.top:
            self.cells += [{"fov": fid, **asdict(d)} for d in g.top]
            self.cells.sort(key=lambda d: -d["weight"])     # stable: ties keep FOV order
            del self.cells[self.policy.slide_top_n:]
        if g.squamous_count is not None:
            self.squamous_total += int(g.squamous_count)
            self.squamous_fovs += 1

    def summary(self) -> SlideSummary:
        total = self.squamous_total if self.squamous_fovs else None
        verdict, reason = _adequacy(self.worst, total, self.squamous_fovs, self.policy)
        return SlideSummary(self.n, dict(self.grade_counts), dict(self.class_counts), self.worst,
                            list(self.worst_fovs), self.max_suspicion if self.n else 0.0,
                            [dict(c) for c in self.cells], {k: dict(v) for k, v in self.organisms.items()},
                            total, self.squamous_fovs, verdict, reason, list(self.fov_ids))


def summarize_slide(fovs: Sequence[FovGrade] | Mapping[Any, FovGrade], policy: GradingPolicy) -> SlideSummary:
    """Slide (session) summary over graded FOVs; `fovs` a list (ids 0..n-1) or a mapping id -> FovGrade."""
    acc = SlideAccumulator(policy)
    for fid, g in (fovs.items() if isinstance(fovs, Mapping) else enumerate(fovs)):
        acc.add(fid, g)
    return acc.summary()


def _adequacy(worst: str, total: int | None, n_counted: int, policy: GradingPolicy) -> tuple[str, str]:
    if worst != "NILM" and policy.abnormal_is_satisfactory:
        return "satisfactory", f"abnormal cells present ({worst}): satisfactory whatever the cellularity (TBS)"
    if total is None:
        return "unsatisfactory", "no squamous-cell count available for any FOV"
    if total >= policy.min_squamous:
        return "satisfactory", f"{total} squamous cells counted in {n_counted} FOVs (>= {policy.min_squamous})"
    return "unsatisfactory", (f"{total} squamous cells counted in {n_counted} FOVs, fewer than the "
                              f"{policy.min_squamous} required")
