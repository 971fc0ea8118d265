//! Shaping and routing: a record becomes zero, one or several publishes, by a jq program
//! (`transform`, run by jaq) or a Rust closure ([`RecordMapper::route`](crate::RecordMapper::route)).

use std::fmt;

use bytes::Bytes;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, Compiler, Ctx, Vars};
use jaq_json::{Map, Val};

use crate::config::PublishProperties;
use crate::record::Record;
use crate::QoS;

/// At most this many publishes per record: a program that outputs without end (`repeat`,
/// `range(infinite)`) fails the record instead of filling memory.
pub const MAX_OUTPUTS: usize = 1024;

/// One publish a record becomes. What is left unset takes the configured value: the topic
/// from `topic_template` (or `{topic_root}/{key}`), the QoS from `qos`, retain from
/// `retain`, properties from `properties` (MQTT 5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    /// The whole MQTT topic.
    pub topic: Option<String>,
    /// The payload bytes.
    pub payload: Bytes,
    /// The QoS of this publish, in place of the configured `qos`. A broker that does not
    /// honour it is treated as for `qos` (see `qos_downgrade`).
    pub qos: Option<QoS>,
    /// The retain flag.
    pub retain: Option<bool>,
    /// MQTT 5 properties, in place of the configured ones.
    pub properties: Option<PublishProperties>,
}

impl Publish {
    /// A publish of `payload` to the configured topic.
    pub fn payload(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the topic.
    #[must_use]
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Sets the QoS.
    #[must_use]
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = Some(qos);
        self
    }
}

/// A compiled jq program (the `transform` option), run on each record.
///
/// Its input is the record as JSON: `key` (text, or null), `value` (parsed when it is JSON,
/// else text; null for a tombstone), `headers` (an object of text values), `topic`,
/// `partition`, `offset` and `timestamp` (milliseconds, or null). Each output is one
/// publish: an object with a `payload` key is `{payload, topic?, qos?, retain?, properties?}`,
/// anything else is the payload itself. A payload that is a string is sent as its text (as
/// `jq -r` prints it); any other value as compact JSON. No output filters the record out.
pub struct JqTransform {
    filter: jaq_core::Filter<data::JustLut<Val>>,
}

impl fmt::Debug for JqTransform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JqTransform")
    }
}

