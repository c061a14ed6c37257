"""The declared minimum versions are the real ones: read from the installed torchao and the pyproject files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = [ROOT / "pyproject.toml", ROOT / "runtime" / "pyproject.toml"]
# setuptools reads `license = "SPDX expression"` (PEP 639) from 77.0.0 on; older ones reject the string.
SETUPTOOLS_SPDX_LICENSE = Version("77")
GPU_MACHINE_TORCH = Version("2.11.0")  # the benchmark GPU machines' torch (docs: DESIGN.md)


def _requirement(name: str, lines: list[str]) -> SpecifierSet:
    found = [Requirement(line) for line in lines if Requirement(line).name == name]
    assert len(found) == 1, f"expected one requirement on {name} in {lines}"
    return found[0].specifier


def _floor(spec: SpecifierSet) -> Version:
    floors = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    assert floors, f"{spec} declares no minimum"
    return max(floors)


def torchao_torch_floor() -> Version:
    """The torch version below which the installed torchao skips its C++ kernels (torchao/__init__.py)."""
    source = Path(importlib.util.find_spec("torchao").origin).read_text(encoding="utf-8")
    match = re.search(r'min_torch_version\s*=\s*_parse_version\("([0-9.]+)"\)', source)
    assert match, "torchao/__init__.py no longer states min_torch_version: find where it moved and read it there"
    return Version(match.group(1))


def test_runtime_torch_floor_is_torchaos_own():
    runtime = tomllib.loads(PYPROJECTS[1].read_text())["project"]["dependencies"]
    torch_spec = _requirement("torch", runtime)
    assert _floor(torch_spec) >= torchao_torch_floor(), (
        f"runtime/pyproject.toml allows torch {torch_spec}, but torchao "
        f"{importlib.metadata.version('torchao')} needs torch >= {torchao_torch_floor()} for its kernels")
    installed_torch = Version(importlib.metadata.version("torch").split("+")[0])
    assert torch_spec.contains(GPU_MACHINE_TORCH) and torch_spec.contains(installed_torch)
    assert _requirement("torchao", runtime).contains(importlib.metadata.version("torchao"))


def test_setuptools_floor_reads_the_spdx_license_field():
    for path in PYPROJECTS:
        data = tomllib.loads(path.read_text())
        assert isinstance(data["project"]["license"], str)  # the PEP 639 form
        spec = _requirement("setuptools", data["build-system"]["requires"])
        assert _floor(spec) >= SETUPTOOLS_SPDX_LICENSE, f"{path.relative_to(ROOT)}: setuptools {spec}"
