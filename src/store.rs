//! The SQL archive: conversations, participants, messages, read cursors and API keys.
//!
//! Embedded default: SQLite in `<data_dir>/ferry.db` (WAL journal, `synchronous = FULL`, so a
//! committed archive batch survives power loss before the node's own WAL drops it). Statements are
//! runtime-checked `sqlx::query` calls; every one is exercised by the integration tests.
//! This module implements [`ferry_shards::archive::Archive`] for the node runtime.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};
use uuid::Uuid;

use ferry_shards::archive::{
    Archive, ArchiveError, BoxFuture, ConversationMeta, ConversationSnapshot,
};
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::{format_rfc3339_millis, Message};
use ferry_shards::ring::DedupeEntry;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite caps bound parameters per statement; 11 columns × 2000 rows stays well below it.
const MESSAGE_COLUMNS: usize = 11;
const MAX_ROWS_PER_INSERT: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?} (expected sqlite://PATH)")]
    UnsupportedUrl(String),
    #[error("stored data invalid: {0}")]
    Invalid(String),
}

impl From<StoreError> for ArchiveError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(s) => ArchiveError::Invalid(s),
            other => ArchiveError::Unavailable(other.to_string()),
        }
    }
}

/// Outcome of creating a conversation.
pub struct Upserted {
    pub meta: ConversationMeta,
    pub created: bool,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    pub async fn connect(url: &str, pool_size: u32) -> Result<Store, StoreError> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(false);
        let pool = SqlitePoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        SQLITE_MIGRATIONS.run(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Creates the conversation, or adds the given participants to an existing one (and replaces
    /// its metadata when given).
    pub async fn upsert_conversation(
        &self,
        id: &ConversationId,
        participants: &[ParticipantId],
        metadata: Option<&RawValue>,
        now_ms: i64,
    ) -> Result<Upserted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let existing = sqlx::query(
            "SELECT participants, metadata, created_at_ms FROM conversations WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let (meta, created) = match existing {
            Some(row) => {
                let mut meta = meta_from_row(id, &row)?;
                let mut changed = false;
                for p in participants {
                    if !meta.has_participant(p.as_str()) {
                        meta.participants.push(p.clone());
                        changed = true;
                    }
                }
                if let Some(m) = metadata {
                    if m.get() != meta.metadata.get() {
                        meta.metadata = m.to_owned();
                        changed = true;
                    }
                }
                if changed {
                    sqlx::query(
                        "UPDATE conversations SET participants = ?, metadata = ? WHERE id = ?",
                    )
                    .bind(participants_json(&meta.participants))
                    .bind(meta.metadata.get())
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
                (meta, false)
            }
            None => {
                let mut unique: Vec<ParticipantId> = Vec::new();
                for p in participants {
                    if !unique.contains(p) {
                        unique.push(p.clone());
                    }
                }
                let meta = ConversationMeta {
                    id: id.clone(),
                    participants: unique,
                    metadata: metadata.map(|m| m.to_owned()).unwrap_or_else(empty_object),
                    created_at_ms: now_ms,
                };
                sqlx::query(
                    "INSERT INTO conversations (id, participants, metadata, created_at, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(id.as_str())
                .bind(participants_json(&meta.participants))
                .bind(meta.metadata.get())
                .bind(format_rfc3339_millis(now_ms))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                (meta, true)
            }
        };
        for p in &meta.participants {
            sqlx::query(
                "INSERT INTO conversation_participants (participant_id, conversation_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(p.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Upserted { meta, created })
    }

    pub async fn conversation(
        &self,
        id: &ConversationId,
    ) -> Result<Option<ConversationMeta>, StoreError> {
        let row = sqlx::query(
            "SELECT participants, metadata, created_at_ms FROM conversations WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| meta_from_row(id, &r)).transpose()
    }

    /// `(is_admin)` for a stored key hash.
    pub async fn api_key(&self, key_hash: &str) -> Result<Option<bool>, StoreError> {
        let row = sqlx::query("SELECT admin FROM api_keys WHERE key_hash = ?")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0) != 0))
    }

    pub async fn api_key_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?
            .get::<i64, _>(0))
    }

    pub async fn insert_api_key(
        &self,
        key_hash: &str,
        name: &str,
        admin: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (key_hash, name, admin, created_at_ms) VALUES (?, ?, ?, ?) ON CONFLICT (key_hash) DO UPDATE SET admin = excluded.admin",
        )
        .bind(key_hash)
        .bind(name)
        .bind(admin as i64)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
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
        sqlx::query(
            "INSERT INTO read_cursors (conversation_id, participant_id, read_seq, ack_seq, updated_at_ms) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (conversation_id, participant_id) DO UPDATE SET \
             read_seq = MAX(read_seq, excluded.read_seq), ack_seq = MAX(ack_seq, excluded.ack_seq), updated_at_ms = excluded.updated_at_ms",
        )
        .bind(conversation.as_str())
        .bind(participant.as_str())
        .bind(read.unwrap_or(0) as i64)
        .bind(ack.unwrap_or(0) as i64)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `(read_seq, ack_seq)`, zero when never set.
    pub async fn cursor(
        &self,
        conversation: &ConversationId,
        participant: &ParticipantId,
    ) -> Result<(u64, u64), StoreError> {
        let row = sqlx::query(
            "SELECT read_seq, ack_seq FROM read_cursors WHERE conversation_id = ? AND participant_id = ?",
        )
        .bind(conversation.as_str())
        .bind(participant.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or((0, 0), |r| {
            (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64)
        }))
    }

    /// Highest archived seq of a conversation (0 if none).
    pub async fn last_seq(&self, conversation: &ConversationId) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation_id = ?")
                .bind(conversation.as_str())
                .fetch_one(&self.pool)
                .await?
                .get(0);
        Ok(n as u64)
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
        let rows = sqlx::query(
            "SELECT conversation_id FROM conversation_participants WHERE participant_id = ? ORDER BY conversation_id",
        )
        .bind(participant.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                ConversationId::parse(&r.get::<String, _>(0))
                    .map_err(|e| StoreError::Invalid(e.to_string()))
            })
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
        if before_seq <= after_seq + 1 {
            return Ok(0);
        }
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND seq > ? AND seq < ? AND sender <> ?",
        )
        .bind(conversation.as_str())
        .bind(after_seq as i64)
        .bind(before_seq.min(i64::MAX as u64) as i64)
        .bind(participant.as_str())
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(n as u64)
    }

    async fn insert_messages(&self, messages: &[Arc<Message>]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in messages.chunks(MAX_ROWS_PER_INSERT) {
            let mut q = QueryBuilder::new(
                "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) ",
            );
            q.push_values(chunk, |mut b, m| {
                b.push_bind(m.conversation_id.as_str())
                    .push_bind(m.seq as i64)
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
        let last_seq: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation_id = ?")
                .bind(id.as_str())
                .fetch_one(&self.pool)
                .await?
                .get(0);
        let rows = sqlx::query(
            "SELECT idempotency_key, seq, id, created_at_ms FROM messages WHERE conversation_id = ? AND seq > ? AND idempotency_key IS NOT NULL ORDER BY seq ASC",
        )
        .bind(id.as_str())
        .bind(last_seq - window as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut recent_keys = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(2);
            recent_keys.push((
                row.get::<String, _>(0),
                DedupeEntry {
                    seq: row.get::<i64, _>(1) as u64,
                    id: Uuid::parse_str(&id).map_err(|e| StoreError::Invalid(e.to_string()))?,
                    created_at_ms: row.get(3),
                },
            ));
        }
        Ok(Some(ConversationSnapshot {
            meta,
            last_seq: last_seq as u64,
            recent_keys,
        }))
    }

    async fn read(
        &self,
        id: &ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let sql = if newest_first {
            "SELECT seq, id, sender, kind, content, metadata, created_at_ms, idempotency_key, slot FROM messages WHERE conversation_id = ? AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        } else {
            "SELECT seq, id, sender, kind, content, metadata, created_at_ms, idempotency_key, slot FROM messages WHERE conversation_id = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
        };
        let rows = sqlx::query(sql)
            .bind(id.as_str())
            .bind(after_seq as i64)
            .bind(before_seq.min(i64::MAX as u64) as i64)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(Arc::new(message_from_row(id, &row)?));
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

    fn store_messages<'a>(
        &'a self,
        messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, Result<(), ArchiveError>> {
        Box::pin(async move { Ok(self.insert_messages(messages).await?) })
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

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("static json")
}

fn participants_json(participants: &[ParticipantId]) -> String {
    serde_json::to_string(&participants.iter().map(|p| p.as_str()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".to_owned())
}

fn meta_from_row(
    id: &ConversationId,
    row: &sqlx::sqlite::SqliteRow,
) -> Result<ConversationMeta, StoreError> {
    let participants: String = row.get(0);
    let metadata: String = row.get(1);
    let names: Vec<String> = serde_json::from_str(&participants)
        .map_err(|e| StoreError::Invalid(format!("participants of {id}: {e}")))?;
    let participants = names
        .iter()
        .map(|n| ParticipantId::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid(format!("participants of {id}: {e}")))?;
    Ok(ConversationMeta {
        id: id.clone(),
        participants,
        metadata: RawValue::from_string(metadata)
            .map_err(|e| StoreError::Invalid(format!("metadata of {id}: {e}")))?,
        created_at_ms: row.get(2),
    })
}

fn message_from_row(
    id: &ConversationId,
    row: &sqlx::sqlite::SqliteRow,
) -> Result<Message, StoreError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Invalid(format!("message {what} in {id}: {e}"))
    };
    let uuid: String = row.get(1);
    let sender: String = row.get(2);
    Ok(Message {
        conversation_id: id.clone(),
        seq: row.get::<i64, _>(0) as u64,
        id: Uuid::parse_str(&uuid).map_err(|e| invalid("id", &e))?,
        sender: ParticipantId::parse(&sender).map_err(|e| invalid("sender", &e))?,
        kind: row.get::<String, _>(3).into(),
        content: RawValue::from_string(row.get(4)).map_err(|e| invalid("content", &e))?,
        metadata: RawValue::from_string(row.get(5)).map_err(|e| invalid("metadata", &e))?,
        created_at_ms: row.get(6),
        idempotency_key: row.get::<Option<String>, _>(7).map(Box::from),
        slot: row.get::<i64, _>(8) as u32,
    })
}