impl JqTransform {
    /// Compiles a jq program with jaq's standard library; the error says what is wrong and
    /// where.
    pub fn compile(code: &str) -> Result<Self, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errs| {
                let mut out = Vec::new();
                for (_, e) in errs {
                    match e {
                        jaq_core::load::Error::Io(v) => {
                            out.extend(v.into_iter().map(|(p, e)| format!("{p}: {e}")));
                        }
                        jaq_core::load::Error::Lex(v) => out.extend(
                            v.into_iter()
                                .map(|(exp, at)| expected(exp.as_str(), at, code)),
                        ),
                        jaq_core::load::Error::Parse(v) => out.extend(
                            v.into_iter()
                                .map(|(exp, at)| expected(exp.as_str(), at, code)),
                        ),
                    }
                }
                out.join("; ")
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| {
                errs.into_iter()
                    .flat_map(|(_, v)| v)
                    .map(|(name, what)| format!("undefined {} {name}", what.as_str()))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(Self { filter })
    }

    /// Runs the program on a record: its publishes, in output order.
    pub fn run(&self, r: &Record) -> Result<Vec<Publish>, String> {
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut out = Vec::new();
        for y in self.filter.id.run((ctx, record_value(r))) {
            let v = match y {
                Ok(v) => v,
                Err(e) => {
                    return Err(match e.get_err() {
                        // `error("text")` reads as the text, other values as JSON.
                        Ok(e) => match e.into_val() {
                            Val::TStr(b) => format!("jq error: {}", String::from_utf8_lossy(&b)),
                            v => format!("jq error: {v}"),
                        },
                        Err(e) => match e.get_halt() {
                            Ok(code) => format!("jq halt({code}): halt is not allowed here"),
                            Err(_) => "jq error".to_string(),
                        },
                    });
                }
            };
            if out.len() == MAX_OUTPUTS {
                return Err(format!(
                    "more than {MAX_OUTPUTS} outputs for one record; filter or limit them (e.g. limit(10; ...))"
                ));
            }
            out.push(publish_of(v).map_err(|e| format!("output {}: {e}", out.len() + 1))?);
        }
        Ok(out)
    }
}

/// "expected X at `rest of the program`".
fn expected(what: &str, at: &str, code: &str) -> String {
    let col = code.len() - at.len().min(code.len());
    if at.is_empty() {
        format!("expected {what} at the end of the program")
    } else {
        let near: String = at.chars().take(20).collect();
        format!("expected {what} at byte {col} (near {near:?})")
    }
}

fn text(b: &Bytes) -> Val {
    if std::str::from_utf8(b).is_ok() {
        Val::utf8_str(b.clone())
    } else {
        Val::byte_str(b.clone())
    }
}

fn key(s: &'static str) -> Val {
    Val::utf8_str(Bytes::from_static(s.as_bytes()))
}

/// The record as the program's input.
fn record_value(r: &Record) -> Val {
    let mut m = Map::default();
    m.insert(key("key"), r.key.as_ref().map_or(Val::Null, text));
    let value = match &r.value {
        None => Val::Null,
        Some(b) => jaq_json::read::parse_single(b).unwrap_or_else(|_| text(b)),
    };
    m.insert(key("value"), value);
    let mut headers = Map::default();
    for h in &r.headers {
        let v = h.value.as_ref().map_or(Val::Null, text);
        headers.insert(Val::utf8_str(h.key.clone().into_bytes()), v);
    }
    m.insert(key("headers"), Val::obj(headers));
    m.insert(key("topic"), Val::utf8_str(r.tp.topic.as_bytes().to_vec()));
    m.insert(key("partition"), Val::from(r.tp.partition as isize));
    m.insert(key("offset"), Val::from(r.offset as isize));
    m.insert(
        key("timestamp"),
        r.timestamp_ms.map_or(Val::Null, |t| Val::from(t as isize)),
    );
    Val::obj(m)
}

fn payload_bytes(v: Val) -> Bytes {
    match v {
        Val::TStr(b) | Val::BStr(b) => *b,
        other => Bytes::from(other.to_string()),
    }
}

fn publish_of(v: Val) -> Result<Publish, String> {
    let Val::Obj(m) = &v else {
        return Ok(Publish::payload(payload_bytes(v)));
    };
    if !m.contains_key(&key("payload")) {
        return Ok(Publish::payload(payload_bytes(v)));
    }
    let mut p = Publish::default();
    for (k, v) in m.iter() {
        let name = match k {
            Val::TStr(b) => String::from_utf8_lossy(b).into_owned(),
            other => other.to_string(),
        };
        match (name.as_str(), v) {
            ("payload", v) => p.payload = payload_bytes(v.clone()),
            ("topic", Val::TStr(b)) => {
                p.topic = Some(
                    String::from_utf8(b.to_vec())
                        .map_err(|_| "topic is not valid UTF-8".to_string())?,
                );
            }
            ("topic" | "qos" | "retain" | "properties", Val::Null) => {}
            ("topic", other) => return Err(format!("topic must be a string, got {other}")),
            ("qos", Val::Num(n)) => {
                p.qos = Some(match n.as_isize() {
                    Some(0) => QoS::AtMostOnce,
                    Some(1) => QoS::AtLeastOnce,
                    Some(2) => QoS::ExactlyOnce,
                    _ => return Err(format!("qos must be 0, 1 or 2, got {v}")),
                });
            }
            ("qos", other) => return Err(format!("qos must be 0, 1 or 2, got {other}")),
            ("retain", Val::Bool(b)) => p.retain = Some(*b),
            ("retain", other) => return Err(format!("retain must be true or false, got {other}")),
            ("properties", props @ Val::Obj(_)) => {
                let json = props.to_string();
                p.properties = Some(
                    serde_json::from_str::<PublishProperties>(&json)
                        .map_err(|e| format!("properties {json}: {e}"))?,
                );
            }
            ("properties", other) => {
                return Err(format!("properties must be an object, got {other}"))
            }
            (other, _) => {
                return Err(format!(
                    "unknown key {other:?}: an object with a payload key may hold topic, payload, qos, retain and properties"
                ))
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::record::{Header, TopicPartition};

    fn record(value: &[u8]) -> Record {
        Record {
            tp: TopicPartition::new("readings", 3),
            offset: 42,
            key: Some(Bytes::from_static(b"dev-1")),
            value: Some(Bytes::copy_from_slice(value)),
            headers: vec![Header {
                key: "site".into(),
                value: Some(Bytes::from_static(b"north")),
            }],
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn run(code: &str, value: &[u8]) -> Result<Vec<Publish>, String> {
        JqTransform::compile(code).unwrap().run(&record(value))
    }

    #[test]
    fn the_input_is_the_record_as_json() {
        let out = run(".", br#"{"t":21.5}"#).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"key": "dev-1", "value": {"t": 21.5}, "headers": {"site": "north"},
                "topic": "readings", "partition": 3, "offset": 42, "timestamp": 1_700_000_000_000_i64})
        );
        // Not JSON: a string; a tombstone: null.
        assert_eq!(run(".value", b"not json").unwrap()[0].payload, "not json");
        let mut tomb = record(b"");
        tomb.value = None;
        let t = JqTransform::compile(".value").unwrap().run(&tomb).unwrap();
        assert_eq!(t[0].payload, "null");
    }

    #[test]
    fn outputs_are_payloads_or_publish_objects() {
        assert_eq!(
            run(".value.t", br#"{"t":21.5}"#).unwrap()[0].payload,
            "21.5"
        );
        assert_eq!(run(".key", b"1").unwrap()[0].payload, "dev-1");
        let out = run(
            r#"{topic: "t/\(.key)", payload: {c: .value.t}, retain: true,
                properties: {content_type: "application/json", user_properties: [["a", "b"]]}}"#,
            br#"{"t":1}"#,
        )
        .unwrap();
        assert_eq!(out[0].topic.as_deref(), Some("t/dev-1"));
        assert_eq!(out[0].payload, r#"{"c":1}"#);
        assert_eq!(out[0].retain, Some(true));
        let props = out[0].properties.as_ref().unwrap();
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(props.user_properties, vec![("a".into(), "b".into())]);
        // An object without a payload key is a payload.
        assert_eq!(run("{a: 1}", b"1").unwrap()[0].payload, r#"{"a":1}"#);
    }

    #[test]
    fn a_qos_key_sets_the_qos_of_its_publish() {
        let out = run(
            "{payload: 1, qos: 0}, {payload: 2, qos: 1}, {payload: 3, qos: 2}, \
             {payload: 4, qos: null}, {payload: 5}, 6",
            b"1",
        )
        .unwrap();
        let qos: Vec<_> = out.iter().map(|p| p.qos).collect();
        assert_eq!(
            qos,
            [
                Some(QoS::AtMostOnce),
                Some(QoS::AtLeastOnce),
                Some(QoS::ExactlyOnce),
                None,
                None,
                None
            ]
        );
        // Computed from the record.
        let out = run("{payload: .value, qos: .value.q}", br#"{"q":2}"#).unwrap();
        assert_eq!(out[0].qos, Some(QoS::ExactlyOnce));
        assert_eq!(
            Publish::payload("x").qos(QoS::AtMostOnce).qos,
            Some(QoS::AtMostOnce)
        );
    }

    #[test]
    fn a_qos_other_than_0_1_or_2_is_an_error_naming_the_output() {
        for bad in ["3", "-1", "1.5", "\"1\"", "true", "[1]"] {
            let e = run(&format!("{{payload: 1}}, {{payload: 1, qos: {bad}}}"), b"1").unwrap_err();
            assert!(
                e.starts_with("output 2: qos must be 0, 1 or 2, got "),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn zero_outputs_filter_and_several_fan_out() {
        assert!(run("select(.value.t > 30)", br#"{"t":21.5}"#)
            .unwrap()
            .is_empty());
        let out = run(
            r#".value[] | {topic: "x/\(.id)", payload: .}"#,
            br#"[{"id":1},{"id":2}]"#,
        )
        .unwrap();
        let topics: Vec<_> = out.iter().map(|p| p.topic.clone().unwrap()).collect();
        assert_eq!(topics, ["x/1", "x/2"]);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = JqTransform::compile(".value | {").unwrap_err();
        assert!(e.contains("expected"), "{e}");
        let e = JqTransform::compile("nosuchfn(1)").unwrap_err();
        assert!(e.contains("undefined") && e.contains("nosuchfn"), "{e}");
        let e = run(".value.t + \"x\"", br#"{"t":1}"#).unwrap_err();
        assert!(e.starts_with("jq error"), "{e}");
        let e = run("error(\"bad reading\")", b"1").unwrap_err();
        assert!(e.contains("bad reading"), "{e}");
        let e = run("{payload: 1, priority: 1}", b"1").unwrap_err();
        assert!(
            e.contains("unknown key \"priority\"") && e.contains("qos"),
            "{e}"
        );
        let e = run("{payload: 1, retain: 1}", b"1").unwrap_err();
        assert!(e.contains("retain must be"), "{e}");
        let e = run("{payload: 1, properties: {nope: 1}}", b"1").unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = run("repeat(1)", b"1").unwrap_err();
        assert!(e.contains("more than 1024 outputs"), "{e}");
        let e = run("halt", b"1").unwrap_err();
        assert!(e.contains("halt"), "{e}");
    }
}
