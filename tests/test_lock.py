"""The locks in ``requirements/`` agree with ``pyproject.toml`` (``make lock`` regenerates them).

Each requirement of pyproject (runtime, the ``dev`` extra, the build backend) must be pinned in
the lock that installs it, at a version its specifier allows, with hashes; the runtime pins must
be the same in ``dev.lock`` so tests run on what the image ships.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: ``name==version [; marker] \`` at the start of a line (hash lines are indented).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def parse_lock(path: Path) -> dict[str, tuple[Version, int]]:
    """Canonical name → (pinned version, number of hashes) of a ``uv pip compile`` lock."""
    pins: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = canonicalize_name(match[1])
            pins[current] = (Version(match[2]), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif not line.startswith(" "):
            current = None
    return pins


def problems(requirements: list[str], lock: dict[str, tuple[Version, int]]) -> list[str]:
    """Why ``lock`` does not satisfy ``requirements`` (empty when it does)."""
    out = []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in lock:
            out.append(f"{text!r}: {req.name} is not in the lock")
            continue
        version, hashes = lock[name]
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{text!r}: the lock pins {version}")
        if hashes == 0:
            out.append(f"{text!r}: {req.name}=={version} has no hash")
    return out


def build_requires() -> list[str]:
    return list(PYPROJECT["build-system"]["requires"])


def runtime() -> list[str]:
    return list(PYPROJECT["project"]["dependencies"])


def dev() -> list[str]:
    return list(PYPROJECT["project"]["optional-dependencies"]["dev"])


@pytest.mark.parametrize(("lock", "requirements"), [
    ("runtime.lock", runtime),
    ("dev.lock", lambda: runtime() + dev() + build_requires()),
    ("build.lock", build_requires),
])
def test_every_requirement_is_pinned_in_its_lock(lock: str, requirements: object) -> None:
    assert callable(requirements)
    assert problems(requirements(), parse_lock(LOCKS / lock)) == [], "run `make lock`"


def test_every_pin_has_hashes() -> None:
    for lock in ("runtime.lock", "dev.lock", "build.lock"):
        unhashed = [n for n, (_, hashes) in parse_lock(LOCKS / lock).items() if hashes == 0]
        assert unhashed == [], f"{lock}: pins without hashes"


def test_dev_lock_pins_the_runtime_versions() -> None:
    runtime_pins = parse_lock(LOCKS / "runtime.lock")
    dev_pins = parse_lock(LOCKS / "dev.lock")
    differ = {n: (v, dev_pins.get(n, (None, 0))[0]) for n, (v, _) in runtime_pins.items()
              if dev_pins.get(n, (None, 0))[0] != v}
    assert differ == {}, "runtime.lock and dev.lock disagree: run `make lock`"


def test_build_requires_matches_build_in() -> None:
    """requirements/build.in is the input of the build lock: it says what pyproject says."""
    lines = (LOCKS / "build.in").read_text().splitlines()
    declared = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert sorted(map(str, map(Requirement, declared))) == sorted(
        map(str, map(Requirement, build_requires())))


def test_a_stale_lock_is_caught() -> None:
    """The check can fail: a pin outside the specifier and a missing package are named."""
    lock = {"msgspec": (Version("0.18.6"), 2)}
    assert problems(["msgspec>=0.23,<0.24", "httptools>=0.6"], lock) == [
        "'msgspec>=0.23,<0.24': the lock pins 0.18.6",
        "'httptools>=0.6': httptools is not in the lock",
    ]
