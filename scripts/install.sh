#!/usr/bin/env bash
# Install napari-nucleae into ./.venv with the CPU build of torch, plus the system packages
# that the headless viewer tests need (Xvfb and the xcb libraries Qt 6 loads; installed when root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v Xvfb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 >/dev/null
  else
    echo "note: install xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0" \
         "to run the viewer tests headless" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch and cellpose are pinned here (not for users): see requirements/constraints.txt.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  -c requirements/constraints.txt "torch==2.13.0" -e ".[testing,tsne,docs]" \
  2> >(grep -v "is ignored" >&2)
# The Qt binding is PyQt6 (napari deprecates PyQt5); qtpy still prefers a PyQt5 left in an
# older venv.
if .venv/bin/python -c "import PyQt5" 2>/dev/null; then
  echo "note: PyQt5 is still installed in .venv and qtpy prefers it; set QT_API=pyqt6" \
       "or run: .venv/bin/pip uninstall -y PyQt5 PyQt5-Qt5 PyQt5_sip" >&2
fi
echo "installed napari-nucleae into $(pwd)/.venv"
