#!/usr/bin/env bash
# The oldest dependency set we allow (requirements-oldest.txt: pyproject.toml's lower bounds),
# tested as CI tests the locked set, plus checkpoints across the two sets:
#
#   experiments/check_oldest.sh            # needs the locked .venv of the README's test command
#   SKIP_SUITE=1 experiments/check_oldest.sh   # only the cross-version checkpoint check
#
# 1. a venv with exactly the oldest set, the whole suite in it (pytest -q -n 2);
# 2. a short run trained by the oldest set, then evaluated and resumed by the locked set, and
#    a run trained by the locked set evaluated by the oldest one: Orbax checkpoints must read
#    both ways. Logs, pip freeze and results go to runs/check_oldest/ (recorded in BUILD_NOTES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/check_oldest}
OLD=${OLD_VENV:-$OUT/venv}
NEW=${NEW_VENV:-.venv}
mkdir -p "$OUT"
[ -x "$NEW/bin/flax-resnet" ] || { echo "no locked venv in $NEW: run the README's test command first" >&2; exit 2; }
[ -x "$OLD/bin/python" ] || python3 -m venv "$OLD"
"$OLD/bin/pip" install -q -c requirements-oldest.txt -e '.[test]'
"$OLD/bin/pip" freeze --exclude-editable > "$OUT/freeze-oldest.txt"
"$NEW/bin/pip" freeze --exclude-editable > "$OUT/freeze-locked.txt"

if [ -z "${SKIP_SUITE:-}" ]; then
  start=$(date +%s)
  "$OLD/bin/python" -m pytest -q -n 2 > "$OUT/pytest-oldest.log" 2>&1 && rc=0 || rc=$?
  echo "oldest set: pytest exit $rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/pytest-oldest.log")"
  [ "$rc" -eq 0 ] || exit "$rc"
fi

# Checkpoints across versions: digits, resnet8, 1 epoch, then a second epoch by the other set.
DATA="$OUT/tensorflow_datasets"
ARGS=(--config digits_resnet20 --config.model=resnet8 --config.batch_size=64 "--config.data_dir=$DATA")
for pair in "oldest:$OLD:locked:$NEW" "locked:$NEW:oldest:$OLD"; do
  IFS=: read -r wname wenv rname renv <<< "$pair"
  run="$OUT/run_by_$wname"
  rm -rf "$run"
  "$wenv/bin/flax-resnet" train --workdir "$run" "${ARGS[@]}" --config.num_epochs=1 > "$run.train.log" 2>&1
  "$renv/bin/flax-resnet" evaluate --workdir "$run" --checkpoint latest > "$run.evaluate.log" 2>&1
  "$renv/bin/flax-resnet" train --workdir "$run" "${ARGS[@]}" --config.num_epochs=2 > "$run.resume.log" 2>&1
  grep -q "resumed from" "$run.resume.log"
  echo "written by $wname, evaluated and resumed by $rname: $(tail -n 1 "$run.evaluate.log" | cut -c1-100)"
done
echo "check_oldest: all passed"
