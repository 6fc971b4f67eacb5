#!/bin/sh
# Ask and wait: submit a prompt, print the answer as it is generated, and exit 0 when
# the task ended done, or 1 with the reason on stderr.
#
#   ask.sh "The capital of France is"
#   echo "Explain inodes in one sentence:" | ask.sh
#
# (With axctl: axctl submit --wait "The capital of France is".)
set -eu
ax=${AXFS_ROOT:-/ax}
if [ $# -gt 0 ]; then prompt="$*"; else prompt=$(cat); fi

# Open tasks/new for reading and writing: the prompt is queued when it is written,
# and reading the same open file gives the new task's id.
exec 3<>"$ax/tasks/new"
printf '%s' "$prompt" >&3
read -r id <&3
exec 3>&-

cat "$ax/tasks/$id/stream"   # ends when the task ends
echo
state=$(sed -n 's/^state //p' "$ax/tasks/$id/status")
if [ "$state" != done ]; then
  echo "ask.sh: task $id $state: $(cat "$ax/tasks/$id/error")" >&2
  exit 1
fi
