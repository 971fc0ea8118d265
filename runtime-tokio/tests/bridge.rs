//! The shared bridge suite (testkit) for the tokio `Bridge` (StreamConsumer).

use mqtt_sink_core::{BridgeStats, Config, KafkaConfig};
use mqtt_sink_testkit::bridge_suite::{BridgeRuntime, RunningBridge, Transform};
use mqtt_sink_tokio::Bridge;

struct Running {
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<BridgeStats>,
}

impl RunningBridge for Running {
    fn stop(self) -> BridgeStats {
        let _ = self.stop.send(());
        self.rt.block_on(self.task).expect("bridge task")
    }
}

struct Tokio;

impl BridgeRuntime for Tokio {
    type Running = Running;
    fn start_with(
        kafka: KafkaConfig,
        mqtt: Config,
        suffix: &str,
        transform: Option<Transform>,
    ) -> Running {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let bridge = {
            let _guard = rt.enter();
            let mut b = Bridge::builder(kafka, mqtt).client_id_suffix(suffix);
            if let Some(t) = transform {
                b = b.transform(t);
            }
            b.start().unwrap_or_else(|e| panic!("bridge: {e}"))
        };
        let (stop, rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(async move {
            bridge
                .run(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap_or_else(|e| panic!("bridge: {e}"))
        });
        Running { rt, stop, task }
    }
}

mqtt_sink_testkit::bridge_suite!(Tokio);
