#!/bin/sh
# Summarise the end of a log file, nightly from cron. The summary is written to
# OUTDIR/summary-DATE.txt (default OUTDIR: /var/tmp); when the task does not end done,
# the reason goes to stderr, which cron mails to the crontab's owner.
#
# The crontab line (crontab -e), every night at 03:15:
#   15 3 * * *  AXFS_ROOT=/ax /opt/axfs/tools/examples/nightly-summary.sh /var/log/syslog /var/tmp
#
# LOG_LINES (default 50) is how many last lines of the log the model reads, and
# MAX_TOKENS (default 200) the most the summary may take; together they must fit in
# a task's context (PerTaskContext in the tree's memory file).
set -eu
ax=${AXFS_ROOT:-/ax}
log=${1:?usage: nightly-summary.sh LOGFILE [OUTDIR]}
out=${2:-/var/tmp}
task=summary-$(date +%Y%m%d-%H%M%S)-$$
dir=$ax/tasks/$task
summary=$out/summary-$(date +%F).txt
[ -r "$log" ] || { echo "nightly-summary.sh: cannot read $log" >&2; exit 1; }

# A task with its own parameters: mkdir, write its config, then its prompt.
mkdir "$dir"
printf 'max_tokens %s\ntemperature 0.2\n' "${MAX_TOKENS:-200}" > "$dir/config"
# The prompt is queued when the first process that wrote it closes it, so it is built
# first and written by one command.
{
  printf 'The last lines of %s on %s:\n\n' "$log" "$(hostname)"
  tail -n "${LOG_LINES:-50}" "$log"
  printf '\nA short summary of what happened, and anything that needs attention:\n'
} | cat > "$dir/prompt"

cat "$dir/stream" > "$summary.part"
state=$(sed -n 's/^state //p' "$dir/status")
if [ "$state" != done ]; then
  rm -f "$summary.part"
  echo "nightly-summary.sh: task $task $state: $(cat "$dir/error")" >&2
  exit 1
fi
mv "$summary.part" "$summary"
