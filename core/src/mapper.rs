//! How a record becomes a PUBLISH: key and value serializers, retain and MQTT 5 properties,
//! each static or computed per record from the whole record.

use std::fmt;

use bytes::Bytes;

use crate::config::{Config, HeaderSelection, PublishProperties};
use crate::event::RejectReason;
use crate::record::Record;
use crate::template::Template;
use crate::transform::{JqTransform, Publish};

type KeyFn = dyn Fn(&Record) -> Result<String, String> + Send + Sync;
type ValueFn = dyn Fn(&Record) -> Result<Bytes, String> + Send + Sync;
type RetainFn = dyn Fn(&Record) -> bool + Send + Sync;
type PropsFn = dyn Fn(&Record) -> Option<PublishProperties> + Send + Sync;
type RouteFn = dyn Fn(&Record) -> Result<Vec<Publish>, String> + Send + Sync;

/// Maps the record key to the topic suffix: `{topic_root}/{suffix}`.
#[non_exhaustive]
pub enum KeySerializer {
    /// The key as UTF-8 (the Quix default `bytes.decode`); a missing or non-UTF-8 key
    /// rejects the record.
    Utf8,
    /// A function of the whole record.
    Custom(Box<KeyFn>),
}

/// Maps the record to the PUBLISH payload.
#[non_exhaustive]
pub enum ValueSerializer {
    /// JSON (the Quix default `json.dumps`): a value is already serialized bytes and passes
    /// through (build typed values with [`Record::with_json_value`]); a tombstone becomes
    /// `null`.
    Json,
    /// The value bytes as they are; a tombstone becomes an empty payload.
    Raw,
    /// A function of the whole record.
    Custom(Box<ValueFn>),
}

/// The retain flag of each publish.
#[non_exhaustive]
pub enum Retain {
    /// The same for every record.
    Static(bool),
    /// Computed from the whole record.
    PerRecord(Box<RetainFn>),
}

/// MQTT 5 properties of each publish.
#[non_exhaustive]
pub enum Properties {
    /// No properties.
    None,
    /// The same for every record.
    Static(PublishProperties),
    /// Computed from the whole record (`None`: no properties for this one).
    PerRecord(Box<PropsFn>),
}

macro_rules! debug_by_variant {
    ($t:ident { $($v:ident $(($x:tt))?),* }) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(Self::$v $(($x))? => f.write_str(concat!(stringify!($t), "::", stringify!($v))),)*
                }
            }
        }
    };
}
/// What publishes a record becomes.
#[non_exhaustive]
pub enum Route {
    /// One publish: the topic from the template, the payload from the value serializer.
    One,
    /// The `transform` jq program: zero, one or several publishes.
    Jq(JqTransform),
    /// A function of the whole record: zero, one or several publishes.
    Custom(Box<RouteFn>),
}

debug_by_variant!(Route { One, Jq(_), Custom(_) });
debug_by_variant!(KeySerializer { Utf8, Custom(_) });
debug_by_variant!(ValueSerializer { Json, Raw, Custom(_) });
debug_by_variant!(Retain { Static(_), PerRecord(_) });
debug_by_variant!(Properties { None, Static(_), PerRecord(_) });

/// Everything that turns a [`Record`] into a PUBLISH. Start from
/// [`RecordMapper::from_config`] and replace parts with the builder methods.
pub struct RecordMapper {
    pub(crate) topic_root: String,
    template: Template,
    escape: bool,
    headers: HeaderSelection,
    coordinates: bool,
    pub(crate) key: KeySerializer,
    pub(crate) value: ValueSerializer,
    pub(crate) retain: Retain,
    pub(crate) properties: Properties,
    pub(crate) route: Route,
}

impl fmt::Debug for RecordMapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordMapper")
            .field("topic_root", &self.topic_root)
            .field("key", &self.key)
            .field("value", &self.value)
            .field("retain", &self.retain)
            .field("properties", &self.properties)
            .field("route", &self.route)
            .finish()
    }
}

impl RecordMapper {
    /// The defaults of the Quix sink, with `topic_root`, `retain` and `properties` from
    /// the config.
    pub fn from_config(cfg: &Config) -> Self {
        let template = cfg
            .topic_template
            .as_deref()
            .and_then(|t| Template::parse(t).ok())
            .unwrap_or_else(|| Template::root_and_key(&cfg.topic_root));
        Self {
            topic_root: cfg.topic_root.clone(),
            template,
            escape: cfg.escape_placeholders,
            headers: cfg.headers_as_user_properties.clone(),
            coordinates: cfg.coordinates_as_user_properties,
            key: KeySerializer::Utf8,
            value: ValueSerializer::Json,
            retain: Retain::Static(cfg.retain),
            properties: cfg
                .properties
                .clone()
                .map_or(Properties::None, Properties::Static),
            // A program that does not compile is a config error (`Config::validate`).
            route: cfg
                .transform
                .as_deref()
                .and_then(|code| JqTransform::compile(code).ok())
                .map_or(Route::One, Route::Jq),
        }
    }

