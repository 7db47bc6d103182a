"""The peer leasehold is compared with: the official Python client's
streaming-pull subscriber (google-cloud-pubsub), acking no-op messages.

Prints one JSON line: {"n": received, "seconds": first message -> last ack()}.
PUBSUB_EMULATOR_HOST points the client at the emulator."""
import argparse
import json
import threading
import time

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.types import FlowControl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--project", required=True)
    p.add_argument("--subscription", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--max-messages", type=int, default=0, help="FlowControl max_messages; 0 = the client's default")
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args()

    client = pubsub_v1.SubscriberClient()
    path = client.subscription_path(a.project, a.subscription)
    lock = threading.Lock()
    state = {"count": 0, "first": None, "last": None}
    done = threading.Event()

    def callback(message):
        now = time.monotonic()
        message.ack()
        with lock:
            if state["first"] is None:
                state["first"] = now
            state["count"] += 1
            if state["count"] >= a.n:
                state["last"] = time.monotonic()
                done.set()

    flow = FlowControl(max_messages=a.max_messages) if a.max_messages else FlowControl()
    future = client.subscribe(path, callback=callback, flow_control=flow)
    done.wait(a.timeout)
    future.cancel()
    try:
        future.result(timeout=10)
    except Exception:
        pass
    first, last = state["first"], state["last"] or time.monotonic()
    print(json.dumps({"n": state["count"], "seconds": (last - first) if first else None}))


if __name__ == "__main__":
    main()
