#!/bin/sh
# A chat in the terminal: each turn forks the last one, so the model continues the
# same conversation (and reuses its KV cache) instead of reading it all again.
#
#   chat.sh                          type a line, read the answer; Ctrl-D ends
#   MAX_TOKENS=100 chat.sh < questions.txt
#
# The first turn is a task of its own (mkdir, config, prompt); each next one is
# written to tasks/LAST/fork, and reading that same open file gives the new task's id.
# Forks take their parent's parameters, so the stop string set here holds for them all.
set -eu
ax=${AXFS_ROOT:-/ax}
last=
[ -t 0 ] && echo "Chat with the model in $ax; Ctrl-D ends." >&2

while :; do
  [ -t 0 ] && printf '> ' >&2
  IFS= read -r line || break
  [ -n "$line" ] || continue
  if [ -z "$last" ]; then
    last=chat-$(date +%Y%m%d-%H%M%S)-$$
    mkdir "$ax/tasks/$last"
    printf 'max_tokens %s\nstop \\nUser:\n' "${MAX_TOKENS:-200}" > "$ax/tasks/$last/config"
    printf 'A conversation with a helpful assistant.\nUser: %s\nAssistant:' "$line" \
      > "$ax/tasks/$last/prompt"
  else
    exec 3<>"$ax/tasks/$last/fork"
    printf '\nUser: %s\nAssistant:' "$line" >&3
    read -r last <&3
    exec 3>&-
  fi
  cat "$ax/tasks/$last/stream"
  echo
done
