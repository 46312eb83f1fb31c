#!/usr/bin/env bash
# The transformers tests (tests/test_hf.py) against the last transformers 4.x line. The main .venv
# has transformers 5; this puts transformers 4.57.6, with the huggingface_hub and tokenizers it
# needs, into .venv/transformers4 and first on PYTHONPATH (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
target=.venv/transformers4
if [ ! -d "$target/transformers" ]; then
    .venv/bin/pip install --quiet --no-deps --target "$target" \
        "transformers==4.57.6" "huggingface_hub==0.36.2" "tokenizers==0.22.2"
fi
PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" exec .venv/bin/python -m pytest tests/test_hf.py "$@"
