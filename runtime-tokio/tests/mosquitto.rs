//! The shared real-broker suite (testkit) for the tokio `MqttSink`, on a real Mosquitto.

use std::sync::mpsc;

use mqtt_sink_core::{CommitOffsets, Config, Event, Record, RecordMapper, Stats, TrySendError};
use mqtt_sink_testkit::suite::{Runtime, SinkHandle, SuiteError};
use mqtt_sink_tokio::{MqttSink, SinkError};

/// The tokio sink on a runtime of its own, driven synchronously by the suite.
struct TokioSink {
    rt: tokio::runtime::Runtime,
    sink: MqttSink,
}

fn suite_err(e: SinkError) -> SuiteError {
    match e {
        SinkError::FlushTimedOut { unacked, .. } => SuiteError::FlushTimedOut(unacked),
        SinkError::FlushFailed { message, .. } => SuiteError::FlushFailed(message),
        other => SuiteError::Other(other.to_string()),
    }
}

impl SinkHandle for TokioSink {
    fn send(&self, record: Record) -> Result<(), SuiteError> {
        self.rt.block_on(self.sink.send(record)).map_err(suite_err)
    }
    fn try_send(&self, record: Record) -> Result<bool, SuiteError> {
        match self.rt.block_on(self.sink.try_send(record)) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Refused(e)) => Err(suite_err(e)),
        }
    }
    fn stats(&self) -> Result<Stats, SuiteError> {
        self.sink.stats_blocking().map_err(suite_err)
    }
    fn flush(&self) -> Result<CommitOffsets, SuiteError> {
        self.rt.block_on(self.sink.flush()).map_err(suite_err)
    }
    fn close(self) -> Result<(), SuiteError> {
        self.rt.block_on(self.sink.close()).map_err(suite_err)
    }
}

struct Tokio;

impl Runtime for Tokio {
    type Sink = TokioSink;
    fn start(
        config: Config,
        mapper: Option<RecordMapper>,
        events: mpsc::Sender<Event>,
    ) -> Result<TokioSink, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let events = std::sync::Mutex::new(events);
        let mut b = MqttSink::builder(config).on_event(move |e| {
            let _ = events.lock().map(|tx| tx.send(e.clone()));
        });
        if let Some(m) = mapper {
            b = b.mapper(m);
        }
        let sink = {
            let _guard = rt.enter();
            b.start().map_err(|e| e.to_string())?
        };
        Ok(TokioSink { rt, sink })
    }
}

mqtt_sink_testkit::real_broker_suite!(Tokio);
