//! Reserved seqs (PROTOCOL.md "Node loss"; migration `0005_reserved_seqs.sql`).
//!
//! A failover hands a dead node's slots to live nodes without its disk. Under `durability =
//! local` that node may have acknowledged messages nobody else has, so in every conversation of
//! those slots the seqs `L+1 ..= L+reserve` (with `L` the highest seq archived or reserved
//! before) are kept for them, and new appends continue after. Reserving is lazy and happens once
//! per (conversation, failover): when the new owner first starts the conversation, or when the
//! dead node's messages come back, whichever is first ([`ClusterDb::ensure_reservations`], with
//! the conversation's row in `conversation_failovers` locked, so the two cannot both reserve).
//! A conversation created after a failover records that failover as already taken into account
//! ([`ClusterDb::mark_created`]): the dead node never knew it.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{Postgres, Transaction};

use ferry_shards::archive::{
    Archive, ArchiveError, BoxFuture, ConversationSnapshot, ConversationSummary, Restored,
};
use ferry_shards::ids::ConversationId;
use ferry_shards::placement::slot_of;
use ferry_shards::record::Message;

use super::db::{ClusterDb, ClusterDbError};

type Result<T> = std::result::Result<T, ClusterDbError>;

/// Seqs `from_seq ..= to_seq` of a conversation kept for `node_id`'s messages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reservation {
    pub from_seq: u64,
    pub to_seq: u64,
    /// The failover's epoch.
    pub epoch: u64,
    pub node_id: String,
    /// How many of them were written back when the node returned.
    pub restored: u64,
}

/// Records, for conversation `$1` of slot `$2`, that every failover of the slot so far came
/// before it (run in the transaction that creates the conversation).
pub const MARK_CREATED: &str = "INSERT INTO conversation_failovers (conversation_id, epoch) \
     SELECT $1, COALESCE(MAX(epoch), 0) FROM slot_failovers WHERE slot = $2 \
     ON CONFLICT (conversation_id) DO NOTHING";

fn sql_i64(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| ClusterDbError::Refused(format!("{what} {n} is out of range")))
}

fn sql_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl ClusterDb {
    /// Accounts for every failover of `slot` that `conversation` has not yet taken into account:
    /// each one that reserves (`reserve > 0`) gets the next `reserve` seqs after the highest seq
    /// archived (`archived_last_seq`) or reserved before. Returns the conversation's last seq
    /// counting its reservations: where its appends continue.
    pub async fn ensure_reservations(
        &self,
        conversation: &str,
        slot: u32,
        archived_last_seq: u64,
    ) -> Result<u64> {
        // The common case: the slot was never failed over, so nothing is or will be reserved
        // in it; one read, no write.
        let (any,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM slot_failovers WHERE slot = $1)")
                .bind(slot as i32)
                .fetch_one(self.pool())
                .await?;
        if !any {
            return Ok(archived_last_seq);
        }
        let mut tx = self.pool().begin().await?;
        let last = ensure_in(&mut tx, conversation, slot, archived_last_seq).await?;
        tx.commit().await?;
        Ok(last)
    }

    /// Records that `conversation` (of `slot`) was created after every failover of its slot so
    /// far: none of them reserves anything in it.
    pub async fn mark_created(&self, conversation: &str, slot: u32) -> Result<()> {
        sqlx::query(MARK_CREATED)
            .bind(conversation)
            .bind(slot as i32)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The conversation's reservations, in seq order.
    pub async fn reservations(&self, conversation: &str) -> Result<Vec<Reservation>> {
        let rows: Vec<(i64, i64, i64, String, i64)> = sqlx::query_as(
            "SELECT from_seq, to_seq, epoch, node_id, restored FROM reserved_seqs \
             WHERE conversation_id = $1 ORDER BY from_seq",
        )
        .bind(conversation)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(from, to, epoch, node_id, restored)| Reservation {
                from_seq: sql_u64(from),
                to_seq: sql_u64(to),
                epoch: sql_u64(epoch),
                node_id,
                restored: sql_u64(restored),
            })
            .collect())
    }

    /// Reserved seqs per slot, for the slot map: `(slot, conversations with a reservation, seqs
    /// reserved, seqs restored)`.
    pub async fn reservation_totals(&self) -> Result<Vec<(u32, u64, u64, u64)>> {
        let rows: Vec<(i32, i64, i64, i64)> = sqlx::query_as(
            "SELECT slot, COUNT(DISTINCT conversation_id), \
                    COALESCE(SUM(to_seq - from_seq + 1), 0)::BIGINT, \
                    COALESCE(SUM(restored), 0)::BIGINT \
             FROM reserved_seqs GROUP BY slot ORDER BY slot",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(slot, c, r, s)| (slot.max(0) as u32, sql_u64(c), sql_u64(r), sql_u64(s)))
            .collect())
    }
}

