"""The shape of the package, checked: import contracts, a light client, small rooms.

The contracts themselves live in pyproject.toml (import-linter); these tests run them and
add what a contract cannot say: what a program actually loads, and how big a room may grow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xenemu"
#: No module over about 500 lines, no class over about 300 (issue 16's "small rooms").
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def loaded_by(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(run.stdout.split())


@pytest.mark.parametrize("module", ["xenemu.client", "xenemu.wire", "xenemu.abi.pv_iommu", "xenemu.abi.its_cmd"])
def test_a_client_does_not_carry_the_hypervisor(module: str) -> None:
    loaded = loaded_by(f"import {module}")
    assert not {m for m in loaded if m.startswith(("xenemu.core", "xenemu.server"))}


def test_the_abi_loads_nothing_of_xenemu_but_itself() -> None:
    loaded = loaded_by("import xenemu.abi.errno, xenemu.abi.grant_table, xenemu.abi.ioreq, xenemu.abi.its_cmd")
    ours = {m for m in loaded if m.startswith("xenemu")}
    assert ours <= {"xenemu"} | {m for m in ours if m.startswith("xenemu.abi")}
    assert "trio" not in loaded and "msgpack" not in loaded


def test_the_core_loads_no_shell() -> None:
    loaded = loaded_by("import xenemu.core.actions.dispatch")
    assert not {m for m in loaded if m.split(".")[0] in ("trio", "msgpack", "structlog", "click", "rich")}
    assert not {m for m in loaded if m.startswith(("xenemu.server", "xenemu.wire", "xenemu.client", "xenemu.cli"))}


def test_guest_programs_use_only_the_client_and_the_abi() -> None:
    """clients/ stands for other people's programs: they reach xenemu through its library."""
    for path in sorted((ROOT / "clients").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                assert not name.startswith(("xenemu.core", "xenemu.server")), f"{path.name} imports {name}"


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_fast_iommu" not in p.name)


def test_small_rooms() -> None:
    big = []
    for path in modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    big.append(f"{path.relative_to(ROOT)}: class {node.name} is {size} lines")
    assert not big, big


def test_every_package_says_what_it_owns() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80 and "TODO" not in doc, f"{init.relative_to(ROOT)} has no real docstring"


def test_a_toolstack_verb_does_not_load_the_server_or_the_hypervisor() -> None:
    """``xenemu list`` and friends import the client when they run; ``serve`` and ``demo`` load
    the rest. Importing the CLI (all that ``xenemu --help`` does) loads neither the client nor
    trio, rich, structlog or the bench; tests/cli/test_output.py checks each verb as it runs."""
    loaded = loaded_by("import xenemu.cli")
    assert {m for m in loaded if m.startswith("xenemu.core")} <= {"xenemu.core", "xenemu.core.options"}
    assert {m for m in loaded if m.startswith("xenemu.server")} <= {"xenemu.server", "xenemu.server.limits"}
    assert not {m for m in loaded if m.split(".")[0] in ("trio", "rich", "structlog", "msgpack")}
    assert not {m for m in loaded if m.startswith(("xenemu.client", "xenemu.bench", "xenemu.logs", "xenemu.wire"))}


def test_the_cli_is_a_package_of_verb_families() -> None:
    """No verb family grows into the one big module the CLI once was: each module of
    ``xenemu/cli`` stays well under the cap, and ``xenemu.cli:main`` stays the entry point."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        assert path.read_text().count("\n") <= 300, path.name
    assert 'xenemu = "xenemu.cli:main"' in (ROOT / "pyproject.toml").read_text()
