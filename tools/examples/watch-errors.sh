#!/bin/sh
# Watch the trace and raise an alert for every error (a task that failed) and every
# refused write (a bad prompt, config or ctl line). Runs until it is stopped.
#
#   watch-errors.sh                                   alerts on stdout
#   ALERT='logger -t axfs' watch-errors.sh &          to syslog
#   ALERT='mail -s "axfs alert" root' nohup watch-errors.sh &
#
# ALERT is a shell command that gets each alert line on its stdin.
set -eu
ax=${AXFS_ROOT:-/ax}

# Trace lines are: time task uid event key=value...; tail -F reopens the trace if the
# tree is mounted again.
tail -n 0 -F "$ax/trace" 2>/dev/null |
  grep --line-buffered -E '^[^ ]+ [^ ]+ [^ ]+ (error|reject) ' |
  while IFS= read -r line; do
    if [ -n "${ALERT:-}" ]; then
      printf 'axfs alert: %s\n' "$line" | sh -c "$ALERT"
    else
      printf 'axfs alert: %s\n' "$line"
    fi
  done
