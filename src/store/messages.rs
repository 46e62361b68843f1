//! Reading messages: pages by seq range from SQL, a conversation's `last_seq` (which counts
//! segments and expired history too, so seqs are never reused), its newest message, and the
//! snapshot a conversation's writer starts from (metadata, `last_seq`, the idempotency keys of
//! its recent messages). A read that may reach below SQL goes through the merged `Store::read`
//! in `segments.rs`, which calls `read_sql` here for its SQL part.

use std::sync::Arc;

use serde_json::value::RawValue;
use sqlx::types::Json;
use uuid::Uuid;

use ferry_shards::archive::ConversationSnapshot;
use ferry_shards::conversation_log::DedupeEntry;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::Message;

use super::{to_i64, Db, Store, StoreError};

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

const SELECT_MESSAGES_ASC: &str = "SELECT seq, CAST(id AS TEXT), sender, kind, content, metadata, created_at_ms, idempotency_key, slot \
     FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4";
const SELECT_MESSAGES_DESC: &str = "SELECT seq, CAST(id AS TEXT), sender, kind, content, metadata, created_at_ms, idempotency_key, slot \
     FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4";
const SELECT_LAST_SEQ: &str = "SELECT COALESCE(MAX(seq), 0), \
     (SELECT COALESCE(MAX(last_seq), 0) FROM message_segments WHERE conversation_id = $1), \
     (SELECT COALESCE(MAX(expired_through_seq), 0) FROM conversations WHERE id = $1) \
     FROM messages WHERE conversation_id = $1";

impl Store {
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

    pub(super) async fn load(
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

    pub(super) async fn read_sql(
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
        epoch: 0,
    })
}
