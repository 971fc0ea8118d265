//! `tls_alpn` (issue 14 point 4's ALPN part): the daemon offers the configured protocol
//! names in its TLS ClientHello, on both runtimes; without the option it offers none.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mqtt_sink_testkit::alpn::AlpnProbe;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;

#[test]
fn the_client_hello_offers_the_configured_alpn_protocols() {
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    each_runtime(|runtime| {
        for (option, want) in [
            (
                "tls_alpn = [\"x-amzn-mqtt-ca\", \"mqtt\"]",
                vec!["x-amzn-mqtt-ca".to_string(), "mqtt".to_string()],
            ),
            ("", vec![]),
        ] {
            let probe = AlpnProbe::start().unwrap();
            let kafka = MockKafka::start().unwrap();
            kafka.create_topic("readings", 1).unwrap();
            let group = format!("alpn-{runtime}");
            let cfg = daemon::config(
                &kafka.bootstrap(),
                (&group, "readings"),
                (probe.port, "sensors"),
                option,
                "",
            )
            .replace(
                "tls_enabled = false",
                "tls_enabled = true\ntls_insecure_skip_verify = true",
            );
            let mut d = Daemon::start(bin, runtime, &cfg);
            let offered = probe.wait_first(Duration::from_secs(30));
            assert_eq!(offered, Some(want), "{option:?}:\n{}", d.log());
            d.stop();
        }
    });
}
