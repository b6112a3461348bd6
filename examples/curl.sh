#!/usr/bin/env bash
# The API with curl alone: submit a job, watch its events, fetch the image.
#   bash examples/curl.sh "a lighthouse at dusk" out.png          (SIZE=768 STEPS=30 bash examples/curl.sh ...)
# The service's URL comes from DIFFUSION_API_URL (default http://127.0.0.1:8000); an API key, if the service has
# keys on, from DIFFUSION_API_KEY. Exits non-zero when the job fails.
set -euo pipefail
URL="${DIFFUSION_API_URL:-http://127.0.0.1:8000}"
PROMPT="${1:-a lighthouse on a cliff at sunset}"
OUT="${2:-example_curl.png}"
SIZE="${SIZE:-512}"
STEPS="${STEPS:-20}"
AUTH=()
if [ -n "${DIFFUSION_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer ${DIFFUSION_API_KEY}"); fi
# curl with the key when there is one (the ${AUTH[@]+...} form: an empty array under `set -u` fails in bash < 4.4)
api() { curl -sS ${AUTH[@]+"${AUTH[@]}"} "$@"; }

# 1. Submit (the prompt is passed through Python's json module so quotes in it stay valid JSON).
BODY=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "steps": int(sys.argv[2]),
    "width": int(sys.argv[3]), "height": int(sys.argv[3]), "fileType": "png"}))' "$PROMPT" "$STEPS" "$SIZE")
ANSWER=$(api -X POST "$URL/txt2img" -H 'content-type: application/json' -d "$BODY")
JOB_ID=$(printf '%s' "$ANSWER" | sed -n 's/.*"job_id":"\([0-9a-f]\{32\}\)".*/\1/p')
if [ -z "$JOB_ID" ]; then echo "not accepted: $ANSWER" >&2; exit 1; fi
echo "job $JOB_ID queued" >&2

# 2. Watch: Server-Sent Events until the final event (done, error or cancelled); the stream then closes.
FINAL=$(api -N "$URL/queue/$JOB_ID/events" | while IFS= read -r line; do
  case "$line" in
    "event: progress"|"event: preview"|"") ;;
    "event: "*) echo "${line#event: }" ;;
    "data: "*) printf '  %s\n' "$(printf '%s' "${line#data: }" | cut -c1-120)" >&2 ;;
  esac
done | tail -n 1)
if [ "$FINAL" != "done" ]; then
  echo "job $JOB_ID ended ${FINAL:-without a final event}:" >&2
  api "$URL/queue/$JOB_ID" >&2; echo >&2
  exit 1
fi

# 3. The image file, with its A1111 infotext inside.
api -f -o "$OUT" "$URL/queue/$JOB_ID/image"
echo "saved $OUT" >&2