impl ClusterDb {
    /// Writes `messages` (of `conversation`, which `node_id` acknowledged before its slot was
    /// failed over) into the seqs reserved for that node, in one transaction that holds the
    /// conversation's reservation row. `known_keys` are idempotency keys the owner holds in
    /// memory beyond what SQL has. Never writes a seq that is not reserved for `node_id`.
    pub async fn restore_messages(
        &self,
        conversation: &str,
        node_id: &str,
        messages: &[Arc<Message>],
        known_keys: &HashSet<String>,
    ) -> Result<Restored> {
        let mut out = Restored::default();
        let mut tx = self.pool().begin().await?;
        lock_conversation(&mut tx, conversation).await?;
        let ranges: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT from_seq, to_seq FROM reserved_seqs \
             WHERE conversation_id = $1 AND node_id = $2 ORDER BY from_seq",
        )
        .bind(conversation)
        .bind(node_id)
        .fetch_all(&mut *tx)
        .await?;
        // A node whose failovers of this slot reserved nothing ran `archive`: it acknowledged
        // only what SQL holds, so what SQL lacks was never acknowledged.
        let slot = messages.first().map_or(0, |m| m.slot as i32);
        let (reserving, plain): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE reserve > 0), COUNT(*) FILTER (WHERE reserve = 0) \
             FROM slot_failovers WHERE slot = $1 AND from_node = $2",
        )
        .bind(slot)
        .bind(node_id)
        .fetch_one(&mut *tx)
        .await?;
        let never_acknowledged = ranges.is_empty() && reserving == 0 && plain > 0;
        // Below this, history lives in cold segments or has expired: reads never look at SQL
        // rows there, so a message written there would be stored but never read.
        let (cold_through,): (i64,) = sqlx::query_as(
            "SELECT GREATEST( \
                 (SELECT COALESCE(MAX(last_seq), 0) FROM message_segments WHERE conversation_id = $1), \
                 (SELECT COALESCE(MAX(expired_through_seq), 0) FROM conversations WHERE id = $1))",
        )
        .bind(conversation)
        .fetch_one(&mut *tx)
        .await?;
        for m in messages {
            let seq = sql_i64("seq", m.seq)?;
            let reserved = ranges.iter().find(|(a, b)| *a <= seq && seq <= *b);
            let held: Option<(String,)> = sqlx::query_as(
                "SELECT CAST(id AS TEXT) FROM messages WHERE conversation_id = $1 AND seq = $2",
            )
            .bind(conversation)
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await?;
            let orphan_reason = match (reserved, held) {
                (_, Some((id,))) if id == m.id.to_string() => {
                    out.present.push(m.seq);
                    continue;
                }
                (_, Some(_)) if never_acknowledged => {
                    out.unacknowledged.push(m.seq);
                    continue;
                }
                (None, None) if never_acknowledged => {
                    out.unacknowledged.push(m.seq);
                    continue;
                }
                (_, Some(_)) => Some("another message holds the seq"),
                (None, None) => Some("no reservation for this node covers the seq"),
                (Some(_), None) if seq <= cold_through => {
                    Some("the seq's range was moved to cold storage or expired before the restore")
                }
                (Some(_), None) => None,
            };
            if let Some(reason) = orphan_reason {
                tracing::error!(
                    conversation,
                    node = node_id,
                    seq = m.seq,
                    id = %m.id,
                    reason,
                    "a restored message has no seq reserved for it; kept in orphaned_messages"
                );
                sqlx::query(
                    "INSERT INTO orphaned_messages (conversation_id, seq, node_id, epoch, message, reason) \
                     VALUES ($1, $2, $3, $4, CAST($5 AS JSONB), $6) \
                     ON CONFLICT (conversation_id, seq, node_id) DO NOTHING",
                )
                .bind(conversation)
                .bind(seq)
                .bind(node_id)
                .bind(sql_i64("epoch", m.epoch)?)
                .bind(m.to_json())
                .bind(reason)
                .execute(&mut *tx)
                .await?;
                out.orphaned.push(m.seq);
                continue;
            }
            if let Some(key) = m.idempotency_key.as_deref() {
                let taken: Option<(i64,)> = sqlx::query_as(
                    "SELECT seq FROM messages WHERE conversation_id = $1 AND idempotency_key = $2 \
                     LIMIT 1",
                )
                .bind(conversation)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if taken.is_some() || known_keys.contains(key) {
                    out.duplicates.push(m.seq);
                    continue;
                }
            }
            sqlx::query(
                "INSERT INTO messages \
                 (conversation_id, seq, id, sender, kind, content, metadata, created_at, created_at_ms, idempotency_key, slot) \
                 VALUES ($1, $2, CAST($3 AS UUID), $4, $5, CAST($6 AS JSONB), CAST($7 AS JSONB), \
                         TIMESTAMPTZ 'epoch' + $8 * INTERVAL '1 millisecond', $8, $9, $10)",
            )
            .bind(conversation)
            .bind(seq)
            .bind(m.id.to_string())
            .bind(m.sender.as_str())
            .bind(&*m.kind)
            .bind(m.content.get())
            .bind(m.metadata.get())
            .bind(m.created_at_ms)
            .bind(m.idempotency_key.as_deref())
            .bind(i64::from(m.slot))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE reserved_seqs SET restored = restored + 1 \
                 WHERE conversation_id = $1 AND node_id = $2 AND from_seq <= $3 AND $3 <= to_seq",
            )
            .bind(conversation)
            .bind(node_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            out.restored.push(m.seq);
        }
        tx.commit().await?;
        Ok(out)
    }
}

