#!/usr/bin/env bash
# Two "nodes" on this machine: `megedit fit` then `megedit eval` under torchrun with --nnodes 2, one rank
# per node, both sharing the output folder, as two machines sharing a disk would run them. On real
# machines run `node 0 ...` on the first and `node 1 ...` on the second, with MASTER_ADDR the first's address.
#
#   bash scripts/two_nodes.sh [OUT]        # default OUT: runs/two-nodes; the 12 demo edits on SmolLM2
#
# Settings from the environment: DATA (KIND:PATH), MODEL, FIT_FLAGS and EVAL_FLAGS (extra flags),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29517).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/two-nodes}
data=${DATA:-jsonl:src/megedit/data/demo-edits.jsonl}
model=${MODEL:-smollm2}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

node() {  # node RANK VERB [ARGS...]: one node's torchrun, one rank on it
  local rank=$1
  shift
  MEGEDIT_CACHE="$out/cache" "$python" -m torch.distributed.run --nnodes 2 --node-rank "$rank" --nproc-per-node 1 \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29517}" -m megedit.cli "$@"
}

both() {  # both nodes, side by side; fails if either does
  node 0 "$@" &
  local first=$!
  node 1 "$@"
  wait "$first"
}

# shellcheck disable=SC2086  # the flag lists split into words on purpose
both fit --data "$data" --model "$model" --out "$out/pack" --quiet ${FIT_FLAGS:-}
# shellcheck disable=SC2086
both eval "$out/pack" --data "$data" --model "$model" --json "$out/eval.json" --quiet ${EVAL_FLAGS:-}
echo "pack: $out/pack, report: $out/eval.json"
