//! `mqtt-sink`: the Kafka-to-MQTT daemon.
//!
//! ```text
//! mqtt-sink run   --config sink.toml [--runtime tokio|blocking]
//! mqtt-sink check --config sink.toml [--offline]
//! mqtt-sink health --config sink.toml
//! mqtt-sink demo  [--records N] [--mqtt-version 3.1.1|5]
//! ```
//!
//! Exit codes: 0 stopped cleanly; 1 failed while running (Kafka or MQTT setup); 2 bad
//! command line or configuration (nothing was connected); 3 `check` found a problem;
//! 130 a second SIGINT/SIGTERM cut a graceful stop short.

mod config;
mod demo;
mod http;
mod probe;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use mqtt_sink_core::{Event, LostReason, OffsetList};

use config::DaemonConfig;
use http::Metrics;

#[derive(Parser, Debug)]
#[command(name = "mqtt-sink", version, about = "Kafka to MQTT, no record lost")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume Kafka and publish to MQTT until SIGINT/SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// The driver: tokio (default) or plain threads.
        #[arg(long, value_enum, default_value_t = Runtime::Tokio)]
        runtime: Runtime,
    },
    /// Show it working with no external service: in-process Kafka and MQTT broker, sample
    /// sensor readings bridged, live progress, then a summary.
    Demo {
        /// How many records.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        /// MQTT version.
        #[arg(long, value_enum, default_value_t = DemoVersion::V5)]
        mqtt_version: DemoVersion,
    },
    /// Ask a running daemon's `/healthz` (for a container HEALTHCHECK, which has no curl):
    /// exit 0 when it answers 200 within 3 s, else 1. The address is `[http] listen` of
    /// the config (an unspecified address such as 0.0.0.0 is asked on loopback).
    Health {
        /// The TOML config file the daemon runs with.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
    },
    /// Validate the config, then connect to Kafka (topic metadata) and to the MQTT broker
    /// (CONNACK, negotiated limits) without consuming.
    Check {
        /// The TOML config file.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Validate only; connect to nothing.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum DemoVersion {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Runtime {
    Tokio,
    Blocking,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::Blocking => "blocking",
        }
    }
}

/// `--config` from the environment (the container image sets it).
const CONFIG_ENV: &str = config::CONFIG_ENV;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_CHECK: u8 = 3;
const EXIT_SECOND_SIGNAL: i32 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    match cli.command {
        Command::Demo {
            records,
            mqtt_version,
        } => {
            let v = match mqtt_version {
                DemoVersion::V311 => mqtt_sink_core::MqttVersion::V311,
                DemoVersion::V5 => mqtt_sink_core::MqttVersion::V5,
            };
            match demo::run(records, v) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("demo: not every record arrived and was committed within 120 s");
                    ExitCode::from(EXIT_RUNTIME)
                }
                Err(e) => {
                    eprintln!("demo: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Health { config } => match config::load(&config, &env) {
            Ok(cfg) => match http::probe_health(&cfg.http.listen) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            },
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Check { config, offline } => match config::load(&config, &env) {
            Ok(cfg) => {
                println_out(&format!(
                    "config ok: Kafka {} group {} topics {:?} -> MQTT {} (v{}, QoS {}, TLS {})",
                    cfg.kafka.brokers,
                    cfg.kafka.group_id,
                    cfg.kafka.topics,
                    cfg.mqtt.addresses_text(),
                    cfg.mqtt.version,
                    cfg.mqtt.qos,
                    if cfg.mqtt.tls_enabled { "on" } else { "off" }
                ));
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                if offline {
                    return ExitCode::SUCCESS;
                }
                let (lines, ok) = probe::probe(&cfg);
                for l in lines {
                    println_out(&l);
                }
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_CHECK)
                }
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config, runtime } => {
            let cfg = match config::load(&config, &env) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&cfg);
            run(cfg, runtime)
        }
    }
}

#[allow(clippy::print_stdout)]
fn println_out(s: &str) {
    println!("{s}");
}

