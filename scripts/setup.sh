#!/usr/bin/env bash
# Install everything twincd needs on a fresh Debian-based machine: apt packages and the venv.
# Idempotent and quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(git podman runc busybox-static docker-registry bind9 bind9-utils chromium postgresql)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v kubectl >/dev/null; then
  # kubectl (with its built-in kustomize) renders overlays; Debian has no package for it.
  echo "setup: kubectl is missing: install it from https://kubernetes.io/docs/tasks/tools/ (v1.27 or newer)" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# Reinstall only when the dependency list changed.
stamp=.venv/.twincd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv (about 2 minutes on a fresh machine)"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  .venv/bin/pip check
  touch "$stamp"
fi
