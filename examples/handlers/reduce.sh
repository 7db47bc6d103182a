#!/bin/sh
# Sample CPU handler: "reduces" a mesh. Payload {"polygons": N}; exits 65
# (configured as permanent) when the payload has no polygon count. Reports
# its two passes as progress.
set -eu
payload=$(cat)
polygons=$(printf '%s' "$payload" | sed -n 's/.*"polygons"[^0-9]*\([0-9][0-9]*\).*/\1/p')
if [ -z "$polygons" ]; then
  echo "payload has no polygon count: $payload" >&2
  exit 65
fi
echo "reducing $polygons polygons (task $LEASEHOLD_TASK_ID)"
echo '{"fraction": 0, "message": "pass 1/2: collapsing edges"}' >> "$LEASEHOLD_PROGRESS_FILE"
sleep 1
echo '{"fraction": 0.5, "message": "pass 2/2: welding vertices"}' >> "$LEASEHOLD_PROGRESS_FILE"
sleep 1
printf '{"polygons_in": %s, "polygons_out": %s}\n' "$polygons" "$((polygons / 10))" > "$LEASEHOLD_RESULT_FILE"
