"""What the configuration looks like, for people and editors: a JSON Schema and a default file.

Both are derived from the structs of :mod:`pipeline.config`, so they cannot drift from what
loading accepts. The description of each setting is its ``#:`` comment in that module (the
Sphinx convention: the comment lines right above a field), read from the module's source; a
struct's docstring describes the struct. Without the source (a build that ships only ``.pyc``)
the schema and the file are the same, minus descriptions.

- :func:`json_schema`: ``msgspec.json.schema(Config)`` as draft 7, plus descriptions, the
  ``<key>_file`` variant of every string setting, and ``${VAR}`` accepted where a number or
  boolean goes (both are resolved before validation).
- :func:`default_yaml`: every section with every setting at its default value and its
  description as a comment; list sections (templates, integrations, devices) as a commented
  example entry. Loading it gives exactly the defaults (tested).
"""

from __future__ import annotations

import ast
import inspect
import json
from functools import cache
from typing import Any

import msgspec
import msgspec.inspect as mi

from pipeline import config as config_mod
from pipeline.redact import Secret

#: ``${NAME}`` / ``${NAME:-default}`` as a whole value (substituted before validation).
_VAR_PATTERN = r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"


@cache
def field_docs() -> dict[tuple[str, str], str]:
    """(struct name, field name) → the field's ``#:`` comment, joined into one text."""
    try:
        source = inspect.getsource(config_mod)
    except (OSError, TypeError):  # no source shipped: no descriptions
        return {}
    lines = source.splitlines()
    docs: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                comment: list[str] = []
                at = item.lineno - 2
                while at >= 0 and lines[at].strip().startswith("#:"):
                    comment.insert(0, lines[at].strip()[2:].strip())
                    at -= 1
                if comment:
                    docs[(node.name, item.target.id)] = " ".join(comment)
    return docs


def _structs() -> dict[str, mi.StructType]:
    """Every struct reachable from :class:`Config`, by class name (as msgspec names them)."""
    out: dict[str, mi.StructType] = {}

    def visit(t: mi.Type) -> None:
        if isinstance(t, mi.StructType):
            if t.cls.__name__ in out:
                return
            out[t.cls.__name__] = t
            for f in t.fields:
                visit(f.type)
        elif isinstance(t, mi.UnionType):
            for u in t.types:
                visit(u)
        elif isinstance(t, (mi.ListType, mi.SetType, mi.VarTupleType)):
            visit(t.item_type)
        elif isinstance(t, mi.DictType):
            visit(t.value_type)

    visit(mi.type_info(config_mod.Config))
    return out


def _schema_hook(typ: type) -> dict[str, Any]:
    if typ is Secret:
        return {"type": "string"}
    raise NotImplementedError


def _options(t: mi.Type) -> tuple[mi.Type, ...]:
    return t.types if isinstance(t, mi.UnionType) else (t,)


def _is_text(t: mi.Type) -> bool:
    return any(isinstance(o, (mi.StrType, mi.CustomType)) for o in _options(t))


def _is_scalar(t: mi.Type) -> bool:
    return all(isinstance(o, (mi.IntType, mi.FloatType, mi.BoolType, mi.NoneType))
               for o in _options(t))


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 7) of the configuration file, for editor completion and checks."""
    schema: dict[str, Any] = msgspec.json.schema(config_mod.Config, schema_hook=_schema_hook)
    docs = field_docs()
    defs: dict[str, Any] = schema["$defs"]
    for name, struct in _structs().items():
        props: dict[str, Any] = defs[name]["properties"]
        for f in struct.fields:
            prop = props[f.encode_name]
            if doc := docs.get((name, f.name)):
                prop.setdefault("description", doc)
            if _is_scalar(f.type):
                # `port: "${PORT}"` is valid: the variable is substituted, then checked.
                var = {"type": "string", "pattern": _VAR_PATTERN}
                outer = {k: prop.pop(k) for k in ("description", "default") if k in prop}
                props[f.encode_name] = {"anyOf": [prop, var], **outer}
            if _is_text(f.type) and not f.encode_name.endswith("_file"):
                props[f"{f.encode_name}_file"] = {
                    "type": "string",
                    "description": f"a file whose content (stripped) is `{f.encode_name}`",
                }
    # Draft 7 (``definitions``), the draft VS Code's YAML extension implements: it warns that
    # 2020-12 is "not yet fully supported". msgspec writes nothing newer than draft 7 besides
    # the ``$defs`` name.
    return {"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "blynk-bridge configuration",
            "$ref": _draft7(schema["$ref"]),
            "definitions": _draft7(defs)}


def _draft7(node: Any) -> Any:
    """``#/$defs/X`` references as ``#/definitions/X``."""
    if isinstance(node, str):
        return node.replace("#/$defs/", "#/definitions/")
    if isinstance(node, list):
        return [_draft7(v) for v in node]
    if isinstance(node, dict):
        return {k: _draft7(v) if k == "$ref" or not isinstance(v, str) else v
                for k, v in node.items()}
    return node


# --- the default file ----------------------------------------------------------------------------

HEADER = """\
# blynk-bridge configuration: every setting at its default, described above it.
# Written by `blynk-bridge config default`; check it with `blynk-bridge check-config FILE`.
# Delete what you do not change. `${NAME}` / `${NAME:-default}` in a value come from the
# environment; `<key>_file: /path` reads a secret from a file.
# Editor completion (VS Code YAML extension): write the schema next to this file with
#   blynk-bridge config schema > bridge.schema.json
# and remove the first "# " of the next line.
# # yaml-language-server: $schema=bridge.schema.json
"""


