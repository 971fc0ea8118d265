#![allow(clippy::unwrap_used)]
use mqtt_sink_testkit::kafka::MockKafka;
use std::time::Duration;

#[test]
fn mock_kafka_round_trip() {
    let k = MockKafka::start().unwrap();
    k.create_topic("t", 2).unwrap();
    k.produce(
        "t",
        &[(0, "a".into(), "1".into()), (1, "b".into(), "2".into())],
    )
    .unwrap();
    let got = k.read_all("t", 2, Duration::from_secs(20)).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(k.committed("nobody", "t", 2).unwrap(), vec![None, None]);
}
