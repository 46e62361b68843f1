//! The SQL archive: conversations, participants, messages, read cursors and API keys.
//!
//! Two backends behind one handle, chosen by the database URL:
//! - **SQLite** (`sqlite://PATH`, the embedded default): WAL journal, `synchronous = FULL`, so a
//!   committed archive batch survives power loss before the node's own WAL drops it.
//! - **Postgres** (`postgres://…`, production): a pool of `archive.pool_size` connections, each
//!   with the server-side `statement_timeout` set at connect time, so a stuck statement fails (and
//!   the archiver retries) instead of holding a connection forever, and with
//!   `synchronous_commit = on`: the archiver lets the WAL delete records once their batch
//!   committed, so a commit must be flushed (and, with synchronous standbys, replicated) before it
//!   returns — whatever the server's or the role's default says, and whatever `options` the URL
//!   carries (ours come last and win).
//!
//! Every statement that is portable is written once, with `$N` placeholders (which SQLite accepts
//! too), and runs on whichever pool the store holds through [`with_pool!`]; rows are decoded into
//! plain tuples so the conversion code is shared as well. Only what cannot be portable differs:
//! the batched message insert (a multi-row `VALUES` on SQLite, `UNNEST` of arrays on Postgres,
//! both `ON CONFLICT DO NOTHING`), timestamps (`TEXT` on SQLite, `TIMESTAMPTZ` on Postgres) and
//! the row lock taken when a conversation is updated. Statements are runtime-checked
//! `sqlx::query` calls; every one is exercised by the integration tests on both backends.
//!
//! Postgres keeps JSON as `JSONB`, which normalises it: an object read back has the same members
//! and values but not necessarily the client's key order or spacing. JSONB also refuses a few
//! things plain JSON allows (`\u0000`, lone surrogates, numbers beyond `numeric`'s range); the
//! gateway rejects those with [`check_storable_json`] on every backend, so a stored message can
//! never wedge the archiver. It also rejects values nested deeper than [`MAX_JSON_DEPTH`], which
//! could be stored but not served back inside a page or a push.
//!
//! With a cold tier attached ([`Store::with_cold_tier`]), reads merge SQL with segment objects:
//! compaction ([`crate::compactor`]) only ever moves a conversation's *oldest* messages out of
//! SQL, so a read consults the segment index only when SQL cannot answer from the requested side
//! (ascending: the first SQL row is not `after_seq + 1`; descending: SQL had fewer than `limit`).
//! `last_seq` takes the segments into account, so a conversation whose every message was
//! compacted still continues at the right seq.
//!
//! This module implements [`ferry_shards::archive::Archive`] for the node runtime.
//!
//! # Layout
//!
//! One file per concern, each adding an `impl Store` block to the handle defined here:
//! - `conversations.rs`: conversations, their participants and metadata;
//! - `keys.rs`: API keys;
//! - `cursors.rs`: read and ack cursors, and the inbox's unread counts;
//! - `messages.rs`: reading messages from SQL, `last_seq`, the idempotency keys a writer reloads;
//! - `insert.rs`: storing archive batches (multi-row `INSERT` on SQLite, `COPY` on Postgres) and
//!   the cluster's fence check inside that transaction;
//! - `segments.rs`: the cold tier's segment index and reads merged across SQL and segments;
//! - `compaction.rs`: the queries the compactor moves messages out of SQL with;
//! - `retention.rs`: deleting expired history, and the `expired_through_seq` it leaves behind;
//! - [`check_storable_json`], the gateway's check that a value can be stored, lives in
//!   [`ferry_codec::storable`] (where the fuzz targets reach it) and is re-exported here.
//!
//! This file holds the handle itself: backend selection, connecting, migrations, [`with_pool!`],
//! the fence a cluster member writes under, and the [`Archive`] glue.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use ferry_shards::archive::{
    Archive, ArchiveError, BoxFuture, ConversationSnapshot, ConversationSummary,
};
use ferry_shards::ids::ConversationId;
use ferry_shards::record::Message;

use crate::cold::{ColdError, ColdTier};

/// Runs `$body` with `$pool` bound to whichever pool the store holds. The body is compiled once
/// per backend, so everything in it must be portable: `$N` placeholders, standard SQL, and
/// column types that decode the same way on both (see the `*Row` tuple types).
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

mod compaction;
mod conversations;
mod cursors;
mod insert;
mod keys;
mod messages;
mod retention;
mod segments;

