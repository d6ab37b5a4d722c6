#!/bin/bash
# Every committed summary under results/ regenerated with --summary-only, on a copy of results/:
# prints the tables to OUT (default /tmp/summaries-HEAD.txt) and fails if a regenerated summary.json
# differs from the committed one by a byte. With REV, also runs the code of that git revision (in a
# temporary worktree) and fails if its printed tables differ: a refactor's proof of unchanged behaviour.
#   tools/check_summaries.sh [REV]
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
summaries() {  # SRC OUT
  local src=$1 out=$2 res
  res=$(mktemp -d)
  mkdir "$res/results" && cp -r "$ROOT/results/." "$res/results/"
  : > "$out"
  while read -r args; do
    echo "### qkvlab $args" >> "$out"
    (cd "$res" && PYTHONPATH="$src/src" OMP_NUM_THREADS=1 $PY -m qkvlab $args >> "$out" 2>&1; echo "rc=$?" >> "$out")
  done <<'LIST'
repro wd-rank --out results/paper000-gpt --summary-only
repro decouple --out results/paper000-gpt --summary-only
repro wd-rank --setting recall --out results/paper000-recall --summary-only
repro wd-rank --setting icl-linear --out results/paper000-icl-linear --summary-only
repro wd-rank --setting icl-softmax --out results/paper000-icl-softmax --summary-only
repro wd-rank --setting vit --out results/paper000-vit --summary-only
repro wd-rank --setting gpt-online --out results/paper000-gpt-online --summary-only
repro optimizer-rank --out results/optimizer-rank-gpt --summary-only
repro optimizer-rank --setting recall --out results/optimizer-rank-recall --summary-only
repro rank-guard --out results/rank-guard-gpt --reference results/paper000-gpt --summary-only
repro finetune --pilot --out results/repro-finetune --summary-only
repro finetune --out results/finetune-tuned/minilm --summary-only
LIST
  local bad=0
  while IFS= read -r file; do
    cmp -s "$res/results/$file" "$ROOT/results/$file" || { echo "differs: results/$file"; bad=1; }
  done < <(cd "$res/results" && find . -name summary.json | sed 's#^\./##' | sort)
  rm -rf "$res"
  return $bad
}
status=0
summaries "$ROOT" "${OUT:-/tmp/summaries-HEAD.txt}" || status=1
if grep -q "^rc=[^0]" "${OUT:-/tmp/summaries-HEAD.txt}"; then echo "a summary failed: see ${OUT:-/tmp/summaries-HEAD.txt}"; status=1; fi
if [ $# -ge 1 ]; then
  old=$(mktemp -d)
  git -C "$ROOT" worktree add -q --detach "$old/tree" "$1"
  summaries "$old/tree" "$old/out.txt" || true
  git -C "$ROOT" worktree remove --force "$old/tree"
  diff "$old/out.txt" "${OUT:-/tmp/summaries-HEAD.txt}" > /dev/null || { echo "tables differ from $1's:"; diff "$old/out.txt" "${OUT:-/tmp/summaries-HEAD.txt}" | head -40; status=1; }
fi
[ $status = 0 ] && echo "every summary regenerates byte for byte${1:+, and prints what $1 printed}"
exit $status
