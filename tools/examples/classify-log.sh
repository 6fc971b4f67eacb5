#!/bin/sh
# Classify the lines a log file gained since the last run as info, warn or error, from
# cron, and refuse the answers the model was not sure of.
#
# The crontab line (crontab -e), every 10 minutes:
#   */10 * * * *  AXFS_ROOT=/ax /opt/axfs/tools/examples/classify-log.sh /var/log/syslog /var/tmp/levels.tsv
#
# Each new line is one task, all of them queued at once. Its config has format json (the
# answer is one JSON value, which jq reads) and logprobs 1 (its status then says how sure
# the model was: min_logprob, the log-probability of its least likely token). A line whose
# answer has a level, with min_logprob at least MIN_LOGPROB (default -0.7: every token had
# at least even odds), is appended to OUTFILE as "LEVEL<tab>LINE" and its task removed;
# any other line goes to stderr with the reason and its task's name (its tokens file shows
# which token the model doubted), cron mails it, and the script exits 1.
#
# Where it got to is kept in OUTFILE.offset (how much of the log it has read; a log that
# shrank was rotated and is read again from its start). A run reads MAX_LINES (default
# 100) lines at most, and no line still being written (one without its newline yet).
set -eu
ax=${AXFS_ROOT:-/ax}
usage="usage: classify-log.sh LOGFILE OUTFILE"
log=${1:?$usage}
out=${2:?$usage}
min=${MIN_LOGPROB:--0.7}
[ -r "$log" ] || { echo "classify-log.sh: cannot read $log" >&2; exit 1; }

offset=$(cat "$out.offset" 2>/dev/null || echo 0)
size=$(wc -c < "$log")
[ "$size" -ge "$offset" ] || offset=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tail -c +"$((offset + 1))" "$log" | head -c "$((size - offset))" | head -n "${MAX_LINES:-100}" > "$tmp/lines"
if [ -s "$tmp/lines" ] && [ "$(tail -c 1 "$tmp/lines" | wc -l)" -eq 0 ]; then
  sed '$d' "$tmp/lines" > "$tmp/whole" && mv "$tmp/whole" "$tmp/lines"  # still being written
fi

# A few examples in the answer's own form make that form the likely one: the tokens the
# format fixes ({"level": ") are then near certain, and min_logprob is the level's doubt.
# (With a blank line between examples the model would rather write two newlines where
# JSON allows one, and min_logprob would be that forced newline's.)
prompt() {
  cat <<'EOF'
Classify each log line as info, warn or error, in JSON.

Line: Nov 23 03:14:07 web1 sshd[812]: Accepted publickey for deploy from 10.0.0.5
Answer:
{"level": "info"}
Line: Nov 23 03:15:42 web1 kernel: EXT4-fs error (device sda1): reading directory lblock 0
Answer:
{"level": "error"}
Line: Nov 23 03:16:01 web1 smartd[640]: Device /dev/sdb, 8 Currently unreadable sectors
Answer:
{"level": "warn"}
EOF
  printf 'Line: %s\nAnswer:\n\n' "$1"  # axfs drops one final newline (echo's)
}

run=classify-$(date +%Y%m%d-%H%M%S)-$$
n=0
while IFS= read -r line; do  # queue every line's task, then read the answers
  n=$((n + 1))
  mkdir "$ax/tasks/$run-$n"
  # The answer ends at its line's end (stop \n), as the examples' do.
  printf 'format json\nstop \\n\ntemperature 0\nmax_tokens 32\nlogprobs 1\n' > "$ax/tasks/$run-$n/config"
  # The prompt is queued when the first process that wrote it closes it: one writes it.
  prompt "$line" | cat > "$ax/tasks/$run-$n/prompt"
done < "$tmp/lines"

n=0
refused=0
while IFS= read -r line; do
  n=$((n + 1))
  dir=$ax/tasks/$run-$n
  cat "$dir/stream" > /dev/null  # waits for the task's end
  state=$(awk '$1 == "state" { print $2 }' "$dir/status")
  sure=$(awk '$1 == "min_logprob" { print $2 }' "$dir/status")
  level=$(jq -er '.level | select(. == "info" or . == "warn" or . == "error")' "$dir/stream" \
          2>/dev/null) || level=
  if [ "$state" != done ]; then
    why="task $state: $(cat "$dir/error")"
  elif [ -z "$level" ]; then
    why="no level in the answer $(head -c 80 "$dir/stream")"
  elif awk -v p="$sure" -v min="$min" 'BEGIN { exit !(p < min) }'; then
    why="unsure of $level (min_logprob $sure, below $min)"
  else
    printf '%s\t%s\n' "$level" "$line" >> "$out"
    rm -r "$dir"
    continue
  fi
  printf 'classify-log.sh: tasks/%s: %s: %s\n' "$run-$n" "$why" "$line" >&2
  refused=1
done < "$tmp/lines"

echo "$((offset + $(wc -c < "$tmp/lines")))" > "$out.offset"
exit "$refused"
