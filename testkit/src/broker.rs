//! Simulated MQTT broker (to be written).