/// Locks the conversation's row in `conversation_failovers` (made if missing) until `tx` ends,
/// so reserving and restoring in one conversation take turns; returns the failover epoch it
/// has accounted for.
async fn lock_conversation(
    tx: &mut Transaction<'static, Postgres>,
    conversation: &str,
) -> Result<i64> {
    sqlx::query(
        "INSERT INTO conversation_failovers (conversation_id, epoch) VALUES ($1, 0) \
         ON CONFLICT (conversation_id) DO NOTHING",
    )
    .bind(conversation)
    .execute(&mut **tx)
    .await?;
    let (seen,): (i64,) = sqlx::query_as(
        "SELECT epoch FROM conversation_failovers WHERE conversation_id = $1 FOR UPDATE",
    )
    .bind(conversation)
    .fetch_one(&mut **tx)
    .await?;
    Ok(seen)
}

/// [`ClusterDb::ensure_reservations`] inside `tx`, which keeps the conversation's row in
/// `conversation_failovers` locked until it ends.
pub(super) async fn ensure_in(
    tx: &mut Transaction<'static, Postgres>,
    conversation: &str,
    slot: u32,
    archived_last_seq: u64,
) -> Result<u64> {
    let seen = lock_conversation(tx, conversation).await?;
    let (reserved_to,): (Option<i64>,) =
        sqlx::query_as("SELECT MAX(to_seq) FROM reserved_seqs WHERE conversation_id = $1")
            .bind(conversation)
            .fetch_one(&mut **tx)
            .await?;
    let mut last = archived_last_seq.max(reserved_to.map_or(0, sql_u64));
    let failovers: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT epoch, from_node, reserve FROM slot_failovers \
         WHERE slot = $1 AND epoch > $2 ORDER BY epoch",
    )
    .bind(slot as i32)
    .bind(seen)
    .fetch_all(&mut **tx)
    .await?;
    let Some(newest) = failovers.last().map(|f| f.0) else {
        return Ok(last);
    };
    for (epoch, from_node, reserve) in failovers {
        let reserve = sql_u64(reserve);
        if reserve == 0 {
            continue;
        }
        let from = last + 1;
        let to = last + reserve;
        sqlx::query(
            "INSERT INTO reserved_seqs (conversation_id, from_seq, to_seq, slot, epoch, node_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(conversation)
        .bind(sql_i64("seq", from)?)
        .bind(sql_i64("seq", to)?)
        .bind(slot as i32)
        .bind(epoch)
        .bind(&from_node)
        .execute(&mut **tx)
        .await?;
        tracing::info!(
            conversation,
            slot,
            epoch,
            node = %from_node,
            from_seq = from,
            to_seq = to,
            "reserved seqs for a failed-over node"
        );
        last = to;
    }
    sqlx::query("UPDATE conversation_failovers SET epoch = $2 WHERE conversation_id = $1")
        .bind(conversation)
        .bind(newest)
        .execute(&mut **tx)
        .await?;
    Ok(last)
}

