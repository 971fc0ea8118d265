"""The Quix Streams MQTTSink as a contender of mqtt-sink-bench (not a test).

    python quix_sink.py <bootstrap> <topic> <group> <n> <mqtt port> <topic root> <qos> [k=v ...]

Consumes the preloaded topic with a Quix Streams Application (commit_interval=1.0: its
defaults die near 118k records) into its MQTTSink, unmodified but for two counters. Prints
"start" when the first record reaches the sink, "acked N" every second, and "done" once
the sink has seen `n` acknowledgements (QoS 1) or `n` publishes written (QoS 0), then
waits to be killed so that the parent can read its CPU time and peak RSS. `k=v` arguments are librdkafka consumer
properties (the bench passes the MockCluster's group settings).
"""

import os
import sys
import threading

from quixstreams import Application
from quixstreams.models.topics import admin as quix_admin
from quixstreams.models.topics.topic import TopicConfig
from quixstreams.sinks.community.mqtt import MQTTSink


def inspect_from_metadata(self, topic_names, timeout=30):
    """Quix inspects every topic's configs (DescribeConfigs) at start-up; rdkafka's
    MockCluster has no controller to answer that, so the partition count comes from the
    metadata instead. Start-up only: nothing on the record path changes."""
    topics = self.list_topics(timeout=timeout)
    return {
        name: TopicConfig(
            num_partitions=len(topics[name].partitions), replication_factor=1
        )
        if name in topics
        else None
        for name in topic_names
    }


if os.environ.get("QUIX_BENCH_MOCK_CLUSTER") == "1":
    quix_admin.TopicAdmin.inspect_topics = inspect_from_metadata


def main():
    bootstrap, topic_name, group, n, port, root, qos = sys.argv[1:8]
    n, port, qos = int(n), int(port), int(qos)
    extra = dict(kv.split("=", 1) for kv in sys.argv[8:])
    started = threading.Event()
    done = threading.Event()
    acked = [0]

    class CountingSink(MQTTSink):
        def add(self, *args, **kwargs):
            if not started.is_set():
                started.set()
                print("start", flush=True)
            super().add(*args, **kwargs)

        def _on_publish_cb(self, client, userdata, mid, rc, p):
            # The seed's callback first: at QoS 0 it raises (the mid was never pending)
            # and paho's network thread dies, as it does for Quix users.
            super()._on_publish_cb(client, userdata, mid, rc, p)
            acked[0] += 1
            if acked[0] >= n and not done.is_set():
                done.set()
                print("done", flush=True)

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        commit_interval=1.0,
        consumer_extra_config=extra,
        auto_create_topics=False,
    )
    topic = app.topic(topic_name, key_deserializer="bytes", value_deserializer="json")
    sink = CountingSink(
        client_id=f"quix-{group}",
        server="127.0.0.1",
        port=port,
        topic_root=root,
        tls_enabled=False,
        qos=qos,
    )
    app.dataframe(topic).sink(sink)

    def progress():
        while not done.is_set():
            print(f"acked {acked[0]}", flush=True)
            done.wait(1.0)

    threading.Thread(target=progress, daemon=True).start()
    # Bounded: the parent kills us once it has read our usage; if it never does, exit.
    threading.Timer(900, lambda: os._exit(3)).start()
    app.run()  # in the main thread: it installs signal handlers


if __name__ == "__main__":
    main()
