//! The at-least-once suite on real processes: the `mqtt-sink` binary killed, its brokers
//! killed, its link cut, its consumer group reshaped, with Kafka and MQTT chosen by
//! environment (see `mqtt_sink_testkit::backend`; defaults: MockCluster and a Mosquitto
//! process). `testkit/run-suite.sh` runs it on Tansu and in containers too.

mqtt_sink_testkit::faults_suite!(env!("CARGO_BIN_EXE_mqtt-sink"));
