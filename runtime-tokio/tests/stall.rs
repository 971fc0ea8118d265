//! A bridge whose sink stays full keeps serving its consumer group (review finding L7):
//! while its partitions are paused it still polls the consumer, so it takes part in the
//! rebalance a joining member starts instead of being evicted from the group.

use std::time::Duration;

use mqtt_sink_core::{KafkaConfig, MqttVersion};
use mqtt_sink_testkit::kafka::{classic_group_properties, GroupMember, MockKafka};
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::suite::config;
use mqtt_sink_tokio::Bridge;

#[test]
fn a_stalled_bridge_still_serves_rebalances() {
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic("stall", 4).expect("test fixture");
    let records: Vec<_> = (0..400)
        .map(|i| (i % 4, format!("k{}", i % 4), format!("v-{i}")))
        .collect();
    kafka.produce("stall", &records).expect("test fixture");
    // A frozen broker never answers CONNECT: the sink's 10-record buffer stays full.
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    broker.pause();
    let mut mqtt = config(broker.port, MqttVersion::V5, 1);
    mqtt.max_buffered_records = 10;
    mqtt.flush_timeout = Duration::from_secs(1);
    mqtt.connect_timeout = Duration::from_secs(1);
    let props = classic_group_properties("range");
    let mut kc = KafkaConfig::new(kafka.bootstrap(), "g-stall", vec!["stall".to_string()]);
    kc.properties = props.clone();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bridge = {
        let _guard = rt.enter();
        Bridge::builder(kc, mqtt)
            .client_id_suffix("stall")
            .start()
            .unwrap_or_else(|e| panic!("bridge: {e}"))
    };
    let stats = bridge.stats_handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(bridge.run(async move {
        let _ = stopped.await;
    }));

    // The bridge owns every partition and has stalled (paused) on the full sink.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (stats.snapshot().assigned < 4 || stats.snapshot().consumed < 11)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stats.snapshot().assigned, 4, "{:?}", stats.snapshot());
    std::thread::sleep(Duration::from_secs(2));

    let member =
        GroupMember::join(&kafka.bootstrap(), "g-stall", "stall", &props).expect("test fixture");
    // Range over two members: two partitions each. A bridge that did not poll would miss
    // the rebalance and be evicted (the mock cluster's rebalance timeout is the 6 s session
    // timeout), leaving all four to the new member first.
    let got = member.wait_assigned(Duration::from_secs(40));
    assert_eq!(
        got.len(),
        2,
        "{got:?}: the stalled bridge missed the rebalance"
    );
    member.leave(Duration::from_secs(10)).expect("test fixture");

    broker.resume();
    let _ = stop.send(());
    let end = rt.block_on(task).expect("bridge task");
    end.unwrap_or_else(|e| panic!("bridge: {e}"));
}
