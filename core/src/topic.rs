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
    /// The topic holds a character MQTT lets a broker refuse (a control character or a
    /// Unicode non-character, see [`refusable`]) at this byte position.
    Refusable {
        /// The character.
        ch: char,
        /// Its byte position in the topic.
        at: usize,
    },
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
            TopicError::Refusable { ch, at } => write!(
                f,
                "the MQTT topic contains {} at byte {at}; {REFUSABLE_WHY}; set \
                 string_policy = \"escape\" to percent-escape it in topics",
                describe(*ch)
            ),
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

/// Why a [`refusable`] character is refused.
pub(crate) const REFUSABLE_WHY: &str = "MQTT lets a broker refuse control characters and \
    Unicode non-characters in any string, and Mosquitto closes the connection on them";

/// True for the characters MQTT lets a receiver refuse in any UTF-8 string ([MQTT-1.5.4]):
/// U+0000-U+001F, U+007F-U+009F and the Unicode non-characters (U+FDD0-U+FDEF and the
/// last two code points of every plane). U+0000 is always refused.
pub fn refusable(c: char) -> bool {
    let u = c as u32;
    u <= 0x1F
        || (0x7F..=0x9F).contains(&u)
        || (0xFDD0..=0xFDEF).contains(&u)
        || u & 0xFFFE == 0xFFFE
}

/// The first [`refusable`] character of `s` and its byte position.
pub fn first_refusable(s: &str) -> Option<(usize, char)> {
    s.char_indices().find(|&(_, c)| refusable(c))
}

/// `U+0009 (a control character)`-style text for messages.
pub(crate) fn describe(c: char) -> String {
    let kind = if (c as u32) < 0xA0 {
        "a control character"
    } else {
        "a Unicode non-character"
    };
    format!("U+{:04X} ({kind})", c as u32)
}

/// `topic` with every [`refusable`] character percent-escaped (each of its UTF-8 bytes as
/// `%XX`); `None` when there is none. `%` itself is left alone, so an escaped topic is
/// readable but not always reversible.
pub fn escape_refusable(topic: &str) -> Option<String> {
    first_refusable(topic)?;
    let mut out = String::with_capacity(topic.len() + 8);
    for c in topic.chars() {
        if refusable(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Checks that `topic` can be published to: not empty, no NUL, no `+` or `#`, at most
/// 65535 bytes, and no other [`refusable`] character. (UTF-8 validity is guaranteed by
/// `&str`; see [`check_topic_bytes`].)
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    check_topic_allowing(topic, false)
}

/// [`check_topic`], letting the refusable characters other than NUL through when
/// `allow_refusable` (`string_policy = "allow"`, for brokers known to accept them).
pub fn check_topic_allowing(topic: &str, allow_refusable: bool) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(topic.len()));
    }
    for (at, c) in topic.char_indices() {
        match c {
            '\0' => return Err(TopicError::Nul),
            '+' | '#' => return Err(TopicError::Wildcard(c)),
            c if !allow_refusable && refusable(c) => {
                return Err(TopicError::Refusable { ch: c, at })
            }
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
pub(crate) fn check_topic_prefix(prefix: &str, allow_refusable: bool) -> Result<(), TopicError> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_topic_allowing(prefix, allow_refusable)
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

    #[test]
    fn refuses_what_brokers_may_refuse_and_names_the_position() {
        for (t, ch, at) in [
            ("dev\t7", '\t', 3),
            ("\u{1}\u{2}\u{3}\u{4}", '\u{1}', 0),
            ("a/\u{7f}", '\u{7f}', 2),
            ("ü\u{85}", '\u{85}', 2),
            ("x\u{fdd0}", '\u{fdd0}', 1),
            ("x\u{ffff}", '\u{ffff}', 1),
            ("x\u{10fffe}", '\u{10fffe}', 1),
        ] {
            assert_eq!(
                check_topic(t),
                Err(TopicError::Refusable { ch, at }),
                "{t:?}"
            );
            assert_eq!(check_topic_allowing(t, true), Ok(()), "{t:?}");
        }
        assert_eq!(check_topic_allowing("a\0", true), Err(TopicError::Nul));
        for ok in ['\u{a0}', '\u{fdcf}', '\u{fdf0}', '\u{fffd}', ' ', '~'] {
            assert!(!refusable(ok), "{ok:?}");
        }
        let e = check_topic("dev\t7").expect_err("refused").to_string();
        assert!(e.contains("U+0009 (a control character) at byte 3"), "{e}");
        assert!(e.contains("string_policy"), "{e}");
    }

    #[test]
    fn escapes_refusable_characters_only() {
        assert_eq!(escape_refusable("a/b%c"), None);
        assert_eq!(escape_refusable("dev\t7").as_deref(), Some("dev%097"));
        assert_eq!(escape_refusable("a\0\u{85}").as_deref(), Some("a%00%C2%85"));
        let e = escape_refusable("\u{1}\u{2}\u{3}\u{4}").expect("escaped");
        assert_eq!(e, "%01%02%03%04");
        assert_eq!(check_topic(&e), Ok(()));
    }
}