pub use conversations::Upserted;
pub use ferry_codec::storable::{check_storable_json, MAX_JSON_DEPTH};
pub use keys::{KeyChange, KeyRow, NewKey};
pub use segments::SegmentRow;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Name prefix of sqlx's SQLite worker threads (one per connection; the kernel keeps 15 bytes), so
/// `top -H` and the benchmarks can tell the archive's CPU from the rest.
const SQLITE_THREAD: &str = "ferry-sqlite-";
/// Archive batches stored at once on Postgres (see `Archive::max_concurrent_batches`). Measured
/// with `cargo bench --bench archive -- pg-insert` on 2 cores: 3 beat 2 (docs/benchmarks.md).
const POSTGRES_CONCURRENT_BATCHES: usize = 3;
/// SQLite page size for new databases (bytes), SQLite's own default. An archive transaction
/// rewrites one `(conversation_id, seq)` index leaf per conversation it touches, whole: with
/// 16 KiB pages a batch over 1,000 conversations wrote about 16 MB to SQLite's WAL, and those
/// leaves did not fit the 8 MiB cache. Existing files keep the size they were made with.
const SQLITE_PAGE_SIZE: u32 = 4 * 1024;
/// SQLite page cache per connection, in KiB when negative (SQLite's convention): 8 MiB (the
/// default is 2 MB), so an archive transaction's index pages stay cached instead of being read
/// back from the file. All connections together stay near `SQLITE_SOFT_HEAP_LIMIT`.
const SQLITE_CACHE_SIZE: &str = "-8192";
/// SQLite's soft heap limit, in bytes, for all connections of the process together: past it,
/// SQLite frees the least recently used unpinned pages of any connection's cache before it
/// allocates more (the bundled build has `SQLITE_ENABLE_MEMORY_MANAGEMENT`).
/// Without it, every pooled connection fills its own cache with largely the same pages while
/// readers page through history (8 connections held about 95 MB in the mixed load run).
const SQLITE_SOFT_HEAP_LIMIT: &str = "33554432";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?} (expected sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
    #[error("stored data invalid: {0}")]
    Invalid(String),
    #[error("cold tier: {0}")]
    Cold(#[from] ColdError),
    /// An archive write of a slot this node does not own at the epoch it serves it at.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl From<StoreError> for ArchiveError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(s) => ArchiveError::Invalid(s),
            other => ArchiveError::Unavailable(other.to_string()),
        }
    }
}

/// Which SQL backend a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// How the pool behaves; from the `[archive]` config section.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections open at once.
    pub pool_size: u32,
    /// Postgres cancels any statement running longer (`statement_timeout`), so a stuck archive
    /// batch fails and is retried instead of holding its connection. SQLite: the busy timeout.
    pub statement_timeout: Duration,
    /// How long a caller waits for a connection before the archive counts as unavailable (while
    /// the database is down this bounds how long a read that needs SQL can hang).
    pub acquire_timeout: Duration,
    /// Postgres ends a transaction left idle this long (a cluster member sets it well below its
    /// lease: a paused node must not keep the slot-row locks of its archive transaction).
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl StoreOptions {
    pub fn with_pool_size(pool_size: u32) -> StoreOptions {
        StoreOptions {
            pool_size,
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: None,
        }
    }
}

/// The cheap, cloneable handle to the archive database (and the cold tier, when attached).
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// Segment objects holding messages compacted out of SQL.
    cold: Option<Arc<ColdTier>>,
    /// `expired_through_seq` of conversations read so far (see `first_available_seq`).
    expired: Arc<std::sync::Mutex<HashMap<ConversationId, u64>>>,
    /// In a cluster: every archive write checks, inside its transaction, that this node owns
    /// each slot of the batch at the epoch it serves it at.
    fence: Option<Arc<Fence>>,
    /// In a cluster: its slot count. A conversation created then records, in the same
    /// transaction, that no earlier failover of its slot reserves seqs in it.
    cluster_slots: Option<u32>,
}

/// What an archive write of a cluster member is checked against (see `Store::with_fence`).
pub struct Fence {
    pub node_id: String,
    /// The epochs this node serves its slots at.
    pub gates: Arc<ferry_shards::gate::Gates>,
    pub db: crate::cluster::db::ClusterDb,
}

impl Fence {
    /// `(slot, epoch, oldest)` for every slot of a batch: the epoch this node serves the slot
    /// at, which the batch is written under, and the oldest epoch any of its messages of that
    /// slot was written under (`0`: a record from before epochs were logged). A slot not owned
    /// here refuses the batch.
    fn epochs(&self, messages: &[Arc<Message>]) -> Result<Vec<(u32, u64, u64)>, StoreError> {
        let mut oldest: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for m in messages {
            let e = oldest.entry(m.slot).or_insert(m.epoch);
            *e = (*e).min(m.epoch);
        }
        oldest
            .into_iter()
            .map(|(slot, oldest)| {
                self.gates
                    .owned_epoch(slot)
                    .map(|epoch| (slot, epoch, oldest))
                    .ok_or_else(|| {
                        StoreError::Fenced(format!("slot {slot} is not owned by this node"))
                    })
            })
            .collect()
    }
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Store {
    /// Opens the database `url` names with a pool of `pool_size` and default timeouts.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Store, StoreError> {
        Store::connect_with(url, &StoreOptions::with_pool_size(pool_size)).await
    }

