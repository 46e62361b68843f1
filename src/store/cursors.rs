//! Read and ack cursors, one row per participant and conversation, that only ever move forward;
//! and the inbox's unread count below a cursor, which reaches into segments when SQL no longer
//! holds the range.

use ferry_shards::ids::{ConversationId, ParticipantId};

use super::{to_i64, Db, Store, StoreError};

impl Store {
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
}
