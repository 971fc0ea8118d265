//! More than rustls buffers by default (64 KiB) transmitted at once over TLS: the sink
//! writes it all (it once took the refusal for a lost connection and reconnected forever).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtt_sink_blocking::MqttSink;
use mqtt_sink_core::{Event, MqttVersion, Record, TopicPartition};
use mqtt_sink_testkit::certs::TestPki;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions, TlsListener};
use mqtt_sink_testkit::subscriber::SyncSubscriber;
use mqtt_sink_testkit::suite::config;

#[test]
fn a_batch_larger_than_the_tls_buffer_goes_out_whole() {
    let dir = std::env::temp_dir().join(format!("mqtt-sink-pki-large-{}", std::process::id()));
    let pki = TestPki::generate(&dir).unwrap_or_else(|e| panic!("{e}"));
    let broker = Mosquitto::start(MosquittoOptions {
        tls: Some(TlsListener {
            cafile: pki.ca.clone(),
            certfile: pki.server_cert.clone(),
            keyfile: pki.server_key.clone(),
            require_certificate: false,
        }),
        ..MosquittoOptions::default()
    })
    .expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut cfg = config(broker.tls_port, MqttVersion::V311, 1);
    cfg.server = "localhost".into();
    cfg.tls_enabled = true;
    cfg.tls_ca_file = Some(pki.ca.clone());
    cfg.max_inflight = 1000;
    let lost = Arc::new(Mutex::new(Vec::new()));
    let seen = lost.clone();
    let sink = MqttSink::builder(cfg)
        .on_event(move |e| {
            if matches!(e, Event::ConnectionLost(_) | Event::ConnectFailed(_)) {
                let _ = seen.lock().map(|mut l| l.push(e.to_string()));
            }
        })
        .start()
        .expect("valid config");
    let payload = "x".repeat(4000); // 1000 in flight: about 4 MB written at once
    let tp = TopicPartition::new("readings", 0);
    for i in 0..2000 {
        let r = Record::new(tp.clone(), i, Some("k"), Some(payload.clone()));
        sink.send(r).expect("send");
    }
    assert_eq!(sink.flush().expect("flush over TLS"), vec![(tp, 2000)]);
    assert_eq!(sub.wait_for(2000, Duration::from_secs(30)), 2000);
    sink.close().expect("close");
    assert_eq!(*lost.lock().expect("events"), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
