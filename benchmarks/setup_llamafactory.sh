#!/usr/bin/env bash
# Creates the virtual environment that benchmarks/throughput.py runs LLaMA-Factory in (apart from sftlab's, so
# neither library's pins constrain the other). Idempotent: an environment that already imports llamafactory is kept.
#
#   benchmarks/setup_llamafactory.sh [VENV_DIR]      # default benchmarks/.venv-llamafactory (gitignored)
#
# torch is installed first and pinned to the CPU build sftlab's environment uses: an unpinned torch would pull
# the multi-GB CUDA build as a dependency of llamafactory. Takes ~3 minutes and ~2.2 GB.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.venv-llamafactory}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLAMAFACTORY_VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"

if [ -x "$VENV/bin/llamafactory-cli" ] && "$VENV/bin/python" -c "import llamafactory.train.tuner" 2>/dev/null; then
    echo "[setup_llamafactory] $VENV ready ($("$VENV/bin/python" -c 'import llamafactory; print(llamafactory.__version__)'))"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "llamafactory==$LLAMAFACTORY_VERSION" "torch==$TORCH_VERSION"
# llamafactory requires torchvision and torchaudio. PyPI has them only as builds against PyPI's CUDA torch; under
# the local CPU torch their compiled ops fail to load (torchvision: "operator torchvision::nms does not exist",
# which breaks transformers' imports; torchaudio: "libc10_cuda.so: cannot open shared object file"), and PyPI has
# no torchaudio for torch 2.13 at all (newest: 2.11.1). Text SFT uses neither: torchvision is removed (transformers
# treats it as optional), and torchaudio, which llamafactory imports at module level for audio data, is kept
# without its compiled extension, a layout torchaudio itself supports (its ops then raise only when used).
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE"/torchaudio/lib/*.so
"$VENV/bin/python" -c "import torch, llamafactory.train.tuner as _, llamafactory; print('[setup_llamafactory] llamafactory', llamafactory.__version__, 'torch', torch.__version__)"
