#!/usr/bin/env bash
# Install napari-nucleae into ./.venv with the CPU build of torch, plus the system packages
# that the headless viewer tests need (Xvfb and three xcb libraries; installed when root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v Xvfb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 >/dev/null
  else
    echo "note: install xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 to run the" \
         "viewer tests headless" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch and cellpose are pinned here (not for users): see requirements/constraints.txt.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  -c requirements/constraints.txt "torch==2.13.0" -e ".[testing,tsne,docs]" \
  2> >(grep -v "is ignored" >&2)
echo "installed napari-nucleae into $(pwd)/.venv"
