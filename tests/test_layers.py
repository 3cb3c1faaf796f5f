"""Layers call downward only (DEVELOPERS.md): uapi -> kvm / model -> guest -> vmm -> workloads,
bench -> cli and the drop-in. Checked on the imports each module really makes (its AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "guestmem"

# package (a directory under guestmem/) -> packages it must never import
FORBIDDEN = {
    "kvm": {"model", "vmm", "workloads", "bench", "devkvm", "cli"},
    "model": {"kvm", "vmm", "workloads", "bench", "devkvm", "cli"},
    "vmm": {"workloads", "bench", "devkvm", "cli"},
    "workloads": {"bench", "devkvm", "cli"},
    "devkvm": {"kvm", "vmm", "workloads", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    """The guestmem sub-packages the module at ``path`` imports."""
    return imported_packages_of_source(path.read_text(), str(path.relative_to(PACKAGE)))


def imported_packages_of_source(source: str, relpath: str) -> set[str]:
    """The guestmem sub-packages ``source`` imports, as the module guestmem/``relpath``
    (absolute imports, and relative ones resolved against its package)."""
    rel = Path(relpath).parts
    out = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]
                target = ".".join(["guestmem", *base, *([node.module] if node.module else [])])
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "guestmem" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    bad = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        wrong = imported_packages(path) & FORBIDDEN[package]
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert not bad, f"upward imports: {bad}"


def test_the_checker_sees_relative_imports():
    # job.py once imported the bundled workloads (a layer above it): the rule must catch that shape.
    assert "workloads" in imported_packages_of_source("from .. import workloads\n", "vmm/job.py")
    assert "workloads" not in imported_packages(PACKAGE / "vmm" / "job.py")



def test_one_libc_loader():
    """The C library is loaded once, in hostmem (``hostmem.libc``, every prototype declared
    there); a module that loads it again, or any library through the global scope
    (``CDLL(None)`` resolves symbols a preloaded library interposes), is named here."""
    loaders = ("CDLL", "PyDLL", "LoadLibrary", "find_library")
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if name in loaders and rel != "hostmem.py":
                bad.setdefault(rel, []).append(node.lineno)
    assert not bad, f"libc loaded outside hostmem: {bad}"
