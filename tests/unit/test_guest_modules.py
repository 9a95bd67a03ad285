"""The guest agent's modules: what it imports is exactly :data:`podshim.guest.MODULES` plus the
standard library, in the layout the guest really has (an empty ``podshim`` package with the
export at ``podshim/guest``, as in the guest layer), on a python with no site-packages."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from podshim import guest

# /init runs the agent with the host's system python, not our venv's.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

PROBE = """
import json, sys
import podshim.guest.agent
from podshim.guest import reaper as guest_reaper
from podshim.system import children
ours = sorted(m for m in sys.modules if m == "podshim" or m.startswith("podshim."))
std = set(sys.stdlib_module_names) | {"__main__"}
other = sorted({m.split(".")[0] for m in sys.modules} - std - {"podshim"})
print(json.dumps({"ours": ours, "other": other, "shared": issubclass(guest_reaper.Reaper, children.Reaper),
                  "system": sys.modules["podshim.system.children"].__file__}))
"""


def _write(dest: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)


def _guest_tree(tmp_path: Path) -> Path:
    """What the guest layer holds: <root>/podshim/__init__.py empty, the export mounted at podshim/guest."""
    root = tmp_path / "agent"
    (root / "podshim").mkdir(parents=True)
    (root / "podshim" / "__init__.py").write_text("")
    _write(root / "podshim" / "guest", guest.export_files())
    return root


def test_the_agent_imports_only_its_listed_modules_and_the_standard_library(tmp_path: Path) -> None:
    root = _guest_tree(tmp_path)
    res = subprocess.run(
        [PYTHON, "-S", "-I", "-c", f"import sys; sys.path.insert(0, {str(root)!r}); {PROBE}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["other"] == [], "the guest has no site-packages"
    assert set(seen["ours"]) == {"podshim", *guest.MODULES}
    assert seen["shared"]
    assert seen["system"].startswith(str(root / "podshim" / "guest" / guest.SHARED_DIR))


def test_the_shared_modules_import_nothing_but_the_standard_library() -> None:
    """Each ``podshim.system`` module the guest uses, imported alone from the source tree."""
    repo = Path(__file__).resolve().parents[2]
    for module in (m for m in guest.MODULES if m.startswith("podshim.system.")):
        code = (
            f"import sys; sys.path.insert(0, {str(repo)!r}); import {module}; "
            "std = set(sys.stdlib_module_names) | {'__main__'}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - std))"
        )
        res = subprocess.run([PYTHON, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "['podshim']", (module, res.stdout)


def test_the_export_holds_the_listed_modules_and_their_bytecode(tmp_path: Path) -> None:
    dest = tmp_path / "export"
    _write(dest, guest.export_files())
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.py") if p.is_file())
    assert len(files) == len(guest.MODULES)
    assert len(list(dest.rglob("__pycache__/*.pyc"))) == len(guest.MODULES)
    assert "agent.py" in files and f"{guest.SHARED_DIR}/children.py" in files
    shutil.rmtree(dest)


def test_the_guest_layer_key_covers_every_module_the_agent_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to a shared module (not only to the guest package) must make the shim ask for a
    new guest layer: the VM would otherwise run an agent older than its host side."""
    from podshim.vm import layer as vmlayer

    before = vmlayer.agent_hash()
    changed = tmp_path / "children.py"
    changed.write_text(Path(guest.source_file("podshim.system.children")).read_text() + "# changed\n")
    real = guest.source_file
    monkeypatch.setattr(
        guest, "source_file", lambda m: str(changed) if m == "podshim.system.children" else real(m)
    )
    assert vmlayer.agent_hash() != before


def test_the_guest_loads_the_staged_bytecode_and_compiles_nothing(tmp_path: Path) -> None:
    """The guest's tree is read-only and it writes no bytecode: without the staged pycs it would
    compile every module at every boot (slow under TCG)."""
    root = _guest_tree(tmp_path)
    res = subprocess.run(
        [
            PYTHON,
            "-S",
            "-I",
            "-B",
            "-v",
            "-c",
            f"import sys; sys.path.insert(0, {str(root)!r}); import podshim.guest.agent",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    loaded = [
        ln for ln in res.stderr.splitlines() if "code object from" in ln and ".pyc" in ln and str(root) in ln
    ]
    magic = subprocess.run(
        [PYTHON, "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if magic != importlib.util.MAGIC_NUMBER.hex():
        assert loaded == []  # another python version: it ignores our bytecode, as it must
        return
    assert len(loaded) == len(guest.MODULES), res.stderr[-2000:]
