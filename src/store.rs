//! The SQL archive: conversations, participants, messages, read cursors and API keys.
//!
//! Two backends behind one handle, chosen by the database URL:
//! - **SQLite** (`sqlite://PATH`, the embedded default): WAL journal, `synchronous = FULL`, so a
//!   committed archive batch survives power loss before the node's own WAL drops it.
//! - **Postgres** (`postgres://…`, production): a pool of `archive.pool_size` connections, each
//!   with the server-side `statement_timeout` set at connect time, so a stuck statement fails (and
//!   the archiver retries) instead of holding a connection forever.
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

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{QueryBuilder, SqlitePool};
use uuid::Uuid;

use ferry_shards::archive::{
    Archive, ArchiveError, BoxFuture, ConversationMeta, ConversationSnapshot, ConversationSummary,
};
use ferry_shards::conversation_log::DedupeEntry;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::{format_rfc3339_millis, Message};

use crate::cold::{ColdError, ColdTier};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// SQLite caps bound parameters per statement; 11 columns × 2000 rows stays well below it.
const MESSAGE_COLUMNS: usize = 11;
const MAX_ROWS_PER_INSERT: usize = 2000;
/// Name prefix of sqlx's SQLite worker threads (one per connection; the kernel keeps 15 bytes), so
/// `top -H` and the benchmarks can tell the archive's CPU from the rest.
const SQLITE_THREAD: &str = "ferry-sqlite-";
/// Archive batches stored at once on Postgres (see `Archive::max_concurrent_batches`). Measured
/// with `cargo bench --bench archive -- pg-insert` on 2 cores: 3 beat 2 (docs/benchmarks.md).
const POSTGRES_CONCURRENT_BATCHES: usize = 3;
/// SQLite page size for new databases (bytes).
const SQLITE_PAGE_SIZE: u32 = 16 * 1024;
/// SQLite page cache per connection, in KiB when negative (SQLite's convention): 8 MiB (the
/// default is 2 MB), so an archive transaction's index pages stay cached instead of being read
/// back from the file. Per connection, so at most `pool_size` × 8 MiB in all.
const SQLITE_CACHE_SIZE: &str = "-8192";
/// Postgres binds one array per column, so the row count is not limited by parameters; chunks
/// only keep a single statement's size reasonable.
const MAX_ROWS_PER_UNNEST: usize = 10_000;

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

/// Outcome of creating a conversation.
pub struct Upserted {
    pub meta: ConversationMeta,
    pub created: bool,
    /// Participants this call added (all of them when it created the conversation).
    pub added: Vec<ParticipantId>,
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
}

/// What an archive write of a cluster member is checked against (see `Store::with_fence`).
pub struct Fence {
    pub node_id: String,
    /// The epochs this node serves its slots at.
    pub gates: Arc<ferry_shards::gate::Gates>,
    pub db: crate::cluster::db::ClusterDb,
}

impl Fence {
    /// The `(slot, epoch)` pairs a batch is written under; a slot not owned here refuses it.
    fn epochs(&self, messages: &[Arc<Message>]) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut slots: Vec<u32> = messages.iter().map(|m| m.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        slots
            .into_iter()
            .map(|slot| {
                self.gates
                    .owned_epoch(slot)
                    .map(|epoch| (slot, epoch))
                    .ok_or_else(|| {
                        StoreError::Fenced(format!("slot {slot} is not owned by this node"))
                    })
            })
            .collect()
    }
}

/// One row of the segment index (`message_segments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRow {
    pub conversation_id: ConversationId,
    pub first_seq: u64,
    pub last_seq: u64,
    pub object_key: String,
    pub record_count: u64,
    pub bytes: u64,
    pub min_created_at_ms: i64,
    pub max_created_at_ms: i64,
    pub created_at_ms: i64,
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// `participants, metadata, created_at_ms` of a conversation.
type ConversationRow = (Json<Vec<String>>, Json<Box<RawValue>>, i64);
/// `seq, id, sender, kind, content, metadata, created_at_ms, idempotency_key, slot` of a message.
type MessageRow = (
    i64,
    String,
    String,
    String,
    Json<Box<RawValue>>,
    Json<Box<RawValue>>,
    i64,
    Option<String>,
    i64,
);
/// `idempotency_key, seq, id, created_at_ms` of a recent keyed message.
type KeyRow = (String, i64, String, i64);
/// `first_seq, last_seq, object_key` of a segment.
type SegmentRef = (i64, i64, String);

const SELECT_CONVERSATION: &str =
    "SELECT participants, metadata, created_at_ms FROM conversations WHERE id = $1";
const SELECT_MESSAGES_ASC: &str = "SELECT seq, CAST(id AS TEXT), sender, kind, content, metadata, created_at_ms, idempotency_key, slot \
     FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4";
const SELECT_MESSAGES_DESC: &str = "SELECT seq, CAST(id AS TEXT), sender, kind, content, metadata, created_at_ms, idempotency_key, slot \
     FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4";
const SELECT_LAST_SEQ: &str = "SELECT COALESCE(MAX(seq), 0), \
     (SELECT COALESCE(MAX(last_seq), 0) FROM message_segments WHERE conversation_id = $1), \
     (SELECT COALESCE(MAX(expired_through_seq), 0) FROM conversations WHERE id = $1) \
     FROM messages WHERE conversation_id = $1";

