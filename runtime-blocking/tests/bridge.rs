//! The shared bridge suite (testkit) for the blocking `Bridge`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use mqtt_sink_blocking::Bridge;
use mqtt_sink_core::{BridgeStats, Config, KafkaConfig};
use mqtt_sink_testkit::bridge_suite::{BridgeRuntime, RunningBridge, Transform};

struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<BridgeStats>,
}

impl RunningBridge for Running {
    fn stop(self) -> BridgeStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("bridge thread")
    }
}

struct Blocking;

impl BridgeRuntime for Blocking {
    type Running = Running;
    fn start_with(
        kafka: KafkaConfig,
        mqtt: Config,
        suffix: &str,
        transform: Option<Transform>,
    ) -> Running {
        let mut b = Bridge::builder(kafka, mqtt).client_id_suffix(suffix);
        if let Some(t) = transform {
            b = b.transform(t);
        }
        let bridge = b.start().unwrap_or_else(|e| panic!("bridge: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread =
            std::thread::spawn(move || bridge.run(&s).unwrap_or_else(|e| panic!("bridge: {e}")));
        Running { stop, thread }
    }
}

mqtt_sink_testkit::bridge_suite!(Blocking);
