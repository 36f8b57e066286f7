#!/usr/bin/env bash
# The one command to run on a GPU machine: the GPU benchmark of uti-peft (scripts/bench/gpu/), from this source
# tree, without installing it.
#
#   bash scripts/bench_gpu.sh OUTDIR [flags of scripts/bench_gpu.py]   # e.g. OUTDIR --quick --device cpu
#
# Writes OUTDIR/bench_gpu.json, bench_gpu.md and bench_gpu.log (stdout + stderr); exits with the benchmark's
# status (non-zero when a case failed or the logits/tokens differ; OUTDIR still holds what was measured).
#
# uti_peft is staged as an installed copy would lay it out (pyproject.toml's package-dir maps model_cards/ to
# uti_peft.model_cards, which the adapter and merged model cards read), and put first on PYTHONPATH. Wheels found
# in .whl/ (e.g. peft 0.21.2 and transformers 5.24 when the machine's versions do not fit: docs/performance.md)
# are installed, offline and without dependencies, into the staging directory, which comes first of all.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash scripts/bench_gpu.sh OUTDIR [flags of scripts/bench_gpu.py]" >&2
    exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

cp -r "$ROOT/uti_peft" "$STAGE/uti_peft"
cp -r "$ROOT/model_cards" "$STAGE/uti_peft/model_cards"
cp "$ROOT/uti_peft_autoload.py" "$STAGE/"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" "$ROOT"/.whl/*.whl
    export PYTHONPATH="$STAGE/site:$PYTHONPATH"
fi

mkdir -p "$OUT"
python3 "$ROOT/scripts/bench_gpu.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
