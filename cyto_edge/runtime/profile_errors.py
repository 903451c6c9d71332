"""One-line messages for pydantic errors in YAML configs: `file: camera.fsp: unknown field; did you mean 'fps'?`.

Discriminator tags that pydantic puts in error paths (`camera.opencv.fps`) are removed (`camera.fps`),
an unknown key gets the closest known field name, a bad tag lists the valid ones.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from cyto_edge.errors import format_validation_error


class _Errors:
    """A ValidationError look-alike carrying rewritten errors for format_validation_error."""

    def __init__(self, errs: list[dict]):
        self._errs = errs

    def errors(self) -> list[dict]:
        return self._errs


def one_line_error(err: ValidationError, source: str, root: type[BaseModel], tags: dict[str, str]) -> str:
    """`tags`: top-level field -> discriminator key of its union (e.g. {"camera": "kind"})."""
    out = []
    for e in err.errors():
        loc, typ = list(e.get("loc", ())), e.get("type", "")
        msg = e.get("msg", "invalid")
        clean = [x for i, x in enumerate(loc) if not (i == 1 and loc[0] in tags)]
        if typ == "extra_forbidden":
            fields = _fields_at(root, loc[:-1], tags)
            near = difflib.get_close_matches(str(loc[-1]), sorted(fields), n=1)
            msg = "unknown field" + (f"; did you mean {near[0]!r}?" if near else "")
        elif typ in ("union_tag_invalid", "union_tag_not_found") and clean and clean[0] in tags:
            ctx = e.get("ctx", {})
            got = ctx.get("tag")
            msg = (f"{got!r} is not one of {ctx.get('expected_tags', '')}" if got is not None
                   else f"required, one of {ctx.get('expected_tags', '')}")
            clean = [clean[0], tags[clean[0]]]
        elif typ == "missing":
            msg = "required"
        out.append({**e, "loc": tuple(clean), "msg": msg})
    return format_validation_error(_Errors(out), source)


def _fields_at(root: type[BaseModel], loc: list, tags: dict[str, str]) -> set[str]:
    """Field names of the model at `loc` (a path that includes discriminator tags, as pydantic gives it)."""
    model: Any = root
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            if _members(model):  # a tagged union: `part` is the tag
                hit = [m for m in _members(model) if _tag_value(m, tags) == part]
                model = hit[0] if hit else None
                continue
            return set()
        if part not in model.model_fields:
            return set()
        model = _model_of(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return set(model.model_fields)
    return set().union(*[set(m.model_fields) for m in _members(model)]) if _members(model) else set()


def _model_of(ann: Any) -> Any:
    if get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) is Union and len(args) == 1:
        return args[0]
    return ann


def _members(ann: Any) -> list:
    return [a for a in get_args(_model_of(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag_value(model: type[BaseModel], tags: dict[str, str]):
    for key in tags.values():
        f = model.model_fields.get(key)
        if f is not None:
            return get_args(f.annotation)[0]
    return None