    /// Routes each record through a function that returns its publishes: none filters it
    /// out (its offset passes), several fan out in order (its offset passes when every one
    /// is acknowledged or handled by the error policy), an error applies the error policy.
    /// A publish's unset fields take the configured topic, QoS, retain and properties; the
    /// value serializer is not used.
    ///
    /// ```
    /// use mqtt_sink_core::{Config, Publish, RecordMapper};
    /// let cfg = Config::new("bridge", "localhost", 1883, "sensors");
    /// let mapper = RecordMapper::from_config(&cfg).route(|r| {
    ///     Ok(match r.value.as_deref() {
    ///         None => vec![], // tombstones: filtered out, their offsets pass
    ///         Some(v) => vec![Publish::payload(v.to_vec()), Publish::payload("seen").to("audit/all")],
    ///     })
    /// });
    /// # let _ = mapper;
    /// ```
    #[must_use]
    pub fn route(
        mut self,
        f: impl Fn(&Record) -> Result<Vec<Publish>, String> + Send + Sync + 'static,
    ) -> Self {
        self.route = Route::Custom(Box::new(f));
        self
    }

    /// The publishes of a record under a transform or route; `None` without one (the
    /// plain path: one publish from the template and the value serializer).
    pub(crate) fn routed(&self, r: &Record) -> Option<Result<Vec<Publish>, RejectReason>> {
        match &self.route {
            Route::One => None,
            Route::Jq(t) => Some(t.run(r).map_err(RejectReason::Transform)),
            Route::Custom(f) => Some(f(r).map_err(RejectReason::Transform)),
        }
    }

    /// Replaces the key serializer with a function of the whole record.
    #[must_use]
    pub fn key_serializer(
        mut self,
        f: impl Fn(&Record) -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        self.key = KeySerializer::Custom(Box::new(f));
        self
    }

    /// Replaces the value serializer.
    #[must_use]
    pub fn value_serializer(mut self, v: ValueSerializer) -> Self {
        self.value = v;
        self
    }

    /// Replaces the value serializer with a function of the whole record.
    #[must_use]
    pub fn value_serializer_fn(
        mut self,
        f: impl Fn(&Record) -> Result<Bytes, String> + Send + Sync + 'static,
    ) -> Self {
        self.value = ValueSerializer::Custom(Box::new(f));
        self
    }

    /// Computes retain per record.
    #[must_use]
    pub fn retain_with(mut self, f: impl Fn(&Record) -> bool + Send + Sync + 'static) -> Self {
        self.retain = Retain::PerRecord(Box::new(f));
        self
    }

    /// Computes MQTT 5 properties per record (MQTT 5 only).
    #[must_use]
    pub fn properties_with(
        mut self,
        f: impl Fn(&Record) -> Option<PublishProperties> + Send + Sync + 'static,
    ) -> Self {
        self.properties = Properties::PerRecord(Box::new(f));
        self
    }

    pub(crate) fn has_properties(&self) -> bool {
        !matches!(self.properties, Properties::None)
            || self.headers != HeaderSelection::None
            || self.coordinates
    }

    /// The MQTT topic of a record: the template (default `{topic_root}/{key}`) rendered.
    pub(crate) fn topic(&self, r: &Record) -> Result<String, RejectReason> {
        self.template.render(r, |r| self.key_text(r), self.escape)
    }

    fn key_text(&self, r: &Record) -> Result<String, RejectReason> {
        match &self.key {
            KeySerializer::Utf8 => {
                let key = r.key.as_ref().ok_or(RejectReason::MissingKey)?;
                Ok(std::str::from_utf8(key)
                    .map_err(|_| RejectReason::KeyNotUtf8)?
                    .to_string())
            }
            KeySerializer::Custom(f) => f(r).map_err(RejectReason::KeySerializer),
        }
    }

    /// The payload of a record.
    pub(crate) fn payload(&self, r: &Record) -> Result<Bytes, RejectReason> {
        match &self.value {
            ValueSerializer::Json => Ok(r
                .value
                .clone()
                .unwrap_or_else(|| Bytes::from_static(b"null"))),
            ValueSerializer::Raw => Ok(r.value.clone().unwrap_or_default()),
            ValueSerializer::Custom(f) => f(r).map_err(RejectReason::ValueSerializer),
        }
    }

    pub(crate) fn retain(&self, r: &Record) -> bool {
        match &self.retain {
            Retain::Static(b) => *b,
            Retain::PerRecord(f) => f(r),
        }
    }

    /// Calls `with` with the properties of a record (borrowed when static and nothing is
    /// added per record).
    pub(crate) fn with_properties<T>(
        &self,
        r: &Record,
        with: impl FnOnce(Option<&PublishProperties>) -> T,
    ) -> T {
        let extra = self.headers != HeaderSelection::None || self.coordinates;
        match (&self.properties, extra) {
            (Properties::None, false) => with(None),
            (Properties::Static(p), false) => with(Some(p)),
            (base, _) => {
                let mut p = match base {
                    Properties::None => None,
                    Properties::Static(p) => Some(p.clone()),
                    Properties::PerRecord(f) => f(r),
                };
                if extra {
                    let p = p.get_or_insert_with(PublishProperties::default);
                    for h in &r.headers {
                        let wanted = match &self.headers {
                            HeaderSelection::All => true,
                            HeaderSelection::Only(names) => names.contains(&h.key),
                            _ => false,
                        };
                        if let Some(v) = h.value.as_deref().filter(|_| wanted) {
                            if let Ok(v) = std::str::from_utf8(v) {
                                p.user_properties.push((h.key.clone(), v.to_string()));
                            }
                        }
                    }
                    if self.coordinates {
                        p.user_properties
                            .push(("kafka.topic".into(), r.tp.topic.to_string()));
                        p.user_properties
                            .push(("kafka.partition".into(), r.tp.partition.to_string()));
                        p.user_properties
                            .push(("kafka.offset".into(), r.offset.to_string()));
                    }
                }
                with(p.as_ref())
            }
        }
    }
}
