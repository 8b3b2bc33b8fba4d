"""docs/DESIGN.md's "Where things live" table stays true: every path it names exists, and every
module under ``pipeline/``, ``workers/`` and ``blynk_bridge/`` is named in it (a new module gets
a home in the table, a moved one is not left behind)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "workers", "blynk_bridge")


def _homes() -> list[str]:
    """The 'home' cells of the table (its second column)."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line)]
    cells = [row.strip("|").split(" | ", 1) for row in rows[1:]]  # past the header
    return [cell[1] for cell in cells if len(cell) == 2]


def named_paths() -> set[str]:
    """Paths the table names. Within one cell a short name continues the path before it:
    ``pipeline/blynk/http.py``, ``client.py`` is ``pipeline/blynk/client.py``, and after a
    folder (``workers/egress/``) a bare module name (``queue``) is ``workers/egress/queue.py``.
    Code that is not a path (``blynk-bridge dead``, settings names) is skipped."""
    found: set[str] = set()
    for cell in _homes():
        folder: str | None = None  # the folder short names in this cell are relative to
        named_folder = False  # bare module names only after a folder itself was named
        for token in re.findall(r"`([^`]+)`", cell):
            if " " in token:
                continue
            if "/" in token:
                found.add(token)
                named_folder = token.endswith("/")
                folder = token if named_folder else token.rsplit("/", 1)[0] + "/"
            elif folder is not None and token.endswith(".py"):
                found.add(folder + token)
            elif folder is not None and named_folder and token.isidentifier() and token.islower():
                found.add(f"{folder}{token}.py")
    return found


def test_every_path_in_the_table_exists() -> None:
    missing = sorted(p for p in named_paths() if not (ROOT / p).exists())
    assert not missing, f"docs/DESIGN.md names paths that do not exist: {missing}"


def test_every_module_has_a_home_in_the_table() -> None:
    named = named_paths()
    modules = sorted(
        str(path.relative_to(ROOT)) for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
        if path.name != "__init__.py")
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"modules missing from docs/DESIGN.md's 'Where things live': {unnamed}"


def test_the_table_is_read() -> None:
    """The parser above sees the table (a renamed heading would make both tests vacuous)."""
    named = named_paths()
    assert {"pipeline/events.py", "pipeline/blynk/client.py", "workers/egress/queue.py",
            "workers/transform/stage.py", "blynk_bridge/cli.py"} <= named


def test_help_lists_every_command_with_a_line_and_the_readme_every_stage() -> None:
    """``blynk-bridge --help`` is where a new user looks; README's stage table is the map."""
    import argparse

    from blynk_bridge.cli import STAGES, build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help for c in commands._choices_actions}
    assert set(helps) == set(commands.choices)
    assert all(helps.values()), [name for name, text in helps.items() if not text]
    assert set(STAGES) <= set(helps)
    readme = (ROOT / "README.md").read_text()
    for stage in STAGES:
        assert f"\n| `{stage}` |" in readme, f"README's stage table has no row for {stage}"
