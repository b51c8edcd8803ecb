"""The headless core stays headless: importing any of its modules loads no GUI toolkit."""

import pkgutil
import subprocess
import sys

import napari_nucleae.core

GUI_MODULES = ("qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6")


def test_importing_every_core_module_loads_no_gui_toolkit():
    names = [
        f"napari_nucleae.core.{m.name}" for m in pkgutil.iter_modules(napari_nucleae.core.__path__)
    ]
    assert "napari_nucleae.core.training" in names and len(names) > 10
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
