//! Metric names of the WebSocket gateway. Label values are bounded: protocol codes, close
//! reasons and topic kinds, never a conversation or participant id.

/// Gauge: open WebSocket connections.
pub const CONNECTIONS: &str = "ferry_ws_connections";
/// Gauge: joined channels (topics) across all sockets, by `kind` (`conversation` | `inbox`).
pub const CHANNELS: &str = "ferry_ws_channels";
/// Gauge: topics' append pipelines running (a topic's runs from its first `send` until it has
/// been idle for a second with nothing in flight).
pub const APPEND_PIPELINES: &str = "ferry_ws_append_pipelines";
/// Counter: text frames received from clients.
pub const FRAMES_IN_TOTAL: &str = "ferry_ws_frames_in_total";
/// Counter: frames written to clients.
pub const FRAMES_OUT_TOTAL: &str = "ferry_ws_frames_out_total";
/// Counter: error replies and error closes, by `reason` (a protocol code such as `invalid`, or a
/// close reason: `malformed`, `violation`, `too_large_frame`, `idle`, `read_error`).
pub const ERRORS_TOTAL: &str = "ferry_ws_errors_total";
/// Counter: ephemeral events (`chunk`, `typing`) a slow socket missed because it lagged behind
/// the conversation's ephemeral fan-out.
pub const EPHEMERAL_DROPPED_TOTAL: &str = "ferry_ws_ephemeral_dropped_total";
/// Counter: upgrade requests refused before the upgrade, by `reason` (`vsn`, `unauthorized`,
/// `not_websocket`).
pub const REJECTED_TOTAL: &str = "ferry_ws_rejected_total";

pub fn error(reason: &'static str) {
    metrics::counter!(ERRORS_TOTAL, "reason" => reason).increment(1);
}

pub fn rejected(reason: &'static str) {
    metrics::counter!(REJECTED_TOTAL, "reason" => reason).increment(1);
}

/// The frame counters, looked up once per socket (a registry lookup per frame showed in
/// profiles).
pub fn frames_in() -> metrics::Counter {
    metrics::counter!(FRAMES_IN_TOTAL)
}

pub fn frames_out() -> metrics::Counter {
    metrics::counter!(FRAMES_OUT_TOTAL)
}

pub fn ephemeral_dropped() {
    metrics::counter!(EPHEMERAL_DROPPED_TOTAL).increment(1);
}

/// Counts one of something in a label-less gauge for as long as it lives: a connection
/// ([`CONNECTIONS`]), a running append pipeline ([`APPEND_PIPELINES`]).
pub struct Counted(&'static str);

impl Counted {
    pub fn open(gauge: &'static str) -> Counted {
        metrics::gauge!(gauge).increment(1.0);
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Counts a joined channel for as long as the join lasts.
pub struct ChannelGauge(&'static str);

impl ChannelGauge {
    pub fn open(kind: &'static str) -> ChannelGauge {
        metrics::gauge!(CHANNELS, "kind" => kind).increment(1.0);
        ChannelGauge(kind)
    }
}

impl Drop for ChannelGauge {
    fn drop(&mut self) {
        metrics::gauge!(CHANNELS, "kind" => self.0).decrement(1.0);
    }
}
