//! Config: TOML with every option, defaults, and validation that reports every problem.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mqtt_sink_core::{Config, ErrorPolicy, MqttVersion};

#[test]
fn every_option_parses_from_toml() {
    let cfg = Config::from_toml_str(
        r#"
        client_id = "sink-a"
        server = "mqtt.example.com"
        port = 8883
        topic_root = "sensors"
        username = "user"
        password = "s3cret"
        version = "5"
        tls_enabled = true
        qos = 2
        flush_timeout = "15s"
        retain = true
        keepalive = "30s"
        ping_timeout = "3s"
        ack_timeout = "7s"
        connect_timeout = "9s"
        clean_session = false
        session_expiry = "10m"
        max_inflight = 500
        max_buffered_records = 5000
        max_buffered_bytes = 1048576
        reconnect_backoff_min = "200ms"
        reconnect_backoff_max = "10s"
        reconnect_jitter_seed = 42
        max_packet_size = 65536
        error_policy = "dead-letter"
        dead_letter_topic = "dlq"

        [properties]
        content_type = "application/json"
        payload_format_indicator = 1
        message_expiry_interval = 60
        response_topic = "replies"
        correlation_data = "abc"
        user_properties = [["source", "kafka"], ["env", "test"]]
        "#,
    )
    .unwrap();
    assert_eq!(cfg.version, MqttVersion::V5);
    assert_eq!(cfg.qos, 2);
    assert_eq!(cfg.flush_timeout, Duration::from_secs(15));
    assert_eq!(cfg.session_expiry, Duration::from_secs(600));
    assert_eq!(cfg.error_policy, ErrorPolicy::DeadLetter);
    let props = cfg.properties.as_ref().unwrap();
    assert_eq!(props.user_properties.len(), 2);
    assert_eq!(props.correlation_data.as_deref(), Some(&b"abc"[..]));
    assert_eq!(cfg.password.as_ref().unwrap().expose(), "s3cret");
    assert!(
        !format!("{cfg:?}").contains("s3cret"),
        "Debug hides the password"
    );
}

#[test]
fn defaults_match_the_quix_sink() {
    let cfg = Config::from_toml_str(
        r#"
        client_id = "c"
        server = "localhost"
        port = 1883
        topic_root = "t"
        "#,
    )
    .unwrap();
    assert_eq!(cfg.version, MqttVersion::V311);
    assert!(cfg.tls_enabled);
    assert_eq!(cfg.qos, 1);
    assert_eq!(cfg.flush_timeout, Duration::from_secs(10));
    assert!(!cfg.retain);
    assert_eq!(cfg.error_policy, ErrorPolicy::Fail);
    assert_eq!(cfg, Config::new("c", "localhost", 1883, "t"));
}

#[test]
fn versions_parse_in_every_written_form() {
    for (text, v) in [
        (r#""3.1""#, MqttVersion::V31),
        ("3.1", MqttVersion::V31),
        (r#""3.1.1""#, MqttVersion::V311),
        ("5", MqttVersion::V5),
        (r#""5""#, MqttVersion::V5),
    ] {
        let doc = format!(
            "client_id = \"c\"\nserver = \"h\"\nport = 1\ntopic_root = \"t\"\nversion = {text}\n"
        );
        assert_eq!(Config::from_toml_str(&doc).unwrap().version, v, "{text}");
    }
    let doc =
        "client_id = \"c\"\nserver = \"h\"\nport = 1\ntopic_root = \"t\"\nversion = \"4.0\"\n";
    let err = Config::from_toml_str(doc).unwrap_err().to_string();
    assert!(
        err.contains("version") && err.contains("\"3.1\", \"3.1.1\" or \"5\""),
        "{err}"
    );
}

#[test]
fn unknown_keys_name_the_key() {
    let doc = "client_id = \"c\"\nserver = \"h\"\nport = 1\ntopic_root = \"t\"\nqoss = 1\n";
    let err = Config::from_toml_str(doc).unwrap_err().to_string();
    assert!(err.contains("qoss"), "{err}");
}

#[test]
fn validation_reports_every_problem_at_once() {
    let mut cfg = Config::new("a-client-id-longer-than-23-bytes", "", 0, "bad/#");
    cfg.version = MqttVersion::V31;
    cfg.qos = 3;
    cfg.password = Some(mqtt_sink_core::Secret::new("hunter2"));
    cfg.properties = Some(Default::default());
    cfg.flush_timeout = Duration::ZERO;
    cfg.keepalive = Duration::from_millis(1500);
    cfg.max_inflight = 0;
    cfg.reconnect_backoff_max = Duration::from_millis(1);
    cfg.error_policy = ErrorPolicy::DeadLetter;
    let errs = cfg.validate().unwrap_err();
    let options: Vec<_> = errs.0.iter().map(|e| e.option.as_str()).collect();
    assert_eq!(
        options,
        vec![
            "client_id",
            "server",
            "port",
            "topic_root",
            "password",
            "qos",
            "flush_timeout",
            "properties",
            "keepalive",
            "max_inflight",
            "reconnect_backoff_max",
            "dead_letter_topic",
        ]
    );
    let text = errs.to_string();
    assert!(text.contains("12 problem(s)"), "{text}");
    assert!(text.contains("qos = 3: must be 0, 1 or 2"), "{text}");
    assert!(
        text.contains("MQTT 3.1 needs a client id of 1 to 23 bytes"),
        "{text}"
    );
    assert!(text.contains("port = 0"), "{text}");
    assert!(text.contains("wildcard '#'"), "{text}");
    assert!(text.contains("need version = \"5\""), "{text}");
    assert!(!text.contains("hunter2"), "secrets never appear: {text}");
}
