//! The shared real-broker suite (testkit) for the blocking `MqttSink`, on a real Mosquitto.

use std::sync::mpsc;

use mqtt_sink_blocking::{MqttSink, SinkError};
use mqtt_sink_core::{CommitOffsets, Config, Event, Record, RecordMapper, Stats, TrySendError};
use mqtt_sink_testkit::suite::{Runtime, SinkHandle, SuiteError};

fn suite_err(e: SinkError) -> SuiteError {
    match e {
        SinkError::FlushTimedOut { unacked, .. } => SuiteError::FlushTimedOut(unacked),
        SinkError::FlushFailed { message, .. } => SuiteError::FlushFailed(message),
        other => SuiteError::Other(other.to_string()),
    }
}

struct Sink(MqttSink);

impl SinkHandle for Sink {
    fn send(&self, record: Record) -> Result<(), SuiteError> {
        self.0.send(record).map_err(suite_err)
    }
    fn try_send(&self, record: Record) -> Result<bool, SuiteError> {
        match self.0.try_send(record) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Refused(e)) => Err(suite_err(e)),
        }
    }
    fn stats(&self) -> Result<Stats, SuiteError> {
        self.0.stats().map_err(suite_err)
    }
    fn flush(&self) -> Result<CommitOffsets, SuiteError> {
        self.0.flush().map_err(suite_err)
    }
    fn close(self) -> Result<(), SuiteError> {
        self.0.close().map_err(suite_err)
    }
}

struct Blocking;

impl Runtime for Blocking {
    type Sink = Sink;
    fn start(
        config: Config,
        mapper: Option<RecordMapper>,
        events: mpsc::Sender<Event>,
    ) -> Result<Sink, String> {
        let events = std::sync::Mutex::new(events);
        let mut b = MqttSink::builder(config).on_event(move |e| {
            let _ = events.lock().map(|tx| tx.send(e.clone()));
        });
        if let Some(m) = mapper {
            b = b.mapper(m);
        }
        b.start().map(Sink).map_err(|e| e.to_string())
    }
}

mqtt_sink_testkit::real_broker_suite!(Blocking);
