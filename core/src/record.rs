//! Kafka records as the core sees them, and their coordinates.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// A Kafka topic and partition.
///
/// The topic name is shared (`Arc<str>`) because every record, ledger entry and event of a
/// partition names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// The Kafka topic.
    pub topic: Arc<str>,
    /// The Kafka partition.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic-partition pair.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Where a record lives in Kafka: topic, partition and offset.
///
/// Displayed as `topic/partition@offset`; every per-record event and error names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordCoords {
    /// Topic and partition.
    pub tp: TopicPartition,
    /// Offset within the partition.
    pub offset: i64,
}

impl fmt::Display for RecordCoords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.tp, self.offset)
    }
}

/// A Kafka record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value; Kafka allows a null value.
    pub value: Option<Bytes>,
}

/// One Kafka record, as pushed into [`Sink::push_record`](crate::Sink::push_record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Kafka topic and partition the record was read from.
    pub tp: TopicPartition,
    /// Kafka offset.
    pub offset: i64,
    /// Record key; the default key serializer needs it (it becomes the MQTT topic suffix).
    pub key: Option<Bytes>,
    /// Record value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Record headers, in Kafka order.
    pub headers: Vec<Header>,
    /// Kafka timestamp in milliseconds since the Unix epoch, if the record has one.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// A record with a key and a value and no headers or timestamp.
    pub fn new(
        tp: TopicPartition,
        offset: i64,
        key: Option<impl Into<Bytes>>,
        value: Option<impl Into<Bytes>>,
    ) -> Self {
        Self {
            tp,
            offset,
            key: key.map(Into::into),
            value: value.map(Into::into),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// A record whose value is `value` serialized as JSON with serde_json (the default value
    /// serializer of the Quix sink, for typed values).
    pub fn with_json_value<T: serde::Serialize + ?Sized>(
        tp: TopicPartition,
        offset: i64,
        key: Option<impl Into<Bytes>>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        let value = Bytes::from(serde_json::to_vec(value)?);
        Ok(Self::new(tp, offset, key, Some(value)))
    }

    /// The record's coordinates, for events and errors.
    pub fn coords(&self) -> RecordCoords {
        RecordCoords {
            tp: self.tp.clone(),
            offset: self.offset,
        }
    }

    /// Bytes this record holds (key, value, headers), as counted against the buffer limit
    /// while the record is kept for dead-lettering.
    pub fn size(&self) -> usize {
        let k = self.key.as_ref().map_or(0, Bytes::len);
        let v = self.value.as_ref().map_or(0, Bytes::len);
        let h: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
            .sum();
        k + v + h + std::mem::size_of::<Self>()
    }
}
