#!/bin/sh
# Fan out one question to several models and compare their answers, speed and length.
#
#   fanout.sh "Why is the sky blue?"                      every model in models/
#   fanout.sh "Why is the sky blue?" gemma-3-270m-q4_k_m other-model
#
# The tasks run together (the scheduler batches them); MAX_TOKENS (default 128) caps
# each answer, and decoding is greedy so a rerun gives the same text.
set -eu
ax=${AXFS_ROOT:-/ax}
question=${1:?usage: fanout.sh QUESTION [MODEL...]}
shift
[ $# -gt 0 ] || set -- $(ls "$ax/models")
stamp=$(date +%Y%m%d-%H%M%S)-$$

n=0
for model in "$@"; do
  n=$((n + 1))
  dir=$ax/tasks/fanout-$stamp-$n
  mkdir "$dir"
  printf 'model %s\nmax_tokens %s\ntemperature 0\n' "$model" "${MAX_TOKENS:-128}" > "$dir/config"
  printf '%s' "$question" > "$dir/prompt"
done

n=0
for model in "$@"; do
  n=$((n + 1))
  dir=$ax/tasks/fanout-$stamp-$n
  cat "$dir/stream" > /dev/null   # waits until this one has ended
  field() { sed -n "s/^$1 //p" "$dir/status"; }
  printf '== %s: %s (%s), %s tokens, %s tok/s, first token after %s ms\n' "$model" \
    "$(field state)" "$(field finish_reason)" "$(field generated_tokens)" \
    "$(field decode_tokens_per_second)" "$(field first_token_ms)"
  cat "$dir/stream"
  printf '\n\n'
done
