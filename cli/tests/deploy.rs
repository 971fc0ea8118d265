//! The deployment files users start from (issue 13 points 4 and 5): `deploy/compose.yaml`,
//! `deploy/k8s/*.yaml`, `deploy/sink.toml` and the root `Dockerfile` parse and hold what
//! the README promises. The compose group itself runs in `cli/tests/image.rs`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A key of a service, looked up through a `<<: *anchor` merge.
fn key<'a>(service: &'a Yaml, k: &str) -> &'a Yaml {
    match &service[k] {
        Yaml::BadValue => &service["<<"][k],
        v => v,
    }
}

/// `mqtt-sink check --offline` on a config text.
fn check(name: &str, text: &str, env: &[(&str, &str)]) {
    let dir = std::env::temp_dir().join(format!("mqtt-sink-deploy-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("sink.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_mqtt-sink"));
    c.args(["check", "--offline", "--config", cfg.to_str().unwrap()]);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn compose_starts_kafka_mosquitto_and_three_replicas_on_distinct_metrics_ports() {
    let doc = &yaml("deploy/compose.yaml")[0];
    let services = doc["services"].as_hash().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for s in [
        "kafka",
        "kafka-init",
        "mosquitto",
        "sink-1",
        "sink-2",
        "sink-3",
    ] {
        assert!(names.contains(s), "service {s} missing: {names:?}");
    }
    let mut host_ports = BTreeSet::new();
    let mut suffixes = BTreeSet::new();
    for s in ["sink-1", "sink-2", "sink-3"] {
        let svc = &doc["services"][s];
        assert_eq!(
            key(svc, "build")["dockerfile"].as_str(),
            Some("Dockerfile"),
            "{s}"
        );
        assert_eq!(key(svc, "build")["context"].as_str(), Some(".."), "{s}");
        let volumes = key(svc, "volumes").as_vec().unwrap();
        assert!(
            volumes
                .iter()
                .any(|v| v.as_str() == Some("./sink.toml:/etc/mqtt-sink/sink.toml:ro")),
            "{s}: the config is mounted where the image reads it"
        );
        let ports = key(svc, "ports").as_vec().unwrap();
        assert_eq!(ports.len(), 1, "{s}");
        let (host, container) = ports[0].as_str().unwrap().split_once(':').unwrap();
        assert_eq!(container, "9464", "{s}: the image's metrics port");
        assert!(
            host_ports.insert(host.to_string()),
            "{s}: host port {host} reused"
        );
        let suffix = key(svc, "environment")["MQTT_SINK_MQTT_CLIENT_ID_SUFFIX"]
            .as_str()
            .unwrap();
        assert!(
            suffixes.insert(suffix.to_string()),
            "{s}: client id suffix reused"
        );
        let grace = key(svc, "stop_grace_period").as_str().unwrap();
        assert!(grace.ends_with('s') && grace.trim_end_matches('s').parse::<u32>().unwrap() > 10);
    }
    // The replicas' config: one group, the compose service names, valid.
    let cfg = std::fs::read_to_string(root().join("deploy/sink.toml")).unwrap();
    assert!(cfg.contains("brokers = \"kafka:9092\"") && cfg.contains("server = \"mosquitto\""));
    check(
        "compose",
        &cfg,
        &[("MQTT_SINK_MQTT_CLIENT_ID_SUFFIX", "sink-1")],
    );
}

#[test]
fn kubernetes_manifests_parse_and_probe_health_and_readiness() {
    let mut kinds = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("deploy/k8s")).unwrap() {
        let p = entry.unwrap().path();
        let rel = p
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        for doc in yaml(&rel) {
            assert!(doc["apiVersion"].as_str().is_some(), "{rel}: apiVersion");
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "Deployment" => {
                    let pod = &doc["spec"]["template"];
                    let ann = &pod["metadata"]["annotations"];
                    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
                    assert_eq!(ann["prometheus.io/port"].as_str(), Some("9464"));
                    assert_eq!(
                        pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
                        Some(true)
                    );
                    let c = &pod["spec"]["containers"][0];
                    assert_eq!(c["ports"][0]["containerPort"].as_i64(), Some(9464));
                    assert_eq!(
                        c["livenessProbe"]["httpGet"]["path"].as_str(),
                        Some("/healthz")
                    );
                    assert_eq!(
                        c["readinessProbe"]["httpGet"]["path"].as_str(),
                        Some("/readyz")
                    );
                    let env: Vec<&str> = c["env"]
                        .as_vec()
                        .unwrap()
                        .iter()
                        .filter_map(|e| e["name"].as_str())
                        .collect();
                    assert!(env.contains(&"MQTT_SINK_MQTT_CLIENT_ID_SUFFIX"), "{env:?}");
                    assert!(
                        pod["spec"]["terminationGracePeriodSeconds"]
                            .as_i64()
                            .unwrap()
                            > 10
                    );
                }
                "ConfigMap" => {
                    let text = doc["data"]["sink.toml"].as_str().unwrap();
                    check("k8s", text, &[("MQTT_SINK_MQTT_PASSWORD", "x")]);
                }
                other => panic!("{rel}: unexpected kind {other}"),
            }
            kinds.insert(kind);
        }
    }
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap".into(), "Deployment".into()])
    );
}

#[test]
fn the_dockerfile_runs_the_daemon_as_non_root_with_a_health_check() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(lines.contains(&"USER 65532:65532"), "non-root");
    assert!(lines.contains(&"ENTRYPOINT [\"/usr/local/bin/mqtt-sink\"]"));
    assert!(lines.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(lines.contains(&"CMD [\"/usr/local/bin/mqtt-sink\", \"health\"]"));
    // The build context leaves out the build output.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}
