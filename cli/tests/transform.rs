//! The jq `transform` on real processes (issue 14 point 1), both runtimes, one Mosquitto:
//! records are shaped (fields picked, wrapped, routed to topics of their own), filtered out
//! (no output) and fanned out (one publish per array element, in order); a record the
//! program fails on follows the error policy (`skip` here) with its coordinates in the log;
//! every offset, the filtered and failed ones too, is committed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "orders";

#[test]
fn a_jq_transform_shapes_filters_and_fans_out_and_every_offset_is_committed() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    each_runtime(|runtime| {
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic(TOPIC, 1).unwrap();
        let root = format!("transform-{runtime}");
        // 60 orders: every 4th is a test order (filtered), every 10th has a bad total (the
        // program errors), the rest fan out into one publish per line item plus a summary.
        let mut records = Vec::new();
        let mut want = Vec::new();
        for i in 0..60 {
            let test = i % 4 == 0;
            let bad = i % 10 == 5;
            let total = if bad {
                "\"n/a\"".to_string()
            } else {
                i.to_string()
            };
            let value = format!(
                r#"{{"id":{i},"test":{test},"total":{total},"lines":[{{"sku":"a{i}"}},{{"sku":"b{i}"}}]}}"#
            );
            records.push((0, format!("shop-{}", i % 3), value));
            if !test && !bad {
                for sku in [format!("a{i}"), format!("b{i}")] {
                    want.push((
                        format!("{root}/lines/{sku}"),
                        Bytes::from(format!(r#"{{"order":{i},"sku":"{sku}"}}"#)),
                    ));
                }
                want.push((
                    format!("{root}/orders/shop-{}", i % 3),
                    Bytes::from(format!(r#"{{"total":{}}}"#, i * 100)),
                ));
            }
        }
        kafka.produce(TOPIC, &records).unwrap();
        let program = format!(
            r#"select(.value.test | not)
              | .value as $o
              | ($o.lines[] | {{topic: "{root}/lines/\(.sku)", payload: {{order: $o.id, sku}}}}),
                {{topic: "{root}/orders/\(.key)", payload: {{total: ($o.total | tonumber | . * 100)}}}}"#
        );
        let mqtt = format!("transform = '''\n{program}\n'''\nerror_policy = \"skip\"");
        let cfg = daemon::config(
            &kafka.bootstrap(),
            (&root, TOPIC),
            (broker.port, &root),
            &mqtt,
            "",
        );
        let sub = SyncSubscriber::start(broker.port, &format!("{root}/#"));
        assert_eq!(sub.wait_for_subacks(1, Duration::from_secs(10)), 1);
        let mut d = Daemon::start(bin, runtime, &cfg);
        let committed =
            daemon::wait_committed(&kafka, (&root, TOPIC), 60, &sub, Duration::from_secs(60));
        assert_eq!(committed, Some(60), "{}", d.log());
        let payloads: Vec<Bytes> = want.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(
            sub.wait_for_all(&payloads, Duration::from_secs(10)),
            want.len(),
            "{}",
            d.log()
        );
        let got: Vec<(String, Bytes)> = sub
            .messages()
            .into_iter()
            .map(|m| (m.topic, m.payload))
            .collect();
        // In order (one partition, one connection), each once, nothing else.
        let first_difference = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            got.len() == want.len() && first_difference.is_none(),
            "{} publishes, {} expected; first difference at {first_difference:?}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            first_difference.map(|i| &got[i]),
            first_difference.map(|i| &want[i]),
        );
        assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
        let log = d.log();
        for i in (5..60).step_by(10) {
            let at = format!("{TOPIC}/0@{i}");
            assert!(
                log.lines()
                    .any(|l| l.contains(&at) && l.contains("the transform failed")),
                "no rejection naming {at} in the log:\n{log}"
            );
        }
    });
}
