//! The `mqtt-sink` daemon.
//!
//! **Placeholder.** The daemon (`run`, `check`, `demo`) is built by the daemon issue; for now
//! the binary only validates a TOML config so that the workspace has its final shape.

fn main() {
    eprintln!(
        "mqtt-sink: the daemon is not built yet (see README.md); only the library core exists"
    );
    std::process::exit(2);
}