def default_yaml() -> str:
    """The commented default file (it loads to exactly the default :class:`Config`)."""
    docs = field_docs()
    out = [HEADER.rstrip("\n")]
    root = mi.type_info(config_mod.Config)
    assert isinstance(root, mi.StructType)
    for f in root.fields:
        out.append("")
        out += _comment(docs.get(("Config", f.name)), "")
        seq = _pick(f.type, mi.ListType)
        if isinstance(f.type, mi.StructType):
            out += _comment(f.type.cls.__doc__, "")
            out.append(f"{f.encode_name}:")
            for sub in f.type.fields:
                out += _setting(f.type, sub, "  ", docs)
        elif seq is not None and isinstance(seq.item_type, mi.StructType):
            out += _comment(seq.item_type.cls.__doc__, "")
            out.append(f"# {f.encode_name}:")
            out += ["# " + line for line in _skeleton(seq.item_type, "  - ", "    ", docs)]
            out.append(f"{f.encode_name}: []")
        else:
            out.append(f"{f.encode_name}: {_value(_default(f))}")
    return "\n".join(out) + "\n"


def _setting(owner: mi.StructType, f: mi.Field, indent: str, docs: dict[tuple[str, str], str]
             ) -> list[str]:
    """One setting of a section: its description, then ``key: default`` (commented out when
    it has no value by default)."""
    lines = _comment(docs.get((owner.cls.__name__, f.name)), indent)
    value = _default(f)
    struct = _pick(f.type, mi.StructType)
    if value is None and struct is not None:
        lines.append(f"{indent}# {f.encode_name}:")
        lines += [f"{indent}# {line}" for line in _skeleton(struct, "  ", "  ", docs)]
    elif value is None:
        lines.append(f"{indent}# {f.encode_name}: {_hint(f.type)}")
    else:
        lines.append(f"{indent}{f.encode_name}: {_value(value)}")
    return lines


def _skeleton(struct: mi.StructType, first: str, rest: str,
              docs: dict[tuple[str, str], str]) -> list[str]:
    """An example entry of ``struct`` (to be commented out): required keys with a type hint,
    the others at their default or with a hint; the first line starts with ``first``."""
    lines: list[str] = []
    for f in struct.fields:
        prefix = first if not lines else rest
        lines += _comment(docs.get((struct.cls.__name__, f.name)), prefix if not lines else rest)
        prefix = first if not lines else rest
        value = None if f.required else _default(f)
        nested = _pick(f.type, mi.StructType)
        seq = _pick(f.type, mi.ListType)
        item = seq.item_type if seq is not None else None
        note = "  # required" if f.required else ""
        if isinstance(item, mi.StructType) and not value:
            lines.append(f"{prefix}{f.encode_name}:{note}")
            lines += _skeleton(item, rest + "  - ", rest + "    ", docs)
        elif nested is not None and value is None:
            alt = [o for o in _options(f.type) if not isinstance(o, (mi.StructType,
                                                                       mi.NoneType))]
            also = f"  # or {' | '.join(_hint(a) for a in alt)}" if alt else note
            lines.append(f"{prefix}{f.encode_name}:{also}")
            lines += _skeleton(nested, rest + "  ", rest + "  ", docs)
        elif value is None:
            lines.append(f"{prefix}{f.encode_name}: {_hint(f.type)}{note}")
        else:
            lines.append(f"{prefix}{f.encode_name}: {_value(value)}")
    return lines


def _comment(text: str | None, indent: str, width: int = 96) -> list[str]:
    """``text`` as ``# `` lines wrapped to ``width``."""
    if not text:
        return []
    words = " ".join(text.replace("``", "`").split()).split(" ")
    lines: list[str] = []
    line = ""
    for word in words:
        if line and len(indent) + 2 + len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return [f"{indent}# {x}" for x in lines]


def _default(f: mi.Field) -> Any:
    if f.default is not msgspec.NODEFAULT:
        return f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return f.default_factory()
    return None


def _value(value: Any) -> str:
    """A default as YAML: JSON is YAML, and quotes every string (``"bb:"``, ``"0.0.0.0"``)."""
    return json.dumps(msgspec.to_builtins(value))


def _hint(t: mi.Type) -> str:
    """A placeholder naming the type: ``<int>``, ``push|replace``…"""
    parts: list[str] = []
    for o in _options(t):
        if isinstance(o, mi.NoneType):
            continue
        if isinstance(o, mi.LiteralType):
            parts.append("|".join(str(v) for v in o.values))
        elif isinstance(o, (mi.StrType, mi.CustomType)):
            parts.append("<text>")
        elif isinstance(o, mi.IntType):
            parts.append("<integer>")
        elif isinstance(o, mi.FloatType):
            parts.append("<number>")
        elif isinstance(o, mi.BoolType):
            parts.append("true|false")
        elif isinstance(o, mi.DictType):
            parts.append("{}")
        elif isinstance(o, mi.ListType):
            parts.append("[]")
        else:
            parts.append("<value>")
    return " or ".join(parts) or "null"


def _pick(t: mi.Type, kind: type[Any]) -> Any:
    return next((o for o in _options(t) if isinstance(o, kind)), None)
