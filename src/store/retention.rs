//! Retention (run by [`crate::compactor`]): deleting history older than a cutoff, from SQL and
//! from segments, and the `conversations.expired_through_seq` it leaves behind, which only ever
//! rises. Reads start at [`Store::first_available_seq`] (cached per conversation; only this
//! node's retention job raises it, through this store) and `last_seq` counts expired seqs, so
//! none is reused.

use std::collections::HashMap;

use ferry_shards::ids::ConversationId;

use super::{to_i64, Db, Store, StoreError};

/// Raises `conversations.expired_through_seq` to `$2` (never lowers it).
const RAISE_EXPIRED: &str = "UPDATE conversations SET expired_through_seq = \
     CASE WHEN $2 > expired_through_seq THEN $2 ELSE expired_through_seq END WHERE id = $1";

/// Conversations whose `expired_through_seq` is cached; the cache is dropped past this.
const EXPIRED_CACHE_ENTRIES: usize = 100_000;

impl Store {
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
}