/// The archive a clustered node's conversation actors load from: the store, with the
/// conversation's reservations taken into account first, so its appends continue after them.
pub struct ReservingArchive<A> {
    inner: A,
    db: ClusterDb,
    slot_count: u32,
}

impl<A: Archive> ReservingArchive<A> {
    pub fn new(inner: A, db: ClusterDb, slot_count: u32) -> ReservingArchive<A> {
        ReservingArchive {
            inner,
            db,
            slot_count,
        }
    }
}

impl<A: Archive> Archive for ReservingArchive<A> {
    fn load_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
        dedupe_window: usize,
    ) -> BoxFuture<'a, std::result::Result<Option<ConversationSnapshot>, ArchiveError>> {
        Box::pin(async move {
            let Some(mut snapshot) = self.inner.load_conversation(id, dedupe_window).await? else {
                return Ok(None);
            };
            let slot = slot_of(id.as_str(), self.slot_count);
            snapshot.last_seq = self
                .db
                .ensure_reservations(id.as_str(), slot, snapshot.last_seq)
                .await
                .map_err(|e| ArchiveError::Unavailable(format!("reserved seqs: {e}")))?;
            Ok(Some(snapshot))
        })
    }

    /// What SQL holds, reserving nothing: readers and start-up checks must not reserve.
    fn describe_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
    ) -> BoxFuture<'a, std::result::Result<Option<ConversationSummary>, ArchiveError>> {
        self.inner.describe_conversation(id)
    }

    fn store_messages<'a>(
        &'a self,
        messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, std::result::Result<(), ArchiveError>> {
        self.inner.store_messages(messages)
    }

    fn max_concurrent_batches(&self) -> usize {
        self.inner.max_concurrent_batches()
    }

    fn restore_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        node_id: &'a str,
        messages: &'a [Arc<Message>],
        known_keys: &'a HashSet<String>,
    ) -> BoxFuture<'a, std::result::Result<Restored, ArchiveError>> {
        Box::pin(async move {
            // The owner's actor that calls this took the conversation's reservations when it
            // loaded (after the failover: an actor stops when its slot leaves the node).
            self.db
                .restore_messages(id.as_str(), node_id, messages, known_keys)
                .await
                .map_err(|e| ArchiveError::Unavailable(format!("restore: {e}")))
        })
    }

    fn read_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> BoxFuture<'a, std::result::Result<Vec<Arc<Message>>, ArchiveError>> {
        self.inner
            .read_messages(id, after_seq, before_seq, limit, newest_first)
    }
}
