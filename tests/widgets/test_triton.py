"""triton is refused while Mesa's LLVM is loaded (importing it then segfaults napari), and
imported normally otherwise. A stand-in ``triton`` package takes the real one's place."""

import importlib
import sys

import pytest

from napari_nucleae.widgets import _triton
from napari_nucleae.widgets._triton import TritonGuard, guard_triton, mesa_llvm_loaded

MESA = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
PLAIN = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    """An importable stand-in ``triton``; no guard installed yet."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("STAND_IN = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, TritonGuard)]
    )
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    importlib.invalidate_caches()
    yield
    sys.modules.pop("triton", None)


def test_triton_is_refused_while_mesa_llvm_is_loaded(fake_triton, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(PLAIN + MESA)
    assert mesa_llvm_loaded(maps)
    guard = guard_triton(maps)
    assert guard is not None and guard_triton(maps) is guard  # installed once
    with (
        pytest.warns(RuntimeWarning, match="software renderer"),
        pytest.raises(ImportError, match="llvmpipe"),
    ):
        importlib.import_module("triton")
    assert "triton" not in sys.modules


def test_triton_imports_without_mesa_llvm(fake_triton, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(PLAIN)
    assert guard_triton(maps) is not None and not mesa_llvm_loaded(maps)
    assert importlib.import_module("triton").STAND_IN


def test_no_guard_without_triton(monkeypatch):
    monkeypatch.setattr(
        sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, TritonGuard)]
    )
    monkeypatch.setattr(_triton.importlib.util, "find_spec", lambda name: None)
    assert guard_triton() is None
