//! The compactor's queries ([`crate::compactor`]): which conversations have old enough
//! messages in SQL, their oldest messages, and the commit that records a written segment and
//! deletes its messages from SQL in one transaction.

use std::sync::Arc;

use ferry_shards::ids::ConversationId;
use ferry_shards::record::Message;

use super::{to_i64, Db, SegmentRow, Store, StoreError};

impl Store {
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
}
