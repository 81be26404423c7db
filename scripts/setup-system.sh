#!/usr/bin/env bash
# Installs the system packages free-roam builds against, if any is missing (Debian/Ubuntu).
# Usage: scripts/setup-system.sh [--services]   (--services also installs Redis and PostgreSQL)
set -euo pipefail

pkgs=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev
      libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev libturbojpeg0-dev ffmpeg)
if [[ "${1:-}" == "--services" ]]; then
  pkgs+=(redis-server postgresql postgresql-client)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