/// Raises `conversations.expired_through_seq` to `$2` (never lowers it).
const RAISE_EXPIRED: &str = "UPDATE conversations SET expired_through_seq = \
     CASE WHEN $2 > expired_through_seq THEN $2 ELSE expired_through_seq END WHERE id = $1";

/// Conversations whose `expired_through_seq` is cached; the cache is dropped past this.
const EXPIRED_CACHE_ENTRIES: usize = 100_000;

/// One batch of messages as Postgres arrays, one per column, for `UNNEST`.
const PG_COPY_MESSAGES: &str = "COPY messages \
     (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) \
     FROM STDIN (FORMAT csv)";
/// Bytes of CSV handed to the connection at a time during a COPY.
const PG_COPY_CHUNK: usize = 256 * 1024;

const PG_INSERT_MESSAGES: &str = "INSERT INTO messages \
     (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) \
     SELECT c, s, CAST(i AS UUID), snd, k, CAST(ct AS JSONB), CAST(md AS JSONB), \
            TIMESTAMPTZ 'epoch' + ms * INTERVAL '1 millisecond', ms, ik, sl \
     FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                 $8::int8[], $9::text[], $10::int8[]) AS t(c, s, i, snd, k, ct, md, ms, ik, sl) \
     ON CONFLICT (conversation_id, seq) DO NOTHING";

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
                    // Only takes effect on a new database file. Larger pages mean fewer page
                    // splits and fewer pages rewritten per archive transaction.
                    .page_size(SQLITE_PAGE_SIZE)
                    .pragma("cache_size", SQLITE_CACHE_SIZE)
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
                    .options([("statement_timeout", timeout_ms.to_string())]);
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
        })
    }

    /// Archive writes are fenced from now on (a cluster member; Postgres only).
    pub fn with_fence(mut self, fence: Fence) -> Store {
        self.fence = Some(Arc::new(fence));
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

    /// Creates the conversation, or adds the given participants to an existing one (and replaces
    /// its metadata when given). Concurrent calls for one id are safe: the insert decides who
    /// creates, and an update holds the row (Postgres `FOR UPDATE`; SQLite has one writer).
    pub async fn upsert_conversation(
        &self,
        id: &ConversationId,
        participants: &[ParticipantId],
        metadata: Option<&RawValue>,
        now_ms: i64,
    ) -> Result<Upserted, StoreError> {
        let mut unique: Vec<ParticipantId> = Vec::new();
        for p in participants {
            if !unique.contains(p) {
                unique.push(p.clone());
            }
        }
        let fresh = ConversationMeta {
            id: id.clone(),
            participants: unique,
            metadata: metadata.map(|m| m.to_owned()).unwrap_or_else(empty_object),
            created_at_ms: now_ms,
        };
        let (insert, select) = match self.backend() {
            Backend::Sqlite => (
                "INSERT INTO conversations (id, participants, metadata, created_at, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
                SELECT_CONVERSATION.to_owned(),
            ),
            Backend::Postgres => (
                "INSERT INTO conversations (id, participants, metadata, created_at, created_at_ms) \
                 VALUES ($1, $2, $3, CAST($4 AS TIMESTAMPTZ), $5) ON CONFLICT (id) DO NOTHING",
                format!("{SELECT_CONVERSATION} FOR UPDATE"),
            ),
        };
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(insert)
                .bind(id.as_str())
                .bind(Json(participant_names(&fresh.participants)))
                .bind(Json(&*fresh.metadata))
                .bind(format_rfc3339_millis(now_ms))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            let (meta, created, added) = if inserted {
                let added = fresh.participants.clone();
                (fresh, true, added)
            } else {
                let row: ConversationRow = sqlx::query_as(&select)
                    .bind(id.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                let mut meta = meta_from_row(id, row)?;
                let mut added = Vec::new();
                for p in participants {
                    if !meta.has_participant(p.as_str()) {
                        meta.participants.push(p.clone());
                        added.push(p.clone());
                    }
                }
                let mut changed = !added.is_empty();
                if let Some(m) = metadata {
                    if m.get() != meta.metadata.get() {
                        meta.metadata = m.to_owned();
                        changed = true;
                    }
                }
                if changed {
                    sqlx::query("UPDATE conversations SET participants = $1, metadata = $2 WHERE id = $3")
                        .bind(Json(participant_names(&meta.participants)))
                        .bind(Json(&*meta.metadata))
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                (meta, false, added)
            };
            for p in &meta.participants {
                sqlx::query(
                    "INSERT INTO conversation_participants (participant_id, conversation_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(p.as_str())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(Upserted {
                meta,
                created,
                added,
            })
        })
    }

    pub async fn conversation(
        &self,
        id: &ConversationId,
    ) -> Result<Option<ConversationMeta>, StoreError> {
        let row: Option<ConversationRow> = with_pool!(self, pool => {
            sqlx::query_as(SELECT_CONVERSATION)
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?
        });
        row.map(|r| meta_from_row(id, r)).transpose()
    }

    /// `(is_admin)` for a stored key hash.
    pub async fn api_key(&self, key_hash: &str) -> Result<Option<bool>, StoreError> {
        let row: Option<(bool,)> = with_pool!(self, pool => {
            sqlx::query_as("SELECT admin FROM api_keys WHERE key_hash = $1")
                .bind(key_hash)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(admin,)| admin))
    }

    pub async fn api_key_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = with_pool!(self, pool => {
            sqlx::query_as("SELECT COUNT(*) FROM api_keys")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    pub async fn insert_api_key(
        &self,
        key_hash: &str,
        name: &str,
        admin: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO api_keys (key_hash, name, admin, created_at_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_hash) DO UPDATE SET admin = excluded.admin",
            )
            .bind(key_hash)
            .bind(name)
            .bind(admin)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Raises the participant's read and/or delivered (ack) cursor; cursors never move back.
    pub async fn set_cursor(
        &self,
        conversation: &ConversationId,
        participant: &ParticipantId,
        read: Option<u64>,
        ack: Option<u64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO read_cursors (conversation_id, participant_id, read_seq, ack_seq, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (conversation_id, participant_id) DO UPDATE SET \
                 read_seq = CASE WHEN excluded.read_seq > read_cursors.read_seq \
                                 THEN excluded.read_seq ELSE read_cursors.read_seq END, \
                 ack_seq = CASE WHEN excluded.ack_seq > read_cursors.ack_seq \
                                THEN excluded.ack_seq ELSE read_cursors.ack_seq END, \
                 updated_at_ms = excluded.updated_at_ms",
            )
            .bind(conversation.as_str())
            .bind(participant.as_str())
            .bind(to_i64(read.unwrap_or(0)))
            .bind(to_i64(ack.unwrap_or(0)))
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// `(read_seq, ack_seq)`, zero when never set.
    pub async fn cursor(
        &self,
        conversation: &ConversationId,
        participant: &ParticipantId,
    ) -> Result<(u64, u64), StoreError> {
        let row: Option<(i64, i64)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT read_seq, ack_seq FROM read_cursors WHERE conversation_id = $1 AND participant_id = $2",
            )
            .bind(conversation.as_str())
            .bind(participant.as_str())
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map_or((0, 0), |(read, ack)| (read as u64, ack as u64)))
    }

    /// Highest archived seq of a conversation (0 if none): in SQL, in a segment, or deleted by
    /// retention (so seqs are never reused after history expired).
    pub async fn last_seq(&self, conversation: &ConversationId) -> Result<u64, StoreError> {
        let (in_sql, in_segments, expired): (i64, i64, i64) = with_pool!(self, pool => {
            sqlx::query_as(SELECT_LAST_SEQ)
                .bind(conversation.as_str())
                .fetch_one(pool)
                .await?
        });
        Ok(in_sql.max(in_segments).max(expired) as u64)
    }

    /// The lowest seq retention has not deleted (1 when nothing expired). Cached: only this
    /// node's retention job raises it, through this store.
    pub async fn first_available_seq(
        &self,
        conversation: &ConversationId,
    ) -> Result<u64, StoreError> {
        if let Some(seq) = self.expired_cache().get(conversation) {
            return Ok(seq + 1);
        }
        let row: Option<(i64,)> = with_pool!(self, pool => {
            sqlx::query_as("SELECT expired_through_seq FROM conversations WHERE id = $1")
                .bind(conversation.as_str())
                .fetch_optional(pool)
                .await?
        });
        let expired = row.map_or(0, |(n,)| n as u64);
        let mut cache = self.expired_cache();
        if cache.len() >= EXPIRED_CACHE_ENTRIES {
            cache.clear();
        }
        let entry = cache.entry(conversation.clone()).or_insert(expired);
        *entry = (*entry).max(expired);
        Ok(*entry + 1)
    }

    fn expired_cache(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, u64>> {
        self.expired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Segments whose newest message is older than `cutoff_ms`, oldest first, at most `limit`:
    /// `(conversation, first_seq, last_seq, object_key)`.
    pub async fn expired_segments(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<(ConversationId, u64, u64, String)>, StoreError> {
        let rows: Vec<(String, i64, i64, String)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT conversation_id, first_seq, last_seq, object_key FROM message_segments \
                 WHERE max_created_at_ms < $1 ORDER BY max_created_at_ms LIMIT $2",
            )
            .bind(cutoff_ms)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(id, first, last, key)| {
                ConversationId::parse(&id)
                    .map(|id| (id, first as u64, last as u64, key))
                    .map_err(|e| StoreError::Invalid(e.to_string()))
            })
            .collect()
    }

    /// Records seqs up to `through` as expired (before their segment object is deleted, so no
    /// read asks for it from then on).
    pub async fn raise_expired(
        &self,
        conversation: &ConversationId,
        through: u64,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(RAISE_EXPIRED)
                .bind(conversation.as_str())
                .bind(to_i64(through))
                .execute(pool)
                .await?
                .rows_affected()
        });
        self.note_expired(conversation, through);
        Ok(())
    }

    /// After its object is deleted: drops a segment's index row (and records its seqs as
    /// expired, in case `raise_expired` was skipped).
    pub async fn forget_segment(
        &self,
        conversation: &ConversationId,
        first_seq: u64,
        last_seq: u64,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(RAISE_EXPIRED)
                .bind(conversation.as_str())
                .bind(to_i64(last_seq))
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM message_segments WHERE conversation_id = $1 AND first_seq = $2")
                .bind(conversation.as_str())
                .bind(to_i64(first_seq))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        self.note_expired(conversation, last_seq);
        Ok(())
    }

    /// Deletes SQL messages older than `cutoff_ms` (a prefix of each conversation, up to its
    /// newest expired seq) and records them as expired. Returns how many rows went.
    pub async fn expire_sql(&self, cutoff_ms: i64, limit: usize) -> Result<u64, StoreError> {
        let due: Vec<(String, i64)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT conversation_id, MAX(seq) FROM messages WHERE created_at_ms < $1 \
                 GROUP BY conversation_id LIMIT $2",
            )
            .bind(cutoff_ms)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(pool)
            .await?
        });
        let mut deleted = 0;
        for (id, upto) in due {
            let id = ConversationId::parse(&id).map_err(|e| StoreError::Invalid(e.to_string()))?;
            deleted += with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                sqlx::query(RAISE_EXPIRED)
                    .bind(id.as_str())
                    .bind(upto)
                    .execute(&mut *tx)
                    .await?;
                let n = sqlx::query("DELETE FROM messages WHERE conversation_id = $1 AND seq <= $2")
                    .bind(id.as_str())
                    .bind(upto)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                n
            });
            self.note_expired(&id, upto as u64);
        }
        Ok(deleted)
    }

    fn note_expired(&self, conversation: &ConversationId, through: u64) {
        let mut cache = self.expired_cache();
        if let Some(seq) = cache.get_mut(conversation) {
            *seq = (*seq).max(through);
        }
    }

    /// The newest archived message of a conversation.
    pub async fn last_message(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<Arc<Message>>, StoreError> {
        Ok(self
            .read(conversation, 0, u64::MAX, 1, true)
            .await?
            .into_iter()
            .next())
    }

    /// Conversations listing the participant.
    pub async fn conversations_of(
        &self,
        participant: &ParticipantId,
    ) -> Result<Vec<ConversationId>, StoreError> {
        let rows: Vec<(String,)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT conversation_id FROM conversation_participants WHERE participant_id = $1 ORDER BY conversation_id",
            )
            .bind(participant.as_str())
            .fetch_all(pool)
            .await?
        });
        rows.iter()
            .map(|(id,)| ConversationId::parse(id).map_err(|e| StoreError::Invalid(e.to_string())))
            .collect()
    }

    /// Archived messages with `after_seq < seq < before_seq` not sent by `participant`.
    pub async fn count_unread(
        &self,
        conversation: &ConversationId,
        participant: &ParticipantId,
        after_seq: u64,
        before_seq: u64,
    ) -> Result<u64, StoreError> {
        if before_seq <= after_seq.saturating_add(1) {
            return Ok(0);
        }
        let (n, lowest_in_sql): (i64, Option<i64>) = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT COUNT(*), (SELECT MIN(seq) FROM messages WHERE conversation_id = $1) \
                 FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq < $3 AND sender <> $4",
            )
            .bind(conversation.as_str())
            .bind(to_i64(after_seq))
            .bind(to_i64(before_seq))
            .bind(participant.as_str())
            .fetch_one(pool)
            .await?
        });
        let mut unread = n as u64;
        // Below SQL's lowest row the messages live in segments (if anywhere). Only the (at most
        // two) segments the range cuts are decoded; a segment wholly inside counts every record,
        // the reader's own included — a cursor that old is an approximate count anyway, and the
        // inbox must not decode months of history per request.
        let cold_before = lowest_in_sql.map_or(before_seq, |l| (l as u64).min(before_seq));
        if self.cold.is_some() && cold_before > after_seq.saturating_add(1) {
            for (first, last, key) in self
                .segment_refs(conversation, after_seq, cold_before)
                .await?
            {
                let (first, last) = (first as u64, last as u64);
                if first > after_seq && last < cold_before {
                    unread += last - first + 1;
                    continue;
                }
                unread += self
                    .cold_segment(&key)
                    .await?
                    .iter()
                    .filter(|m| {
                        m.seq > after_seq && m.seq < cold_before && m.sender != *participant
                    })
                    .count() as u64;
            }
        }
        Ok(unread)
    }

    /// Stores a batch in one transaction; rows already present are left as they are.
    async fn insert_messages(&self, messages: &[Arc<Message>]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for chunk in messages.chunks(MAX_ROWS_PER_INSERT) {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) ",
                    );
                    q.push_values(chunk, |mut b, m| {
                        b.push_bind(m.conversation_id.as_str())
                            .push_bind(to_i64(m.seq))
                            .push_bind(m.id.to_string())
                            .push_bind(m.sender.as_str())
                            .push_bind(&*m.kind)
                            .push_bind(m.content.get())
                            .push_bind(m.metadata.get())
                            .push_bind(format_rfc3339_millis(m.created_at_ms))
                            .push_bind(m.created_at_ms)
                            .push_bind(m.idempotency_key.as_deref())
                            .push_bind(m.slot as i64);
                    });
                    q.push(" ON CONFLICT (conversation_id, seq) DO NOTHING");
                    debug_assert!(chunk.len() * MESSAGE_COLUMNS < 32_766);
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Db::Postgres(pool) => {
                let fence = match &self.fence {
                    Some(f) => Some((&**f, f.epochs(messages)?)),
                    None => None,
                };
                let fence = fence.as_ref().map(|(f, epochs)| (*f, epochs.as_slice()));
                match pg_copy_messages(pool, messages, fence).await {
                    Ok(()) => {}
                    // Some of the batch is already stored (a retry after a failure or a crash):
                    // the plain COPY refuses duplicates, the slower insert skips them.
                    Err(e) if is_unique_violation(&e) => {
                        pg_insert_messages(pool, messages, fence).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn load(
        &self,
        id: &ConversationId,
        window: usize,
    ) -> Result<Option<ConversationSnapshot>, StoreError> {
        let Some(meta) = self.conversation(id).await? else {
            return Ok(None);
        };
        let last_seq = self.last_seq(id).await?;
        let rows: Vec<KeyRow> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT idempotency_key, seq, CAST(id AS TEXT), created_at_ms FROM messages \
                 WHERE conversation_id = $1 AND seq > $2 AND idempotency_key IS NOT NULL ORDER BY seq ASC",
            )
            .bind(id.as_str())
            .bind(to_i64(last_seq) - window.min(i64::MAX as usize) as i64)
            .fetch_all(pool)
            .await?
        });
        let mut recent_keys = Vec::with_capacity(rows.len());
        for (key, seq, uuid, created_at_ms) in rows {
            recent_keys.push((
                key,
                DedupeEntry {
                    seq: seq as u64,
                    id: Uuid::parse_str(&uuid).map_err(|e| StoreError::Invalid(e.to_string()))?,
                    created_at_ms,
                },
            ));
        }
        Ok(Some(ConversationSnapshot {
            meta,
            last_seq,
            recent_keys,
        }))
    }

    /// Messages with `after_seq < seq < before_seq`, ascending: the first `limit` of them, or
    /// with `newest_first` the last `limit`; from SQL and, below it, from segments.
    async fn read(
        &self,
        id: &ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let from_sql = self
            .read_sql(id, after_seq, before_seq, limit, newest_first)
            .await?;
        if self.cold.is_none() || limit == 0 {
            return Ok(from_sql);
        }
        // Compaction moves only the oldest messages, so segments can hold something this read
        // wants only below the lowest SQL row, and only if SQL did not fill the page from the
        // side the read starts on.
        let sql_complete = if newest_first {
            from_sql.len() >= limit
        } else {
            from_sql
                .first()
                .is_some_and(|m| m.seq == after_seq.saturating_add(1))
        };
        let cold_before = from_sql
            .first()
            .map_or(before_seq, |m| m.seq.min(before_seq));
        if sql_complete || cold_before <= after_seq.saturating_add(1) {
            return Ok(from_sql);
        }
        let mut merged: BTreeMap<u64, Arc<Message>> =
            from_sql.into_iter().map(|m| (m.seq, m)).collect();
        let mut segments = self.segment_refs(id, after_seq, cold_before).await?;
        if newest_first {
            segments.reverse();
        }
        let mut from_cold = 0;
        for (_, _, key) in segments {
            if from_cold >= limit {
                break;
            }
            let segment = self.cold_segment(&key).await?;
            for m in segment.iter() {
                if m.seq > after_seq && m.seq < cold_before {
                    from_cold += 1;
                    merged.entry(m.seq).or_insert_with(|| m.clone());
                }
            }
        }
        let all: Vec<Arc<Message>> = merged.into_values().collect();
        Ok(if newest_first {
            all[all.len().saturating_sub(limit)..].to_vec()
        } else {
            all.into_iter().take(limit).collect()
        })
    }

    /// The segment index rows of a conversation overlapping `(after_seq, before_seq)`, ascending.
    async fn segment_refs(
        &self,
        id: &ConversationId,
        after_seq: u64,
        before_seq: u64,
    ) -> Result<Vec<SegmentRef>, StoreError> {
        Ok(with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT first_seq, last_seq, object_key FROM message_segments \
                 WHERE conversation_id = $1 AND last_seq > $2 AND first_seq < $3 \
                 AND last_seq > (SELECT COALESCE(MAX(expired_through_seq), 0) FROM conversations WHERE id = $1) \
                 ORDER BY first_seq ASC",
            )
            .bind(id.as_str())
            .bind(to_i64(after_seq))
            .bind(to_i64(before_seq))
            .fetch_all(pool)
            .await?
        }))
    }

    async fn cold_segment(&self, key: &str) -> Result<crate::cold::Segment, StoreError> {
        let cold = self
            .cold
            .as_ref()
            .ok_or_else(|| StoreError::Invalid(format!("segment {key} but no cold tier")))?;
        Ok(cold.get(key).await?)
    }

    /// Conversations with messages in SQL older than `cutoff_ms` that are due for compaction —
    /// at least `min_records` of them, or any older than `force_before_ms` — with the highest
    /// such seq. At most `limit` conversations.
    pub async fn compaction_candidates(
        &self,
        cutoff_ms: i64,
        min_records: u64,
        force_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(ConversationId, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT conversation_id, MAX(seq) FROM messages WHERE created_at_ms < $1 \
                 GROUP BY conversation_id HAVING COUNT(*) >= $2 OR MIN(created_at_ms) < $3 \
                 ORDER BY MIN(created_at_ms) LIMIT $4",
            )
            .bind(cutoff_ms)
            .bind(to_i64(min_records))
            .bind(force_before_ms)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(id, upto)| {
                ConversationId::parse(&id)
                    .map(|id| (id, upto as u64))
                    .map_err(|e| StoreError::Invalid(e.to_string()))
            })
            .collect()
    }

    /// The oldest messages still in SQL with `seq <= upto`, ascending, at most `limit`.
    pub async fn oldest_in_sql(
        &self,
        id: &ConversationId,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        self.read_sql(id, 0, upto.saturating_add(1), limit, false)
            .await
    }

    /// Records a written segment and removes its messages from SQL, in one transaction. Call
    /// only after the object is durable. Idempotent. An index row for the same first seq is
    /// replaced only by a wider segment (rows a WAL replay put back after an earlier compaction
    /// are covered either way).
    pub async fn commit_segment(&self, row: &SegmentRow) -> Result<u64, StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO message_segments (conversation_id, first_seq, last_seq, object_key, record_count, \
                 bytes, min_created_at_ms, max_created_at_ms, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (conversation_id, first_seq) DO UPDATE SET last_seq = excluded.last_seq, \
                 object_key = excluded.object_key, record_count = excluded.record_count, bytes = excluded.bytes, \
                 min_created_at_ms = excluded.min_created_at_ms, max_created_at_ms = excluded.max_created_at_ms, \
                 created_at_ms = excluded.created_at_ms WHERE excluded.last_seq > message_segments.last_seq",
            )
            .bind(row.conversation_id.as_str())
            .bind(to_i64(row.first_seq))
            .bind(to_i64(row.last_seq))
            .bind(&row.object_key)
            .bind(to_i64(row.record_count))
            .bind(to_i64(row.bytes))
            .bind(row.min_created_at_ms)
            .bind(row.max_created_at_ms)
            .bind(row.created_at_ms)
            .execute(&mut *tx)
            .await?;
            let deleted = sqlx::query(
                "DELETE FROM messages WHERE conversation_id = $1 AND seq >= $2 AND seq <= $3",
            )
            .bind(row.conversation_id.as_str())
            .bind(to_i64(row.first_seq))
            .bind(to_i64(row.last_seq))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(deleted)
        })
    }

    /// The segment index rows of a conversation, ascending (for tests and operators).
    pub async fn segments(
        &self,
        id: &ConversationId,
    ) -> Result<Vec<(u64, u64, String)>, StoreError> {
        Ok(self
            .segment_refs(id, 0, u64::MAX)
            .await?
            .into_iter()
            .map(|(first, last, key)| (first as u64, last as u64, key))
            .collect())
    }

    async fn read_sql(
        &self,
        id: &ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let sql = if newest_first {
            SELECT_MESSAGES_DESC
        } else {
            SELECT_MESSAGES_ASC
        };
        let rows: Vec<MessageRow> = with_pool!(self, pool => {
            sqlx::query_as(sql)
                .bind(id.as_str())
                .bind(to_i64(after_seq))
                .bind(to_i64(before_seq))
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(pool)
                .await?
        });
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(Arc::new(message_from_row(id, row)?));
        }
        if newest_first {
            out.reverse();
        }
        Ok(out)
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

