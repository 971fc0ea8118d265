//! MQTT topic-name checks, done before anything is sent.
//!
//! `mqttbytes::valid_topic` accepts the empty topic and its encoder silently truncates the
//! length prefix of topics over 65535 bytes, so the core checks every topic here instead.

use std::fmt;

/// The longest topic name MQTT can encode (a u16 length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a string cannot be used as an MQTT topic name for PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic is empty.
    Empty,
    /// The topic holds a NUL character (U+0000), which MQTT forbids.
    Nul,
    /// The topic holds a wildcard (`+` or `#`), allowed in filters only.
    Wildcard(char),
    /// The topic is longer than 65535 bytes.
    TooLong(usize),
    /// The topic bytes are not UTF-8.
    NotUtf8,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => f.write_str("the MQTT topic is empty"),
            TopicError::Nul => f.write_str("the MQTT topic contains a NUL character"),
            TopicError::Wildcard(c) => write!(
                f,
                "the MQTT topic contains the wildcard '{c}', which is only allowed in subscriptions"
            ),
            TopicError::TooLong(n) => write!(
                f,
                "the MQTT topic is {n} bytes long; MQTT allows at most {MAX_TOPIC_LEN}"
            ),
            TopicError::NotUtf8 => f.write_str("the MQTT topic is not valid UTF-8"),
        }
    }
}

impl std::error::Error for TopicError {}

/// Checks that `topic` can be published to: not empty, no NUL, no `+` or `#`, at most
/// 65535 bytes. (UTF-8 validity is guaranteed by `&str`; see [`check_topic_bytes`].)
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(topic.len()));
    }
    for c in topic.chars() {
        match c {
            '\0' => return Err(TopicError::Nul),
            '+' | '#' => return Err(TopicError::Wildcard(c)),
            _ => {}
        }
    }
    Ok(())
}

/// [`check_topic`] for raw bytes: also rejects invalid UTF-8.
pub fn check_topic_bytes(topic: &[u8]) -> Result<&str, TopicError> {
    let s = std::str::from_utf8(topic).map_err(|_| TopicError::NotUtf8)?;
    check_topic(s)?;
    Ok(s)
}

/// Checks a topic *prefix* (such as `topic_root`): like [`check_topic`] but may be empty.
pub(crate) fn check_topic_prefix(prefix: &str) -> Result<(), TopicError> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_topic(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_topics() {
        for t in ["a", "a/b", "/", "sensors/ü/1", "a//b", "$SYS-like"] {
            assert_eq!(check_topic(t), Ok(()), "{t}");
        }
    }

    #[test]
    fn rejects_each_rule() {
        assert_eq!(check_topic(""), Err(TopicError::Empty));
        assert_eq!(check_topic("a\0b"), Err(TopicError::Nul));
        assert_eq!(check_topic("a/+/b"), Err(TopicError::Wildcard('+')));
        assert_eq!(check_topic("a/#"), Err(TopicError::Wildcard('#')));
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            check_topic(&long),
            Err(TopicError::TooLong(MAX_TOPIC_LEN + 1))
        );
        assert_eq!(check_topic(&long[1..]), Ok(()));
        assert_eq!(check_topic_bytes(&[0x61, 0xff]), Err(TopicError::NotUtf8));
    }
}
