"""The one reason vocabulary (``pipeline.errors.Reason``) is the only source of reason codes.

By construction: every place that produces a reason is typed :class:`Reason` (mypy refuses a
plain string there; the annotations are checked below so nobody loosens them), and a scan of
the source finds no string literal handed over as a reason. The table in docs/DESIGN.md lists
exactly the vocabulary.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from pipeline import events, streams
from pipeline.blynk import outcomes
from pipeline.errors import BridgeError, Kind, Reason, describe
from pipeline.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("pipeline", "workers", "blynk_bridge")
                 for p in (ROOT / d).rglob("*.py") if p.name != "errors.py")
#: Calls whose first positional arguments include a reason: name → its position.
_REASON_ARG = {"Retry": 0, "Fail": 0, "Refused": 1, "refused": 1, "_rejected": 1}


def test_every_reason_is_described() -> None:
    for r in Reason:
        assert r.description, r
        assert isinstance(r.kind, Kind), r
        assert re.fullmatch(r"[a-z][a-z0-9_]*", r.value), r
    assert describe("invalid_json") == Reason.INVALID_JSON.description
    assert "not a reason" in describe("no_such_code")


def test_the_sinks_take_a_reason_not_a_string() -> None:
    hints = [
        typing.get_type_hints(BridgeError.__init__)["reason"],
        typing.get_type_hints(events.dead_letter)["reason"],
        typing.get_type_hints(Registry.mark_broken)["reason"],
        typing.get_type_hints(outcomes.Retry)["reason"],
        typing.get_type_hints(outcomes.Fail)["reason"],
    ]
    for hint in hints:
        assert set(typing.get_args(hint) or (hint,)) <= {Reason, type(None)}, hint
    assert streams.DeadItem == tuple[streams.Entry, Reason, str]


def _literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_string_literal_is_handed_over_as_a_reason(path: Path) -> None:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "reason" and _literal(kw.value):
                    found.append(node.lineno)
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else ""
            pos = _REASON_ARG.get(name)
            # (positional: a plain constant; StatusBoard.refused takes a formatted message there)
            arg = node.args[pos] if pos is not None and len(node.args) > pos else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(node.lineno)
            # metrics.DEAD / REJECTED .labels(stage_or_source, reason)
            if (name == "labels" and isinstance(f, ast.Attribute)
                    and isinstance(f.value, ast.Attribute)
                    and f.value.attr in ("DEAD", "REJECTED", "TRANSFORM_SKIPPED")
                    and any(_literal(a) for a in node.args[-1:])):
                found.append(node.lineno)
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "reason" for t in node.targets) \
                and _literal(node.value):
            found.append(node.lineno)
        elif isinstance(node, ast.Tuple) and len(node.elts) == 3 and _literal(node.elts[1]) \
                and isinstance(node.elts[0], ast.Name) and node.elts[0].id in ("e", "entry"):
            found.append(node.lineno)  # a (entry, reason, detail) dead item
    assert not found, f"{path.name}: reason as a string literal at lines {found}; use Reason"


def test_design_lists_the_vocabulary() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    section = design.split("## Reason codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (\w+) \|", section, re.M))
    assert rows == {r.value: r.kind.value for r in Reason}
