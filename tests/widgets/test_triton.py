"""triton is hidden once Mesa's LLVM is loaded (importing it then segfaults napari) and imported
at once before that. A stand-in ``triton`` package plays the real one; with
``NUCLEAE_CUDA_PYTHON`` (a Python whose torch is a CUDA build, with triton) the real crash is
reproduced and avoided under this test session's Xvfb."""

import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from napari_nucleae import _triton
from napari_nucleae._triton import guard_triton, mesa_llvm_loaded

MESA = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
PLAIN = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
SRC = Path(_triton.__file__).parents[1]


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    """An importable stand-in ``triton``, not imported yet."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("STAND_IN = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    importlib.invalidate_caches()
    yield
    sys.modules.pop("triton", None)


def _maps(tmp_path, text: str) -> Path:
    path = tmp_path / "maps"
    path.write_text(text)
    return path


def test_triton_is_hidden_once_mesa_llvm_is_loaded(fake_triton, tmp_path):
    maps = _maps(tmp_path, PLAIN + MESA)
    assert mesa_llvm_loaded(maps)
    with pytest.warns(RuntimeWarning, match="software renderer"):
        assert guard_triton(maps) == "hidden"
    assert importlib.util.find_spec("triton") is None  # torch sees no triton
    with pytest.raises(ImportError):
        importlib.import_module("triton")
    assert guard_triton(maps) == "hidden"  # once


def test_triton_is_imported_before_mesa_llvm_is_loaded(fake_triton, tmp_path):
    maps = _maps(tmp_path, PLAIN)
    assert not mesa_llvm_loaded(maps)
    assert guard_triton(maps) == "imported"
    assert sys.modules["triton"].STAND_IN
    assert guard_triton(_maps(tmp_path, MESA)) == "present"  # imported in time: kept


def test_nothing_to_guard_without_triton(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(_triton.importlib.util, "find_spec", lambda name: None)
    assert guard_triton(_maps(tmp_path, MESA)) == "absent"
    assert "triton" not in sys.modules


CRASH = """
import sys
sys.path.insert(0, {src!r})
sys.path.append({site!r})  # the CUDA torch first, napari (from this venv) after it
import napari
viewer = napari.Viewer(show=False)
if {guard}:
    from napari_nucleae._triton import guard_triton
    print("guard:", guard_triton(), flush=True)
import torch
import torch._inductor.runtime.triton_compat  # what torch.compile's GPU path imports
print("alive", torch.version.cuda, flush=True)
"""


@pytest.mark.skipif(
    not os.environ.get("NUCLEAE_CUDA_PYTHON"), reason="set NUCLEAE_CUDA_PYTHON to a CUDA torch"
)
@pytest.mark.parametrize("guard", [False, True])
def test_cuda_torch_survives_the_viewer_with_the_guard(make_napari_viewer, guard):
    make_napari_viewer()  # Xvfb is up for this session
    if not mesa_llvm_loaded():
        pytest.skip("OpenGL here is not Mesa's llvmpipe")
    site = sysconfig.get_paths()["purelib"]
    script = textwrap.dedent(CRASH.format(site=site, src=str(SRC), guard=guard))
    run = subprocess.run(
        [os.environ["NUCLEAE_CUDA_PYTHON"], "-c", script], capture_output=True, text=True
    )
    if guard:
        assert run.returncode == 0 and "guard: hidden" in run.stdout and "alive" in run.stdout
    else:
        assert run.returncode == -11, run.stdout + run.stderr[-2000:]  # the crash it prevents
