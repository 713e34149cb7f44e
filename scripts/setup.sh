#!/usr/bin/env bash
# Sets up everything robodistill needs, from nothing, and does nothing when it is already done:
#   1. a Vulkan device for SAPIEN: on a machine without an NVIDIA GPU, Mesa's CPU driver lavapipe
#      (>= 24.3, the first with VK_KHR_external_semaphore_fd) and libvulkan1;
#   2. a virtual environment (.venv) with torch: CUDA build where nvidia-smi sees a GPU, else the
#      CPU wheel torch==2.13.0;
#   3. robodistill itself, editable, with its test extras.
# Usage: scripts/setup.sh        (VENV=path PYTHON=python3.11 to override)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
CPU_TORCH="torch==2.13.0"

say() { printf '[setup] %s\n' "$*"; }
have_nvidia() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else say "need root for: $*  (run it as root, then rerun make)"; exit 1
  fi
}

lavapipe_ok() {
  local ver
  ver=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
  [ -n "$ver" ] && dpkg --compare-versions "$ver" ge 24.3 \
    && dpkg-query -W -f='${Status}' libvulkan1 2>/dev/null | grep -q "install ok installed"
}

debian_mirror() {
  # The mirror the machine already uses, so backports come from the same place and keyring.
  local uri
  uri=$(grep -hs -m1 '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

ensure_vulkan() {
  if have_nvidia; then say "NVIDIA GPU found: using its Vulkan driver"; return; fi
  if lavapipe_ok; then return; fi
  command -v apt-get >/dev/null 2>&1 || { say "no apt-get: install Mesa >= 24.3 (lavapipe) and the Vulkan loader by hand"; exit 1; }
  . /etc/os-release
  say "installing Mesa lavapipe (CPU Vulkan) for SAPIEN on ${PRETTY_NAME:-this machine}"
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # Debian 12 ships Mesa 22.3, too old for SAPIEN; bookworm-backports has Mesa 25.
    local src=/etc/apt/sources.list.d/bookworm-backports.sources
    if [ ! -f "$src" ]; then
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$(debian_mirror)" | as_root tee "$src" >/dev/null
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1
  else
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1
  fi
  lavapipe_ok || { say "Mesa lavapipe >= 24.3 is still missing after the install"; exit 1; }
}

quiet_pip() {
  # pip warns once per package about index locations some machines list but do not have.
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall only when what decides the install has changed.
  local stamp="$VENV/.robodistill-setup" want
  want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)$(have_nvidia && echo -cuda || true)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  local pip=(quiet_pip "$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if have_nvidia; then
    say "installing CUDA torch"
    "${pip[@]}" "torch>=2.3"
  else
    say "installing CPU torch ($CPU_TORCH)"
    "${pip[@]}" "$CPU_TORCH"
  fi
  say "installing robodistill and its dependencies"
  "${pip[@]}" -e ".[dev]"
  echo "$want" > "$stamp"
}

ensure_vulkan
ensure_venv
say "ready: $VENV"
