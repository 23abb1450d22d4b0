#!/usr/bin/env bash
# Side-by-side check of sfcd's attribution graph against circuit-tracer 0.5.0's own code (see README.md).
# usage: run.sh --run-dir RUN --step N --out WORK [--prompt TEXT]
# env:   SFCD_PY  sfcd's interpreter (default: <repo>/.venv/bin/python)
#        CT_VENV  circuit-tracer's venv, created here if missing (default: $HOME/.cache/sfcd/ct-venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
SFCD_PY="${SFCD_PY:-$repo/.venv/bin/python}"
CT_VENV="${CT_VENV:-$HOME/.cache/sfcd/ct-venv}"

run_dir="" step="" out="" prompt="The athlete that the chefs"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --step) step="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$run_dir" || -z "$step" || -z "$out" ]]; then
  echo "usage: $0 --run-dir RUN --step N --out WORK [--prompt TEXT]" >&2
  exit 2
fi

if [[ ! -x "$CT_VENV/bin/python" ]]; then
  echo "creating circuit-tracer venv in $CT_VENV" >&2
  python3 -m venv "$CT_VENV"
  "$CT_VENV/bin/pip" install torch==2.13.0
  "$CT_VENV/bin/pip" install circuit-tracer==0.5.0
fi

mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
args=(--run-dir "$run_dir" --step "$step" --out "$out" --prompt "$prompt")
echo "== sfcd side ($SFCD_PY)" >&2
"$SFCD_PY" "$here/sfcd_side.py" "${args[@]}"
echo "== circuit-tracer side ($CT_VENV)" >&2
"$CT_VENV/bin/python" "$here/ct_side.py" "${args[@]}"
echo "== comparison" >&2
"$CT_VENV/bin/python" "$here/compare.py" --out "$out"