    pub async fn connect_with(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        let db = match Backend::of_url(url)? {
            Backend::Sqlite => {
                let connect = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    // Only takes effect on a new database file.
                    .page_size(SQLITE_PAGE_SIZE)
                    .pragma("cache_size", SQLITE_CACHE_SIZE)
                    .pragma("soft_heap_limit", SQLITE_SOFT_HEAP_LIMIT)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(options.statement_timeout)
                    .foreign_keys(false);
                let pool = SqlitePoolOptions::new()
                    .max_connections(options.pool_size.max(2))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect.thread_name(|id| format!("{SQLITE_THREAD}{id}")))
                    .await?;
                Db::Sqlite(pool)
            }
            Backend::Postgres => {
                let timeout_ms = options.statement_timeout.as_millis().max(1);
                let connect = PgConnectOptions::from_str(url)?
                    .application_name("ferry")
                    .options([
                        ("statement_timeout", timeout_ms.to_string()),
                        ("synchronous_commit", "on".to_owned()),
                    ]);
                let connect = match options.idle_in_transaction_timeout {
                    Some(idle) => connect.options([(
                        "idle_in_transaction_session_timeout",
                        idle.as_millis().max(1).to_string(),
                    )]),
                    None => connect,
                };
                let pool = PgPoolOptions::new()
                    .max_connections(options.pool_size.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect)
                    .await?;
                Db::Postgres(pool)
            }
        };
        Ok(Store {
            db,
            cold: None,
            expired: Arc::default(),
            fence: None,
            cluster_slots: None,
        })
    }

    /// Archive writes are fenced from now on (a cluster member; Postgres only).
    pub fn with_fence(mut self, fence: Fence) -> Store {
        self.fence = Some(Arc::new(fence));
        self
    }

    /// A cluster member's store (Postgres only): see `cluster_slots`.
    pub fn in_cluster(mut self, slot_count: u32) -> Store {
        self.cluster_slots = Some(slot_count);
        self
    }

    /// Reads merge this cold tier below SQL from now on.
    pub fn with_cold_tier(mut self, cold: Arc<ColdTier>) -> Store {
        self.cold = Some(cold);
        self
    }

    pub fn cold_tier(&self) -> Option<&Arc<ColdTier>> {
        self.cold.as_ref()
    }

    pub fn backend(&self) -> Backend {
        match self.db {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// How a commit of this store's connections reaches the disk, as the database reports it
    /// for the connection that answers: Postgres' `synchronous_commit` (set to `on` for every
    /// connection), SQLite's `synchronous` (`2`, FULL).
    pub async fn commit_durability(&self) -> Result<String, StoreError> {
        let value = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                    .fetch_one(pool)
                    .await?
            }
            Db::Sqlite(pool) => sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
                .fetch_one(pool)
                .await?
                .to_string(),
        };
        Ok(value)
    }

    /// Applies the backend's migrations (`migrations/sqlite` or `migrations/postgres`). Safe to
    /// run repeatedly and, on Postgres, from several processes at once (sqlx takes an advisory
    /// lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            Db::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

impl Archive for Store {
    fn load_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
        dedupe_window: usize,
    ) -> BoxFuture<'a, Result<Option<ConversationSnapshot>, ArchiveError>> {
        Box::pin(async move { Ok(self.load(id, dedupe_window).await?) })
    }

    /// Two small reads (the row, the last seq), without the idempotency keys a load fetches.
    fn describe_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
    ) -> BoxFuture<'a, Result<Option<ConversationSummary>, ArchiveError>> {
        Box::pin(async move {
            let Some(meta) = self.conversation(id).await? else {
                return Ok(None);
            };
            let last_seq = self.last_seq(id).await?;
            Ok(Some(ConversationSummary { meta, last_seq }))
        })
    }

    fn store_messages<'a>(
        &'a self,
        messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, Result<(), ArchiveError>> {
        Box::pin(async move { Ok(self.insert_messages(messages).await?) })
    }

    /// SQLite has one writer, so a second batch would only wait for the first. Postgres inserts
    /// batches in parallel, one transaction per connection (its backends use every core).
    fn max_concurrent_batches(&self) -> usize {
        match &self.db {
            Db::Sqlite(_) => 1,
            Db::Postgres(_) => POSTGRES_CONCURRENT_BATCHES,
        }
    }

    fn read_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ArchiveError>> {
        Box::pin(async move {
            Ok(self
                .read(id, after_seq, before_seq, limit, newest_first)
                .await?)
        })
    }
}

