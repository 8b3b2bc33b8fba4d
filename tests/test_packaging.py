"""The wheel is self-contained: ``pip install .`` gives a ``blynk-bridge`` that knows its version
and runs ``blynk-bridge demo`` from any directory (its configurations are package data)."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built by the locked setuptools of this environment."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (built,) = out.glob("blynk_bridge-*.whl")
    return built


def test_wheel_holds_the_examples_and_the_command(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"blynk_bridge/examples/bridge.yaml",
            "blynk_bridge/examples/blynk-emulator.yaml"} <= names
    # The status page's files ship in the package (no CDN).
    assert {"pipeline/static/status.html", "pipeline/static/status.js",
            "pipeline/static/status.css"} <= names
    dist_info = f"blynk_bridge-{VERSION}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "blynk-bridge = blynk_bridge.cli:main" in entry_points


def test_version_comes_from_the_package_metadata() -> None:
    proc = subprocess.run([sys.executable, "-m", "blynk_bridge", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"blynk-bridge {VERSION}"


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv with only the wheel installed (its dependencies, the locked ones, are
    borrowed from this environment's site-packages): the demo runs from an empty directory."""
    env_dir = tmp_path / "venv"
    # No pip of its own (ensurepip was most of this test's time): this environment's pip
    # installs into it (``--python``).
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / "bin"
    site = subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # A plain path line: this environment's editable hook (a .pth that imports) is not run.
    Path(site, "locked-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q",
                    "--no-deps", "--no-index", wheel], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = subprocess.run(
        [bin_dir / "python", "-c", "import blynk_bridge; print(blynk_bridge.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, check=True, timeout=60)
    assert where.stdout.strip().startswith(site), "the installed copy, not the repo's"
    version = subprocess.run([bin_dir / "blynk-bridge", "--version"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"blynk-bridge {VERSION}"

    demo = subprocess.run(
        [bin_dir / "blynk-bridge", "--log-level", "WARNING", "demo", "--duration", "2",
         "--devices", "3", "--rate", "10", "--particle-devices", "2", "--particle-rate", "4"],
        cwd=elsewhere, capture_output=True, text=True, timeout=180,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert re.search(r"sent \d+ \(TTS \d+, Particle \d+\)", " ".join(demo.stdout.split()))


def test_image_installs_the_hash_checked_locks() -> None:
    """The Dockerfile installs what the locks pin, and everything it copies is in the context."""
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install --require-hashes -r (\S+)", text)
    assert [Path(p).name for p in installs] == ["build.lock", "runtime.lock"]
    assert "--no-build-isolation" in text  # the locked setuptools builds the wheel
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored and source.split("/")[0] not in ignored
