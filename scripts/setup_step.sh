#!/usr/bin/env bash
# One step of the first-run setup (the Makefile's virtualenv, r-nacos and gateway builds), run with its output
# in a log so that steps running in parallel (`make run`/`make test` run them with -j3) stay readable: a line
# when it starts, with how long it usually takes, one a minute while it runs, and one when it ends; on failure
# the end of its log.
#
#   scripts/setup_step.sh NAME "WHAT" "USUAL TIME" 'COMMAND'     (COMMAND runs in bash; log: .run/setup/NAME.log)
set -uo pipefail
name=$1 what=$2 usual=$3 command=$4
log_dir=.run/setup
log=$log_dir/$name.log
mkdir -p "$log_dir"

elapsed() { local s=$((SECONDS - start)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

start=$SECONDS
echo "[setup] $name: $what (usually $usual on 2 cores; log $log)"
# the sleep must not hold our stdout: a pipe reading it (`make run | tee`) would wait for the sleep to end
(
  while sleep 60 </dev/null >/dev/null 2>&1; do echo "[setup] $name: still running, $(elapsed) so far (usually $usual)"; done
) &
ticker=$!
trap 'kill $ticker 2>/dev/null' EXIT

bash -c "set -eo pipefail; $command" >"$log" 2>&1
code=$?
kill $ticker 2>/dev/null
if [ $code -eq 0 ]; then
  echo "[setup] $name: done in $(elapsed)"
else
  echo "[setup] $name: FAILED (exit $code) after $(elapsed); last lines of $log:"
  tail -n 40 "$log" | sed 's/^/    /'
fi
exit $code
