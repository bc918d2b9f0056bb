"""Every third-party module the package imports is a declared dependency of it (issue 19: psutil,
safetensors, pyarrow, nvidia-ml-py were imported but arrived only through other packages; an unused
prometheus-client was declared). Reads pyproject.toml and the installed distributions; installs nothing."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "mobile_vla"
# modules of distributions not installed in a CPU environment: module -> the distributions that provide it
NOT_INSTALLED_HERE = {
    "pynvml": ["nvidia-ml-py"],
    "tensorrt": ["tensorrt", "tensorrt-cu13"],  # the gpu extra pins the CUDA 13 variant by name
    "onnxruntime": ["onnxruntime"],
}
# torch's own platform-specific runtime (torch requires it on Linux); imported only to order its loading
COMES_WITH = {"triton": "torch"}


def _name(requirement: str) -> str:
    """'ray[train,serve]==2.60.*' -> 'ray'; names compared the PEP 503 way."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def declared() -> tuple[set[str], set[str]]:
    """(names in [project.dependencies], names in the cpu/gpu extras)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {_name(r) for r in project["dependencies"]}, {_name(r) for e in ("cpu", "gpu") for r in extras[e]}


def imported_modules() -> dict[str, list[str]]:
    """Top-level names of every import in the package -> the files importing them (relative imports left out)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    dependencies, extras = declared()
    distributions = packages_distributions()
    missing = []
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in ("mobile_vla", "__future__"):
            continue
        if module in COMES_WITH:
            assert _name(COMES_WITH[module]) in dependencies
            continue
        names = {_name(d) for d in distributions.get(module, NOT_INSTALLED_HERE.get(module, [module]))}
        if not names & (dependencies | extras):
            missing.append(f"{module} ({', '.join(sorted(names))}; imported by {files[0]})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_no_declared_dependency_is_unused():
    """A [project.dependencies] entry provides a module the package imports (or is the named runtime of one)."""
    distributions = packages_distributions()
    provided = {_name(d) for module in imported_modules() for d in distributions.get(module, [module])}
    provided |= {_name(d) for names in NOT_INSTALLED_HERE.values() for d in names}
    # needed by what the package calls, never imported by it: torch.onnx's dynamo exporter runs on onnxscript;
    # torchvision is pinned with torch (open_clip imports it)
    used_without_import = {"onnxscript", "torchvision"}
    unused = sorted(declared()[0] - provided - used_without_import)
    assert not unused, f"declared in [project.dependencies] but never imported by the package: {unused}"
