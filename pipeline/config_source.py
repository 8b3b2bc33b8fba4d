"""Reading a configuration file's text into plain data, remembering where each key is.

:func:`read` composes YAML with ``yaml.SafeLoader`` into its node tree, walks it once to record
the line and column of every mapping key and list item and to refuse a key written twice in
one mapping (naming both lines: PyYAML would keep the last one silently; on the node tree the
key's whole path is known), then constructs the data from that same tree. TOML goes through
``tomllib``, which refuses duplicates itself and keeps no positions. A file with nothing in it
(or only comments) is an error, and so is a top level that is not a mapping. Every error is a
:class:`ConfigError` whose problems carry their position.

Positions are looked up by key path, a tuple such as ``("tts", 0, "port")``;
:func:`split_path` reads the text forms msgspec and :mod:`pipeline.config` write
(``$.tts[0].port``, ``tts[0].port``). :meth:`Source.locate` gives a :class:`ConfigError`'s
problems the position of their key, or of the nearest enclosing key the file holds (a missing
key, a default), so an error about anything written in the file names its line.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, ConfigProblem

KeyPath = tuple[str | int, ...]

_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Position:
    """Where a key starts in the file; both count from 1."""

    line: int
    column: int

    @classmethod
    def of(cls, mark: yaml.Mark) -> Position:
        return cls(mark.line + 1, mark.column + 1)


@dataclass
class Source:
    """A parsed file: its data and where each key path starts (empty for TOML)."""

    origin: str
    data: dict[str, Any]
    positions: dict[KeyPath, Position] = field(default_factory=dict)

    def position(self, path: KeyPath) -> Position | None:
        """Where ``path`` is written; for a key the file does not hold, where its nearest
        enclosing key is (None: not even the first key is in the file). ``<key>_file`` stands
        for ``<key>`` (it was read into it)."""
        for end in range(len(path), 0, -1):
            head = path[:end]
            found = self.positions.get(head)
            last = head[-1]
            if found is None and isinstance(last, str):
                found = self.positions.get((*head[:-1], f"{last}_file"))
            if found is not None:
                return found
        return None

    def locate(self, exc: ConfigError) -> ConfigError:
        """``exc`` with the position of each problem's key filled in."""
        if not exc.problems:
            return exc
        problems = []
        for p in exc.problems:
            pos = self.position(split_path(p.key)) if p.key and p.line is None else None
            problems.append(dataclasses.replace(p, line=pos.line, column=pos.column)
                            if pos else p)
        return ConfigError.of(self.origin, *problems)


_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]|\[\.\.\.\]")


def split_path(text: str) -> KeyPath:
    """``$.tts[0].port`` or ``tts[0].port`` → ``("tts", 0, "port")``. A step that names no key
    (msgspec's ``[...]`` for a dict key) ends the path: what precedes it is still found."""
    text = text.removeprefix("$")
    out: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None or m.group(0) == "[...]":
            break
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return tuple(out)


def format_path(path: KeyPath) -> str:
    """The inverse of :func:`split_path` (without ``$.``): ``tts[0].port``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def read(text: str, fmt: Literal["yaml", "toml"], origin: str) -> Source:
    """Parse ``text``; raises :class:`ConfigError` (with positions where known)."""
    if fmt == "toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError.of(origin, ConfigProblem(f"not valid TOML: {exc}")) from None
        source = Source(origin, data)
    else:
        source = _read_yaml(text, origin)
    if not source.data:
        raise ConfigError.of(origin, ConfigProblem(
            "the file holds no settings (it is empty or only comments); "
            "`blynk-bridge config default` prints a starting file"))
    return source


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose constructors' plain ``ValueError``s (``2001-13-45`` read as a
    date, ``!!int x``) become errors at the value's position. PyYAML's own text is dropped: it
    may repeat the value (``invalid literal for int(): '<secret>'``)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError):
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {kind} value", node.start_mark) from None


def _read_yaml(text: str, origin: str) -> Source:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        positions: dict[KeyPath, Position] = {}
        if node is not None:
            _record(node, (), positions, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError.of(origin, _yaml_problem(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError.of(origin, ConfigProblem(f"not valid YAML: {exc}")) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.of(origin, ConfigProblem(
            f"the top level must be a mapping of sections (`redis:`, `blynk:`…), "
            f"not a {type(data).__name__}", line=1, column=1))
    return Source(origin, data, positions)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    if isinstance(exc, _DuplicateKey):
        return ConfigProblem(exc.problem or "duplicate key", key=exc.key,
                             line=mark.line + 1 if mark else None,
                             column=mark.column + 1 if mark else None)
    what = "; ".join(str(s) for s in (exc.context, exc.problem) if s)
    return ConfigProblem(f"not valid YAML: {what}", line=mark.line + 1 if mark else None,
                         column=mark.column + 1 if mark else None)


def _record(node: yaml.Node, path: KeyPath, out: dict[KeyPath, Position],
            seen: set[int]) -> None:
    """Record the position of every key and list item under ``node``; refuse a key written
    twice in one mapping (keys brought in by a merge, ``<<: *defaults``, may be overridden:
    that is what merges are for). An aliased node is walked once, so anchors cannot make this
    walk grow past the file's own size."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            here = (*path, key_node.value)
            earlier = first.setdefault((key_node.tag, key_node.value), key_node)
            if earlier is not key_node:
                raise _DuplicateKey(format_path(here), earlier.start_mark, key_node.start_mark)
            out.setdefault(here, Position.of(key_node.start_mark))
            _record(value_node, here, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            here = (*path, i)
            out.setdefault(here, Position.of(item.start_mark))
            _record(item, here, out, seen)


class _DuplicateKey(yaml.MarkedYAMLError):
    def __init__(self, key: str, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(
            problem=f"duplicate key `{key}` (first at line {first.line + 1}, column "
                    f"{first.column + 1}); a mapping holds each key once",
            problem_mark=again)
        self.key = key
