//! Metric names recorded by the node binary (the runtime's are in `ferry_shards::metrics`), and
//! the Prometheus recorder. Label values are bounded; never a conversation id.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: HTTP error answers by protocol `code`.
pub const HTTP_ERRORS_TOTAL: &str = "ferry_http_errors_total";
/// Counter: authentication failures by `reason`.
pub const AUTH_FAILURES_TOTAL: &str = "ferry_auth_failures_total";
/// Counter: requests refused by a rate limit, by `limit` (`appends`, `connects_per_ip`,
/// `auth_failures_per_ip`, `ephemeral`; `untracked` counts requests let through uncounted because
/// a limiter tracked its most keys).
pub const RATE_LIMITED_TOTAL: &str = "ferry_rate_limited_total";
/// Counter: API key lookups, by `result` (`cached`, `stored`, `unknown`, `negative_cached`,
/// `malformed`).
pub const API_KEY_LOOKUPS_TOTAL: &str = "ferry_api_key_lookups_total";
/// Counter: fetches of the JWT key set (`auth.jwt_jwks_url`), by `result` (`ok`, `error`).
pub const JWKS_FETCHES_TOTAL: &str = "ferry_jwks_fetches_total";
/// Counter: sockets and SSE streams ended because their token expired, by `transport`
/// (`websocket`, `sse`).
pub const TOKEN_EXPIRED_CLOSES_TOTAL: &str = "ferry_token_expired_closes_total";
/// Counter: sockets and SSE streams ended because their API key was revoked or its rotation
/// grace ended, by `transport`.
pub const REVOKED_CLOSES_TOTAL: &str = "ferry_revoked_closes_total";
/// Connections a listener closed as soon as it accepted them (`limits.max_connections`),
/// labelled `listener` (`public`, `admin`).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "ferry_connections_refused_total";
/// Connections open on a listener, labelled `listener`.
pub const CONNECTIONS_OPEN: &str = "ferry_connections_open";

/// Counter: segment objects read, by `result` (`fetched` from the object store, `cached`).
pub const SEGMENT_READS_TOTAL: &str = "ferry_segment_reads_total";
/// Counter: messages moved from SQL into segment objects.
pub const COMPACTED_MESSAGES_TOTAL: &str = "ferry_compaction_messages_total";
/// Counter: segment objects written by compaction.
pub const COMPACTED_SEGMENTS_TOTAL: &str = "ferry_compaction_segments_total";
/// Counter: failed compaction or retention steps, by `stage` (`object`, `sql`).
pub const COMPACTION_ERRORS_TOTAL: &str = "ferry_compaction_errors_total";
/// Histogram: duration of one compaction pass.
pub const COMPACTION_RUN_SECONDS: &str = "ferry_compaction_run_seconds";
/// Gauge: Unix time (seconds) of the last compaction pass that finished without error.
pub const COMPACTION_LAST_SUCCESS: &str = "ferry_compaction_last_success_timestamp_seconds";

/// Counter: messages deleted by retention, by `tier` (`sql`, `object`).
pub const RETENTION_DELETED_TOTAL: &str = "ferry_retention_deleted_messages_total";
/// Gauge: Unix time (seconds) of the last retention pass that finished without error.
pub const RETENTION_LAST_SUCCESS: &str = "ferry_retention_last_success_timestamp_seconds";

/// Gauge: nodes of the cluster by `state` (as this node last read the table).
pub const CLUSTER_NODES: &str = "ferry_cluster_nodes";
/// Counter: slot hand-overs this node carried out, by `result` (`ok`, `cancelled`).
pub const SLOT_MOVES_TOTAL: &str = "ferry_slot_moves_total";
/// Histogram: how long a moving slot held its appends (unavailability of the slot).
pub const SLOT_MOVE_SECONDS: &str = "ferry_slot_move_seconds";
/// Counter: requests forwarded to the owner of a conversation's slot, by `op`
/// (`append` counts appends, `read`, `inbox`).
pub const FORWARDED_TOTAL: &str = "ferry_forwarded_total";
/// Counter: gaps in the live fan-out that a subscriber filled from the owner.
pub const FANOUT_GAP_FILLS_TOTAL: &str = "ferry_fanout_gap_fills_total";
/// Fan-out messages dropped because they came from an older epoch of their slot.
pub const FANOUT_STALE_TOTAL: &str = "ferry_fanout_stale_total";
/// Counter: messages a returning node wrote into seqs a failover reserved for it.
pub const RESTORED_MESSAGES_TOTAL: &str = "ferry_restored_messages_total";
/// Histogram: duration of one lease renewal round trip.
pub const LEASE_RENEW_SECONDS: &str = "ferry_lease_renew_seconds";

pub fn count_http_error(code: &'static str) {
    metrics::counter!(HTTP_ERRORS_TOTAL, "code" => code).increment(1);
}

pub fn count_auth_failure(reason: &'static str) {
    metrics::counter!(AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
}

pub fn count_rate_limited(limit: &'static str) {
    metrics::counter!(RATE_LIMITED_TOTAL, "limit" => limit).increment(1);
}

/// Counts an API key lookup by its result. Every authenticated request makes one, so the
/// usual results' counters are looked up in the recorder once (the recorder is installed
/// before the server authenticates anything).
pub fn count_key_lookup(result: &'static str) {
    const USUAL: [&str; 2] = ["cached", "malformed"];
    static HANDLES: OnceLock<[metrics::Counter; 2]> = OnceLock::new();
    match USUAL.iter().position(|&r| r == result) {
        Some(i) => HANDLES
            .get_or_init(|| USUAL.map(|r| metrics::counter!(API_KEY_LOOKUPS_TOTAL, "result" => r)))
            [i]
            .increment(1),
        None => metrics::counter!(API_KEY_LOOKUPS_TOTAL, "result" => result).increment(1),
    }
}

pub fn count_jwks_fetch(result: &'static str) {
    metrics::counter!(JWKS_FETCHES_TOTAL, "result" => result).increment(1);
}

pub fn count_revoked_close(transport: &'static str) {
    metrics::counter!(REVOKED_CLOSES_TOTAL, "transport" => transport).increment(1);
}

pub fn count_token_expired_close(transport: &'static str) {
    metrics::counter!(TOKEN_EXPIRED_CLOSES_TOTAL, "transport" => transport).increment(1);
}

/// Installs the global recorder (histograms of seconds get buckets fine enough for sub-ms acks)
/// and starts its upkeep; call inside the runtime.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let batch_buckets = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), &batch_buckets)?
        .install_recorder()?;
    // Histogram samples are kept raw until they are folded into their buckets, which only a
    // scrape or an upkeep does: without this a node nobody scrapes would grow by every latency
    // it records (tens of MB an hour per histogram at thousands of appends a second).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
