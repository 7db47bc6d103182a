#!/bin/sh
# Sample GPU handler: "renders" a scene for {"seconds": N} on the one GPU it
# was given, reports each frame as progress, and reports the result in its
# result file.
set -eu
payload=$(cat)
seconds=$(printf '%s' "$payload" | sed -n 's/.*"seconds"[^0-9]*\([0-9][0-9]*\).*/\1/p')
seconds=${seconds:-3}
echo "rendering ${LEASEHOLD_ATTR_SCENE:-scene} (task $LEASEHOLD_TASK_ID, attempt $LEASEHOLD_ATTEMPT) on GPU $CUDA_VISIBLE_DEVICES for ${seconds}s"
i=0
while [ "$i" -lt "$seconds" ]; do
  sleep 1
  i=$((i + 1))
  echo "frame $i/$seconds"
  # One line per report: a JSON object (or free text). Each is a heartbeat.
  printf '{"fraction": %s, "message": "frame %s/%s"}\n' \
    "$(awk "BEGIN { print $i / $seconds }")" "$i" "$seconds" >> "$LEASEHOLD_PROGRESS_FILE"
done
printf '{"device": "%s", "frames": %s}\n' "$CUDA_VISIBLE_DEVICES" "$seconds" > "$LEASEHOLD_RESULT_FILE"
