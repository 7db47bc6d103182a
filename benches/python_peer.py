"""The peer leasehold is compared with: the official Python client's
streaming-pull subscriber (google-cloud-pubsub).

Throughput mode (benches/pubsub.rs): acks no-op messages and prints one JSON
line: {"n": received, "seconds": first message -> last ack()}.

Fleet mode (--fleet-worker NAME, benches/fleet): one worker of a fleet with
FlowControl(max_messages = slots); each message runs the task program the
leasehold workers run (TASK_PROGRAM fleet-task, the payload on stdin), then is
acked. The client hands a message to the callback only when flow control
allows, so its receipt is recorded where it arrives from the stream: a
`recv` line per message in RECORDS, next to the task's own start and end
lines. Prints "ready" once subscribed, and runs until SIGTERM.

PUBSUB_EMULATOR_HOST points the client at the emulator."""
import argparse
import json
import os
import queue
import signal
import subprocess
import threading
import time

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.types import FlowControl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--project", required=True)
    p.add_argument("--subscription", required=True)
    p.add_argument("--n", type=int, default=0, help="throughput mode: messages to wait for")
    p.add_argument("--max-messages", type=int, default=0, help="FlowControl max_messages; 0 = the client's default")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--fleet-worker", help="fleet mode: this worker's name")
    p.add_argument("--records", help="fleet mode: the records file")
    p.add_argument("--task-program", help="fleet mode: the task program")
    a = p.parse_args()
    if a.fleet_worker:
        return fleet(a)
    if a.n <= 0:
        p.error("--n is required (or --fleet-worker)")

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


def fleet(a):
    from google.cloud.pubsub_v1.subscriber._protocol import streaming_pull_manager

    lock = threading.Lock()
    records = open(a.records, "a")

    def note(line):
        with lock:
            records.write(line + "\n")
            records.flush()

    # Receipt: when the stream delivers a message into this client, before
    # flow control decides when the callback may run it.
    original = streaming_pull_manager.StreamingPullManager._on_response

    def on_response(self, response):
        if response is not None:
            now = time.time_ns() // 1000
            for m in response._pb.received_messages:
                note(f"recv {m.message.attributes['task_id']} {a.fleet_worker} - {now}")
        return original(self, response)

    streaming_pull_manager.StreamingPullManager._on_response = on_response

    slots = queue.SimpleQueue()
    for i in range(a.max_messages):
        slots.put(f"s{i}")

    def callback(message):
        slot = slots.get()
        env = dict(
            os.environ,
            LEASEHOLD_TASK_ID=message.attributes["task_id"],
            FLEET_WORKER=a.fleet_worker,
            FLEET_SLOT=slot,
            FLEET_LOG=a.records,
        )
        try:
            subprocess.run([a.task_program, "fleet-task"], input=message.data, env=env, check=True)
        finally:
            # The slot is free before the ack lets flow control start the next message.
            slots.put(slot)
        message.ack()

    client = pubsub_v1.SubscriberClient()
    path = client.subscription_path(a.project, a.subscription)
    future = client.subscribe(path, callback=callback, flow_control=FlowControl(max_messages=a.max_messages))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait(a.timeout)
    future.cancel()
    try:
        future.result(timeout=10)
    except Exception:
        pass


if __name__ == "__main__":
    main()