/// The archive's fast path on Postgres: one `COPY … FROM STDIN (FORMAT csv)` per batch, in one
/// transaction. COPY does plain inserts where `INSERT … ON CONFLICT DO NOTHING` does speculative
/// ones, which costs the server noticeably more per row; the price is that a duplicate fails the
/// whole COPY (SQLSTATE 23505), and the caller then falls back to [`pg_insert_messages`].
async fn pg_copy_messages(
    pool: &PgPool,
    messages: &[Arc<Message>],
    fence: Option<(&Fence, &[(u32, u64)])>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, fence).await?;
    let mut copy = tx.copy_in_raw(PG_COPY_MESSAGES).await?;
    let mut buf = Vec::with_capacity(PG_COPY_CHUNK + 16 * 1024);
    for m in messages {
        csv_message_row(&mut buf, m);
        if buf.len() >= PG_COPY_CHUNK {
            copy.send(std::mem::take(&mut buf)).await?;
            buf.reserve(PG_COPY_CHUNK + 16 * 1024);
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    tx.commit().await
}

/// `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`: idempotent, for batches of which
/// some rows may already be stored.
async fn pg_insert_messages(
    pool: &PgPool,
    messages: &[Arc<Message>],
    fence: Option<(&Fence, &[(u32, u64)])>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, fence).await?;
    for chunk in messages.chunks(MAX_ROWS_PER_UNNEST) {
        let n = chunk.len();
        let mut conversation = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut id = Vec::with_capacity(n);
        let mut sender = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut content = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut created_at_ms = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut slot = Vec::with_capacity(n);
        for m in chunk {
            conversation.push(m.conversation_id.as_str());
            seq.push(to_i64(m.seq));
            id.push(m.id.to_string());
            sender.push(m.sender.as_str());
            kind.push(&*m.kind);
            content.push(m.content.get());
            metadata.push(m.metadata.get());
            created_at_ms.push(m.created_at_ms);
            key.push(m.idempotency_key.as_deref());
            slot.push(m.slot as i64);
        }
        sqlx::query(PG_INSERT_MESSAGES)
            .bind(conversation)
            .bind(seq)
            .bind(id)
            .bind(sender)
            .bind(kind)
            .bind(content)
            .bind(metadata)
            .bind(created_at_ms)
            .bind(key)
            .bind(slot)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The cluster's fence inside an archive transaction: the batch's slot rows are read-locked
/// (`FOR SHARE`) and must name this node at the epochs it serves them at, so a stale owner's
/// write fails (Temporal's range-id pattern). The lock lasts until the commit; a paused holder's
/// transaction is ended by the connection's `idle_in_transaction_session_timeout`.
///
/// A slot another node now owns stops being served here at once (its gate closes; appends are
/// routed to the owner). The same node at another epoch (a reclaim after a lease lapse, not yet
/// seen by this batch) is only retried.
async fn check_fence(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    fence: Option<(&Fence, &[(u32, u64)])>,
) -> Result<(), sqlx::Error> {
    use crate::cluster::db::ClusterDbError;
    let Some((fence, epochs)) = fence else {
        return Ok(());
    };
    match crate::cluster::db::check_fence(tx, &fence.node_id, epochs).await {
        Ok(()) => Ok(()),
        Err(ClusterDbError::Fenced(f)) => {
            metrics::counter!(ferry_shards::metrics::ARCHIVE_ERRORS_TOTAL).increment(1);
            if f.found_owner.as_deref() != Some(fence.node_id.as_str()) {
                tracing::error!(error = %f, "archive write fenced off: another node owns the slot; no longer serving it");
                fence
                    .gates
                    .set_not_owned(f.slot, f.found_epoch.unwrap_or(f.expected_epoch));
            } else {
                tracing::warn!(error = %f, "archive write under an old epoch of this node; retrying");
            }
            Err(sqlx::Error::Protocol(format!("fenced: {f}")))
        }
        Err(e) => Err(sqlx::Error::Protocol(format!("fence check failed: {e}"))),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "23505")
}

/// One CSV row of [`PG_COPY_MESSAGES`]; text fields quoted (any byte allowed inside), a missing
/// idempotency key as the unquoted empty field, which COPY reads as NULL.
fn csv_message_row(buf: &mut Vec<u8>, m: &Message) {
    use std::io::Write;
    csv_text(buf, m.conversation_id.as_str());
    let _ = write!(buf, ",{},{},", m.seq, m.id);
    csv_text(buf, m.sender.as_str());
    buf.push(b',');
    csv_text(buf, &m.kind);
    buf.push(b',');
    csv_text(buf, m.content.get());
    buf.push(b',');
    csv_text(buf, m.metadata.get());
    let _ = write!(
        buf,
        ",{},{},",
        format_rfc3339_millis(m.created_at_ms),
        m.created_at_ms
    );
    if let Some(key) = m.idempotency_key.as_deref() {
        csv_text(buf, key);
    }
    let _ = writeln!(buf, ",{}", m.slot);
}

fn csv_text(buf: &mut Vec<u8>, value: &str) {
    buf.push(b'"');
    for &b in value.as_bytes() {
        if b == b'"' {
            buf.push(b'"');
        }
        buf.push(b);
    }
    buf.push(b'"');
}

/// Seqs and cursors are u64 in the protocol and BIGINT in SQL; anything above `i64::MAX` (only
/// ever an open upper bound) is clamped.
fn to_i64(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("static json")
}

fn participant_names(participants: &[ParticipantId]) -> Vec<&str> {
    participants.iter().map(|p| p.as_str()).collect()
}

fn meta_from_row(
    id: &ConversationId,
    row: ConversationRow,
) -> Result<ConversationMeta, StoreError> {
    let (Json(names), Json(metadata), created_at_ms) = row;
    let participants = names
        .iter()
        .map(|n| ParticipantId::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid(format!("participants of {id}: {e}")))?;
    Ok(ConversationMeta {
        id: id.clone(),
        participants,
        metadata,
        created_at_ms,
    })
}

fn message_from_row(id: &ConversationId, row: MessageRow) -> Result<Message, StoreError> {
    let (seq, uuid, sender, kind, Json(content), Json(metadata), created_at_ms, key, slot) = row;
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Invalid(format!("message {what} in {id}: {e}"))
    };
    Ok(Message {
        conversation_id: id.clone(),
        seq: seq as u64,
        id: Uuid::parse_str(&uuid).map_err(|e| invalid("id", &e))?,
        sender: ParticipantId::parse(&sender).map_err(|e| invalid("sender", &e))?,
        kind: kind.into(),
        content,
        metadata,
        created_at_ms,
        idempotency_key: key.map(Box::from),
        rendered: Default::default(),
        slot: slot as u32,
    })
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

/// Largest number of digits a JSON number may have before and after the decimal point (after
/// applying its exponent). Postgres `numeric`, which JSONB uses, allows 131072 and 16383; these
/// stay a little below.
const MAX_INTEGER_DIGITS: i64 = 131_000;
const MAX_FRACTION_DIGITS: i64 = 16_000;

/// Deepest nesting of arrays and objects a stored JSON value (a message's `content`, a
/// `metadata` object) may have. Every place the value is served wraps it a few levels deeper (a
/// page, a push, an inbox entry), and common JSON parsers, serde_json among them, stop at 128
/// levels: past that a stored message could be written but no longer read back.
pub const MAX_JSON_DEPTH: usize = 64;

/// Checks that a JSON text (already known to be valid JSON) holds nothing a JSONB column refuses:
/// the escape `\u0000`, an unpaired surrogate escape, or a number beyond `numeric`'s range; and
/// that it nests no deeper than [`MAX_JSON_DEPTH`]. Such a message would be accepted into the
/// WAL and then fail every archive attempt or every read, so the gateway refuses it up front, on
/// every backend alike.
pub fn check_storable_json(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' => i = scan_string(b, i + 1)?,
            b'-' | b'0'..=b'9' => i = scan_number(b, i)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!(
                        "nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
                    ));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// From just after an opening quote to just after the closing one.
fn scan_string(b: &[u8], mut i: usize) -> Result<usize, String> {
    // A high surrogate escape seen just before, waiting for its low half.
    let mut pending_high = false;
    while i < b.len() {
        match b[i] {
            b'"' if !pending_high => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let hex = b
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    .ok_or("malformed \\u escape")?;
                match hex {
                    0 => return Err("strings may not contain \\u0000".into()),
                    0xD800..=0xDBFF if !pending_high => pending_high = true,
                    0xDC00..=0xDFFF if pending_high => pending_high = false,
                    _ if pending_high => return Err("unpaired surrogate escape".into()),
                    0xDC00..=0xDFFF => return Err("unpaired surrogate escape".into()),
                    _ => {}
                }
                i += 6;
            }
            _ if pending_high => return Err("unpaired surrogate escape".into()),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Err("unterminated string".into())
}

/// From the first byte of a number to just after its last.
fn scan_number(b: &[u8], mut i: usize) -> Result<usize, String> {
    let digits = |b: &[u8], mut i: usize| {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, (i - start) as i64)
    };
    if b[i] == b'-' {
        i += 1;
    }
    let (after_int, int_digits) = digits(b, i);
    i = after_int;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        (i, frac_digits) = digits(b, i + 1);
    }
    let mut exponent: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let negative = b.get(i) == Some(&b'-');
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let start = i;
        (i, _) = digits(b, i);
        for d in &b[start..i] {
            exponent = exponent
                .saturating_mul(10)
                .saturating_add((d - b'0') as i64);
        }
        if negative {
            exponent = -exponent;
        }
    }
    if int_digits.saturating_add(exponent) > MAX_INTEGER_DIGITS
        || frac_digits.saturating_sub(exponent) > MAX_FRACTION_DIGITS
    {
        return Err("number out of the storable range".into());
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn storable_json_accepts_ordinary_values() {
        for ok in [
            r#"{"a": [1, -2.5e3, 0.001, true, null, "x\"y\\u0000"]}"#,
            r#""\ud83d\ude00 and \u00e9 and \\""#,
            "1e130000",
            "1e-15999",
            "123456789012345678901234567890.5",
            r#"{"k": "1e999999"}"#,
            "-0",
        ] {
            assert_eq!(check_storable_json(ok), Ok(()), "{ok}");
        }
        let deepest = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert_eq!(check_storable_json(&deepest), Ok(()));
        // Brackets inside strings are text, not nesting.
        let quoted = format!(r#"{{"a": "{}"}}"#, "[{".repeat(200));
        assert_eq!(check_storable_json(&quoted), Ok(()));
        // Depth is nesting, not the number of containers.
        let wide = format!("[{}[]]", "[[]],".repeat(500));
        assert_eq!(check_storable_json(&wide), Ok(()));
    }

    #[test]
    fn storable_json_refuses_nesting_past_the_limit() {
        let d = MAX_JSON_DEPTH + 1;
        for bad in [
            format!("{}{}", "[".repeat(d), "]".repeat(d)),
            format!("{}1{}", r#"{"a":"#.repeat(d), "}".repeat(d)),
            format!(
                r#"{{"x": "]]]", "y": {}{}}}"#,
                "[".repeat(d - 1),
                "]".repeat(d - 1)
            ),
        ] {
            let err = check_storable_json(&bad).unwrap_err();
            assert!(err.contains("nested deeper than 64"), "{err}");
        }
    }

    #[test]
    fn storable_json_refuses_what_jsonb_refuses() {
        for bad in [
            r#""a\u0000b""#,
            r#"{"k": ["\u0000"]}"#,
            r#""\ud800""#,
            r#""\ud800x""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            "1e131072",
            "1e-16384",
            "0.5e-16000",
            "1e99999999999999999999999",
            r#"{"n": -1E+200000}"#,
        ] {
            assert!(check_storable_json(bad).is_err(), "{bad}");
        }
    }
}
