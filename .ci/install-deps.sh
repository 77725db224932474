#!/usr/bin/env bash
# Installs the Debian packages attnkit's build, tests and benches need, skipping those present.
# Usage: .ci/install-deps.sh [extra-package ...]
set -euo pipefail
pkgs=(cmake make g++ clang libomp-dev libclang-rt-14-dev libeigen3-dev libxsimd-dev catch2 libbenchmark-dev
      libfftw3-dev python3 python3-matplotlib "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
