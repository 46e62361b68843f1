//! The cold tier's segment index (`message_segments`) and reads merged across SQL and segment
//! objects. Compaction only ever moves a conversation's oldest messages, so a read consults the
//! index only when SQL cannot answer from the side the read starts on (see the module docs of
//! [`crate::store`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_shards::ids::ConversationId;
use ferry_shards::record::Message;

use super::{to_i64, Db, Store, StoreError};

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

/// `first_seq, last_seq, object_key` of a segment.
type SegmentRef = (i64, i64, String);

impl Store {
    /// Messages with `after_seq < seq < before_seq`, ascending: the first `limit` of them, or
    /// with `newest_first` the last `limit`; from SQL and, below it, from segments.
    pub(super) async fn read(
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
    pub(super) async fn segment_refs(
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

    pub(super) async fn cold_segment(&self, key: &str) -> Result<crate::cold::Segment, StoreError> {
        let cold = self
            .cold
            .as_ref()
            .ok_or_else(|| StoreError::Invalid(format!("segment {key} but no cold tier")))?;
        Ok(cold.get(key).await?)
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
}
