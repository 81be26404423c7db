#!/usr/bin/env bash
# Installs the system packages free-roam builds against, if any is missing (Debian/Ubuntu).
# Usage: scripts/setup-system.sh [--services]   (--services also installs Redis and PostgreSQL)
set -euo pipefail

pkgs=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev
      libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev libturbojpeg0-dev ffmpeg)
if [[ "${1:-}" == "--services" ]]; then
  # Tests also validate deploy/ with kubernetes-validate and verify webhooks with the Standard
  # Webhooks reference library, both from PyPI into a venv; the dashboard's browser test drives
  # Debian's headless Chromium through chromedriver with selenium (PyPI, same venv).
  # RTSP tests run GStreamer's RTSP server (tests/rtsp_server.py) on Debian's python3.
  pkgs+=(redis-server postgresql postgresql-client python3-venv chromium chromium-driver
         python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
         gstreamer1.0-plugins-good gstreamer1.0-plugins-bad glib-networking openssl)
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

# Test tools from PyPI in target/tools-venv: the Kubernetes manifests' validator (no cluster
# needed), standardwebhooks (the specification's reference verifier for webhook tests),
# selenium (drives Chromium) and moto's S3-compatible server (the evidence bucket's tests).
if [[ "${1:-}" == "--services" ]]; then
  cd "$(dirname "$0")/.."
  venv=target/tools-venv
  if [[ ! -x $venv/bin/kubernetes-validate ]] || ! "$venv/bin/python" -c 'import standardwebhooks, selenium, moto.server' 2>/dev/null; then
    echo "installing kubernetes-validate, standardwebhooks, selenium and moto into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0 standardwebhooks==1.1.0 selenium==4.51.0 \
      'moto[server]==5.2.5' >&2
  fi
fi
