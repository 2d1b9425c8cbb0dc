#!/usr/bin/env bash
# Builds (once) the oracle venv the video-processor oracle test runs transformers' Qwen2VLVideoProcessor in: it
# needs torchvision, which needs torch 2.14.1 while the suite pins 2.13.0, so it lives in its own venv OUTSIDE
# the clone (~5.8 GB, a CUDA build of torch; ~1.5 min from a local wheel mirror, longer over the network).
# Prints the venv's python. Rebuilt when the pinned versions below change.
set -euo pipefail
PINS="torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 av numpy pillow"
DIR="${QWEN2VL_ORACLE_VENV:-$HOME/.cache/qwen2vl-ci/oracle-venv}"
STAMP="$DIR/.qwen2vl-pins"
if [[ ! -x "$DIR/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]]; then
    rm -rf "$DIR"
    mkdir -p "$(dirname "$DIR")"
    python -m venv "$DIR" >&2
    # shellcheck disable=SC2086
    "$DIR/bin/pip" install -q $PINS >&2
    echo "$PINS" > "$STAMP"
fi
echo "$DIR/bin/python"