fn init_logging(cfg: &DaemonConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Colour codes only for a person at a terminal: not in a file, a pipe or a container log,
/// and not when `NO_COLOR` is set to anything but "" (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs a core event (per-record acknowledgements only at debug level).
fn log_event(e: &Event) {
    match e {
        Event::RecordAcknowledged(_) => tracing::trace!("{e}"),
        // A flush completes every commit interval: the commits show in the metrics.
        Event::OpenTransport { .. }
        | Event::CloseTransport { .. }
        | Event::FlushCompleted { .. } => {
            tracing::debug!("{e}")
        }
        Event::Connected(_) | Event::Closed => tracing::info!("{e}"),
        Event::ConnectionLost(LostReason::AckTimeout { .. } | LostReason::WriteStalled { .. }) => {
            tracing::warn!("{e}")
        }
        Event::Fatal(_) => tracing::error!("{e}"),
        Event::QosDowngraded { .. } => tracing::warn!("{e}"),
        Event::ConnectFailed(_)
        | Event::ConnectionLost(_)
        | Event::RecordRejected { .. }
        | Event::DeadLetter { .. }
        | Event::FlushFailed { .. }
        | Event::FlushTimedOut { .. } => tracing::warn!("{e}"),
        _ => tracing::info!("{e}"),
    }
}

/// SIGINT/SIGTERM set `stop`; a second one exits at once with 130.
fn install_signals(stop: &Arc<AtomicBool>) -> Result<(), String> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_SECOND_SIGNAL, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    Ok(())
}

fn run(cfg: DaemonConfig, runtime: Runtime) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = install_signals(&stop) {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    tracing::info!(
        runtime = runtime.name(),
        kafka = %cfg.kafka.brokers,
        group = %cfg.kafka.group_id,
        topics = %cfg.kafka.topics.join(","),
        mqtt = %cfg.mqtt.addresses_text(),
        version = env!("CARGO_PKG_VERSION"),
        "mqtt-sink starting"
    );
    let effective = config::effective(&cfg)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!("effective configuration (secrets masked): {effective}");
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::default());
    metrics.attach_watermarks(&cfg.kafka);
    if !cfg.http.listen.is_empty() {
        if let Err(e) = http::serve(&cfg.http.listen, metrics.clone()) {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        tracing::info!("metrics on http://{}/metrics", cfg.http.listen);
    }
    let result = match runtime {
        Runtime::Blocking => run_blocking(cfg, &stop, metrics),
        Runtime::Tokio => run_tokio(cfg, stop.clone(), metrics),
    };
    match result {
        Ok(stats) => {
            tracing::info!(
                consumed = stats.consumed,
                commits = stats.commits,
                rewinds = stats.rewinds,
                committed = %OffsetList(&stats.committed),
                "mqtt-sink stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn observer(metrics: Arc<Metrics>) -> impl Fn(&Event) + Send + Sync + 'static {
    move |e| {
        metrics.observe(e);
        log_event(e);
    }
}

fn run_blocking(
    cfg: DaemonConfig,
    stop: &AtomicBool,
    metrics: Arc<Metrics>,
) -> Result<mqtt_sink_core::BridgeStats, String> {
    let obs = observer(metrics.clone());
    let bridge = mqtt_sink_blocking::Bridge::builder(cfg.kafka, cfg.mqtt)
        // `config::parse` added the per-instance suffix (L8).
        .client_id_suffix("")
        .sink(move |s| s.on_event(obs))
        .start()
        .map_err(|e| e.to_string())?;
    let client = bridge.sink_client();
    metrics.attach(bridge.stats_handle(), move || client.stats().ok());
    bridge.run(stop).map_err(|e| e.to_string())
}

fn run_tokio(
    cfg: DaemonConfig,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<mqtt_sink_core::BridgeStats, String> {
    // Multi-thread even with one worker: rebalance callbacks flush with `block_in_place`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.tokio.worker_threads)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    rt.block_on(async move {
        let obs = observer(metrics.clone());
        let bridge = mqtt_sink_tokio::Bridge::builder(cfg.kafka, cfg.mqtt)
            // `config::parse` added the per-instance suffix (L8).
            .client_id_suffix("")
            .sink(move |s| s.on_event(obs))
            .start()
            .map_err(|e| e.to_string())?;
        let client = bridge.sink_client();
        metrics.attach(bridge.stats_handle(), move || client.stats_blocking().ok());
        let stopped = async move {
            // The signal handler sets the flag; check it a few times a second.
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        };
        bridge.run(stopped).await.map_err(|e| e.to_string())
    })
}
