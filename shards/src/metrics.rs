//! Metric names recorded by `ferry-shards`. Labels are bounded: `slot` (≤ slot count), `result`,
//! `reason`, `tier`; never a conversation id.

/// Histogram: seconds from append admission to acknowledgement (durable).
pub const APPEND_ACK_SECONDS: &str = "ferry_append_ack_seconds";
/// Counter: appends by `result` (`ok`, `deduped`, `try_again`, `error`).
pub const APPENDS_TOTAL: &str = "ferry_appends_total";
/// Counter: `try_again` answers by `reason` (`mailbox_full`, `wal_full`, `archive_backlog`, …).
pub const TRY_AGAIN_TOTAL: &str = "ferry_try_again_total";
/// Histogram: seconds one `fdatasync` of the WAL took.
pub const WAL_FSYNC_SECONDS: &str = "ferry_wal_fsync_seconds";
/// Histogram: records per WAL write batch (group commit size).
pub const WAL_BATCH_RECORDS: &str = "ferry_wal_batch_records";
/// Counter: bytes written to the WAL.
pub const WAL_BYTES_TOTAL: &str = "ferry_wal_bytes_total";
/// Counter: records written to the WAL.
pub const WAL_RECORDS_TOTAL: &str = "ferry_wal_records_total";
/// Gauge: WAL segment files on disk.
pub const WAL_SEGMENTS: &str = "ferry_wal_segments";
/// Gauge: last durable LSN.
pub const WAL_DURABLE_LSN: &str = "ferry_wal_durable_lsn";
/// Gauge: archived-LSN checkpoint.
pub const WAL_CHECKPOINT_LSN: &str = "ferry_wal_checkpoint_lsn";
/// Gauge: 1 when the WAL is poisoned (a failed fsync); the node is then unready.
pub const WAL_POISONED: &str = "ferry_wal_poisoned";
/// Gauge: 1 while the WAL writer waits for disk space (`ENOSPC`): appends get `try_again`
/// (`disk_full`) until a write succeeds again; nothing is lost.
pub const WAL_DISK_FULL: &str = "ferry_wal_disk_full";
/// Counter: times the WAL found the disk full (one per episode).
pub const WAL_DISK_FULL_TOTAL: &str = "ferry_wal_disk_full_total";
/// Gauge: conversation actors alive, per `slot`.
pub const SLOT_CONVERSATIONS: &str = "ferry_slot_conversations";
/// Counter: appends per `slot`.
pub const SLOT_APPENDS_TOTAL: &str = "ferry_slot_appends_total";
/// Counter: conversation actor restarts after a failure.
pub const ACTOR_RESTARTS_TOTAL: &str = "ferry_actor_restarts_total";
/// Gauge: bytes held by hot rings node-wide.
pub const RING_BYTES: &str = "ferry_ring_bytes";
/// Gauge: bytes durable in the WAL but not yet archived.
pub const ARCHIVE_BACKLOG_BYTES: &str = "ferry_archive_backlog_bytes";
/// Gauge: the archive backlog (bytes) past which appends are refused (`archive_backlog`).
pub const ARCHIVE_BACKLOG_LIMIT_BYTES: &str = "ferry_archive_backlog_limit_bytes";
/// Gauge: records durable in the WAL but not yet archived.
pub const ARCHIVE_BACKLOG_RECORDS: &str = "ferry_archive_backlog_records";
/// Gauge: seconds between the oldest unarchived record becoming durable and now.
pub const ARCHIVE_LAG_SECONDS: &str = "ferry_archive_lag_seconds";
/// Counter: records archived to SQL.
pub const ARCHIVE_RECORDS_TOTAL: &str = "ferry_archive_records_total";
/// Histogram: seconds one archive batch took to commit.
pub const ARCHIVE_BATCH_SECONDS: &str = "ferry_archive_batch_seconds";
/// Histogram: per archived message, the time from durable (acknowledged) to stored in SQL.
pub const ARCHIVE_DELAY_SECONDS: &str = "ferry_archive_delay_seconds";
/// Counter: archive batch failures (retried with backoff).
pub const ARCHIVE_ERRORS_TOTAL: &str = "ferry_archive_errors_total";
/// Counter: catch-up reads by `tier` (`ring`, `sql`, `object`).
pub const CATCHUP_READS_TOTAL: &str = "ferry_catchup_reads_total";
