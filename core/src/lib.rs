//! mqtt-sink core (being written).