/// Seqs and cursors are u64 in the protocol and BIGINT in SQL; anything above `i64::MAX` (only
/// ever an open upper bound) is clamped.
fn to_i64(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// The URL with any password replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn sqlite_commits_with_synchronous_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let store = Store::connect(&url, 2).await.expect("open");
        assert_eq!(store.commit_durability().await.expect("pragma"), "2");
        store.close().await;
    }

    /// Every connection's page cache is bounded, and all of them together by the soft heap
    /// limit (a process-wide setting each new connection re-applies).
    #[tokio::test]
    async fn sqlite_page_caches_are_bounded_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let store = Store::connect(&url, 2).await.expect("open");
        let Db::Sqlite(pool) = &store.db else {
            unreachable!("sqlite url")
        };
        for (pragma, expected) in [
            ("cache_size", SQLITE_CACHE_SIZE),
            ("soft_heap_limit", SQLITE_SOFT_HEAP_LIMIT),
        ] {
            let value: i64 = sqlx::query_scalar(&format!("PRAGMA {pragma}"))
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(value.to_string(), expected, "{pragma}");
        }
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(
            page_size,
            i64::from(SQLITE_PAGE_SIZE),
            "a new file's page size"
        );
        store.close().await;
    }

    /// Migration 0003 rebuilds SQLite's `messages` as a rowid table: rows archived under the
    /// earlier schema survive it, in order, and the primary key still refuses duplicates.
    #[tokio::test]
    async fn sqlite_messages_table_rebuild_keeps_archived_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        {
            let pool = SqlitePoolOptions::new()
                .connect_with(
                    SqliteConnectOptions::from_str(&url)
                        .unwrap()
                        .create_if_missing(true),
                )
                .await
                .expect("open");
            let first_two: Vec<_> = SQLITE_MIGRATIONS.iter().take(2).cloned().collect();
            assert_eq!(first_two.last().map(|m| m.version), Some(2));
            let before = sqlx::migrate::Migrator {
                migrations: first_two.into(),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            before.run(&pool).await.expect("migrations 1-2");
            for (conv, seq) in [("b", 1), ("a", 1), ("a", 2), ("b", 2), ("a", 3)] {
                sqlx::query(
                    "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) \
                     VALUES ($1, $2, $3, 'alice', 'text', '\"hi\"', '{}', '2026-11-23T00:00:00.000Z', $4, NULL, 7)",
                )
                .bind(conv)
                .bind(seq)
                .bind(Uuid::now_v7().to_string())
                .bind(1_700_000_000_000i64 + seq)
                .execute(&pool)
                .await
                .expect("insert under the old schema");
            }
            pool.close().await;
        }
        let store = Store::connect(&url, 2).await.expect("connect");
        store.migrate().await.expect("migrate to the latest");
        let Db::Sqlite(pool) = &store.db else {
            unreachable!("sqlite url")
        };
        let (sql,): (String,) = sqlx::query_as(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
        )
        .fetch_one(pool)
        .await
        .expect("schema");
        assert!(!sql.to_uppercase().contains("WITHOUT ROWID"), "{sql}");
        assert!(sql.contains("PRIMARY KEY (conversation_id, seq)"), "{sql}");
        let id = ConversationId::parse("a").unwrap();
        let seqs: Vec<u64> = store
            .read(&id, 0, u64::MAX, 10, false)
            .await
            .expect("read")
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        let duplicate = sqlx::query(
            "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) \
             VALUES ('a', 2, 'x', 'alice', 'text', '1', '{}', '', 0, NULL, 7)",
        )
        .execute(pool)
        .await;
        assert!(duplicate.is_err(), "the primary key still holds");
    }

    #[test]
    fn backend_follows_the_url_scheme() {
        assert_eq!(Backend::of_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::of_url("sqlite::memory:").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::of_url("postgres://u@h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::of_url("postgresql://u@h/db").unwrap(),
            Backend::Postgres
        );
        let e = Backend::of_url("mysql://u:secret@h/db").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://ferry:s3cr%40t@db.local:5432/ferry?sslmode=require"),
            "postgres://ferry:***@db.local:5432/ferry?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(
            redact_url("sqlite://./data/ferry.db"),
            "sqlite://./data/ferry.db"
        );
    }
}
