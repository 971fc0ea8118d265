//! Topic templates: static text and placeholders rendered per record.

use crate::event::RejectReason;
use crate::record::Record;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
    Topic,
    Partition,
    Header(String),
    Json(Vec<String>),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// `{topic_root}/{key}`, the Quix default.
    pub(crate) fn root_and_key(root: &str) -> Self {
        Self {
            parts: vec![Part::Text(format!("{root}/")), Part::Key],
        }
    }

    /// Parses a template; the error says what is wrong and what to write instead.
    pub(crate) fn parse(t: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = t;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in {rest:?}"))?;
                    let name = &rest[1..end];
                    let part = match name.split_once(':') {
                        None if name == "key" => Part::Key,
                        None if name == "topic" => Part::Topic,
                        None if name == "partition" => Part::Partition,
                        Some(("header", h)) if !h.is_empty() => Part::Header(h.to_string()),
                        Some(("json", f)) if !f.is_empty() => {
                            Part::Json(f.split('.').map(str::to_string).collect())
                        }
                        _ => {
                            return Err(format!(
                                "unknown placeholder {{{name}}}: use {{key}}, {{topic}}, {{partition}}, {{header:NAME}} or {{json:FIELD}}"
                            ))
                        }
                    };
                    parts.push(part);
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let text = &rest[..end];
                    if text.contains('}') {
                        return Err(format!("unmatched '}}' in {text:?}"));
                    }
                    if let Some(c) = text.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
                        return Err(format!("{c:?} is not allowed in a topic"));
                    }
                    parts.push(Part::Text(text.to_string()));
                    rest = &rest[end..];
                }
            }
        }
        match parts.first() {
            Some(Part::Text(_)) => Ok(Self { parts }),
            _ => Err("a template must start with static text, e.g. \"sensors/{key}\"".into()),
        }
    }

    /// Renders the topic of a record; `key` is the key serializer's output (if needed).
    pub(crate) fn render(
        &self,
        r: &Record,
        key: impl FnOnce(&Record) -> Result<String, RejectReason>,
        escape: bool,
    ) -> Result<String, RejectReason> {
        let mut out = String::new();
        let mut key = Some(key);
        let mut json: Option<serde_json::Value> = None;
        let push = |out: &mut String, v: &str| {
            if escape {
                for c in v.chars() {
                    match c {
                        '/' => out.push_str("%2F"),
                        '+' => out.push_str("%2B"),
                        '#' => out.push_str("%23"),
                        c => out.push(c),
                    }
                }
            } else {
                out.push_str(v);
            }
        };
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Key => match key.take() {
                    Some(k) => push(&mut out, &k(r)?),
                    None => return Err(RejectReason::Template("{key} used twice".into())),
                },
                Part::Topic => push(&mut out, &r.tp.topic),
                Part::Partition => out.push_str(&r.tp.partition.to_string()),
                Part::Header(h) => {
                    let v = r
                        .headers
                        .iter()
                        .find(|x| &x.key == h)
                        .and_then(|x| x.value.as_ref())
                        .ok_or_else(|| {
                            RejectReason::Template(format!("header {h:?} is missing"))
                        })?;
                    let v = std::str::from_utf8(v).map_err(|_| {
                        RejectReason::Template(format!("header {h:?} is not UTF-8"))
                    })?;
                    push(&mut out, v);
                }
                Part::Json(path) => {
                    if json.is_none() {
                        let bytes = r.value.as_deref().unwrap_or_default();
                        json = Some(serde_json::from_slice(bytes).map_err(|e| {
                            RejectReason::Template(format!("the value is not JSON ({e})"))
                        })?);
                    }
                    let mut v = json.as_ref().unwrap_or(&serde_json::Value::Null);
                    for f in path {
                        v = v.get(f).ok_or_else(|| {
                            RejectReason::Template(format!(
                                "JSON field {:?} is missing",
                                path.join(".")
                            ))
                        })?;
                    }
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        _ => {
                            return Err(RejectReason::Template(format!(
                                "JSON field {:?} is not a string, number or boolean",
                                path.join(".")
                            )))
                        }
                    };
                    push(&mut out, &text);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Header, TopicPartition};

    fn rec() -> Record {
        let mut r = Record::new(
            TopicPartition::new("plant", 3),
            9,
            Some("dev/7"),
            Some(r#"{"device":{"id":"d-1","n":5}}"#),
        );
        r.headers.push(Header {
            key: "site".into(),
            value: Some("north".into()),
        });
        r
    }

    fn key(r: &Record) -> Result<String, RejectReason> {
        Ok(String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned())
    }

    #[test]
    fn renders_every_placeholder_and_escapes_on_request() {
        let t = Template::parse(
            "x/{topic}/{partition}/{header:site}/{json:device.id}/{json:device.n}/{key}",
        )
        .expect("valid");
        assert_eq!(
            t.render(&rec(), key, false).expect("renders"),
            "x/plant/3/north/d-1/5/dev/7"
        );
        assert_eq!(
            t.render(&rec(), key, true).expect("renders"),
            "x/plant/3/north/d-1/5/dev%2F7"
        );
    }

    #[test]
    fn rejects_bad_templates_and_missing_values() {
        for bad in ["{key}/x", "x/{nope}", "x/{key", "x/+/{key}", "x/}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        let t = Template::parse("x/{header:zone}").expect("valid");
        assert!(
            matches!(t.render(&rec(), key, false), Err(RejectReason::Template(m)) if m.contains("zone"))
        );
        let t = Template::parse("x/{json:missing}").expect("valid");
        assert!(t.render(&rec(), key, false).is_err());
    }
}
