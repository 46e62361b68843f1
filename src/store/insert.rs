//! Storing an archive batch, in one transaction, idempotently: multi-row `INSERT OR IGNORE`s on
//! SQLite; on Postgres a `COPY`, falling back to `INSERT … SELECT FROM
//! UNNEST` when part of the batch is already stored. A cluster member's batch first passes the
//! fence check ([`check_fence`]) inside the same transaction.

use std::sync::{Arc, OnceLock};

use sqlx::postgres::PgPool;

use ferry_shards::record::{format_rfc3339_millis, Message};

use super::{to_i64, Db, Fence, Store, StoreError};

/// SQLite caps bound parameters per statement; 11 columns × 1024 rows stays well below it.
const MESSAGE_COLUMNS: usize = 11;
/// Rows per SQLite `INSERT` are a power of two up to this: a connection then prepares at most 11
/// distinct statements, each once (sqlx caches them), where one per batch size made most small
/// batches pay for parsing and planning a statement of their own.
const MAX_ROWS_PER_INSERT: usize = 1024;
// SQLite's limit on bound parameters per statement.
const _: () = assert!(MAX_ROWS_PER_INSERT * MESSAGE_COLUMNS < 32_766);

/// How a batch of `n` rows is split for SQLite: powers of two, largest first.
fn sqlite_chunks(n: usize) -> impl Iterator<Item = usize> {
    let mut rest = n;
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let size = if rest >= MAX_ROWS_PER_INSERT {
            MAX_ROWS_PER_INSERT
        } else {
            1 << rest.ilog2()
        };
        rest -= size;
        Some(size)
    })
}

/// The SQL of one SQLite insert of `rows` rows, `rows` a power of two up to
/// [`MAX_ROWS_PER_INSERT`]: written once per size, so a batch only binds its values.
///
/// `OR IGNORE` rather than `ON CONFLICT (conversation_id, seq) DO NOTHING`: a row already stored
/// is skipped either way (the table has no other unique index, and no value bound here is ever
/// NULL where the column refuses one), but with `DO NOTHING` a NOT NULL constraint could still
/// abort the statement halfway, so SQLite copied every page the statement changed into a
/// statement journal first (about 8 % of the archive's SQLite instructions). A batch stays all
/// or nothing: any error rolls back its whole transaction.
fn sqlite_insert_sql(rows: usize) -> &'static str {
    const SIZES: usize = MAX_ROWS_PER_INSERT.ilog2() as usize + 1;
    static SQL: [OnceLock<String>; SIZES] = [const { OnceLock::new() }; SIZES];
    debug_assert!(rows.is_power_of_two() && rows <= MAX_ROWS_PER_INSERT);
    SQL[rows.ilog2() as usize].get_or_init(|| {
        let row = format!("({})", ["?"; MESSAGE_COLUMNS].join(", "));
        format!(
            "INSERT OR IGNORE INTO messages (conversation_id, seq, id, sender, kind, content, \
             metadata, created_at, created_at_ms, idempotency_key, slot) VALUES {}",
            vec![row; rows].join(", ")
        )
    })
}

/// Postgres binds one array per column, so the row count is not limited by parameters; chunks
/// only keep a single statement's size reasonable.
const MAX_ROWS_PER_UNNEST: usize = 10_000;

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
    /// Stores a batch in one transaction; rows already present are left as they are.
    pub(super) async fn insert_messages(
        &self,
        messages: &[Arc<Message>],
    ) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                let mut rest = messages;
                for size in sqlite_chunks(messages.len()) {
                    let (chunk, after) = rest.split_at(size);
                    rest = after;
                    let mut q = sqlx::query(sqlite_insert_sql(size));
                    for m in chunk {
                        q = q
                            .bind(m.conversation_id.as_str())
                            .bind(to_i64(m.seq))
                            .bind(m.id.to_string())
                            .bind(m.sender.as_str())
                            .bind(&*m.kind)
                            .bind(m.content.get())
                            .bind(m.metadata.get())
                            .bind(format_rfc3339_millis(m.created_at_ms))
                            .bind(m.created_at_ms)
                            .bind(m.idempotency_key.as_deref())
                            .bind(m.slot as i64);
                    }
                    q.execute(&mut *tx).await?;
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
}

/// The fence and the `(slot, serving epoch, oldest message epoch)` of a batch
/// (`Fence::epochs`).
type FenceArgs<'a> = (&'a Fence, &'a [(u32, u64, u64)]);

/// The archive's fast path on Postgres: one `COPY … FROM STDIN (FORMAT csv)` per batch, in one
/// transaction. COPY does plain inserts where `INSERT … ON CONFLICT DO NOTHING` does speculative
/// ones, which costs the server noticeably more per row; the price is that a duplicate fails the
/// whole COPY (SQLSTATE 23505), and the caller then falls back to [`pg_insert_messages`].
async fn pg_copy_messages(
    pool: &PgPool,
    messages: &[Arc<Message>],
    fence: Option<FenceArgs<'_>>,
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
    fence: Option<FenceArgs<'_>>,
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
    fence: Option<FenceArgs<'_>>,
) -> Result<(), sqlx::Error> {
    use crate::cluster::db::ClusterDbError;
    let Some((fence, epochs)) = fence else {
        return Ok(());
    };
    let serving: Vec<(u32, u64)> = epochs
        .iter()
        .map(|&(slot, epoch, _)| (slot, epoch))
        .collect();
    match crate::cluster::db::check_fence(tx, &fence.node_id, &serving).await {
        Ok(()) => {}
        Err(ClusterDbError::Fenced(f)) => {
            metrics::counter!(ferry_shards::metrics::ARCHIVE_ERRORS_TOTAL).increment(1);
            if f.found_owner.as_deref() != Some(fence.node_id.as_str()) {
                tracing::error!(error = %f, "archive write fenced off: another node owns the slot; no longer serving it");
                // Taken without a hand-over from this node (a hand-over archives first): what
                // this node wrote of the slot may only be restored.
                let taken_at = f.found_epoch.unwrap_or(f.expected_epoch + 1);
                fence.gates.mark_lost(f.slot, taken_at);
                fence.gates.set_not_owned(f.slot, taken_at);
            } else {
                tracing::warn!(error = %f, "archive write under an old epoch of this node; retrying");
            }
            return Err(sqlx::Error::Protocol(format!("fenced: {f}")));
        }
        Err(e) => return Err(sqlx::Error::Protocol(format!("fence check failed: {e}"))),
    }
    // The slot may be this node's again, yet some of the batch was written before a failover
    // took the slot away from it: those messages belong in the seqs reserved for them, which
    // only a restore writes. Marking the slot lost makes the archiver take them out of its
    // queue and keep them for restore.
    let oldest: Vec<(u32, u64)> = epochs
        .iter()
        .filter(|&&(_, epoch, oldest)| oldest < epoch)
        .map(|&(slot, _, oldest)| (slot, oldest))
        .collect();
    match crate::cluster::db::failed_over_since(tx, &fence.node_id, &oldest).await {
        Ok(None) => Ok(()),
        Ok(Some((slot, epoch))) => {
            metrics::counter!(ferry_shards::metrics::ARCHIVE_ERRORS_TOTAL).increment(1);
            tracing::error!(
                slot,
                failover_epoch = epoch,
                "archive batch holds messages written before a failover took the slot from this node; keeping them for restore"
            );
            fence.gates.mark_lost(slot, epoch);
            Err(sqlx::Error::Protocol(format!(
                "fenced: slot {slot} was failed over at epoch {epoch} after some of the batch was written"
            )))
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

#[cfg(test)]
mod tests {
    use super::*;

    use ferry_shards::ids::{ConversationId, ParticipantId};
    use serde_json::value::RawValue;

    fn message(id: &ConversationId, seq: u64, content: &str, key: Option<&str>) -> Arc<Message> {
        Arc::new(Message {
            conversation_id: id.clone(),
            slot: 5,
            epoch: 0,
            seq,
            id: uuid::Uuid::now_v7(),
            created_at_ms: 1_700_000_000_000 + seq as i64,
            sender: ParticipantId::parse("alice").expect("id"),
            kind: "text".into(),
            content: RawValue::from_string(content.to_owned()).expect("json"),
            metadata: RawValue::from_string("{}".to_owned()).expect("json"),
            idempotency_key: key.map(Into::into),
            rendered: Default::default(),
        })
    }

    /// A batch stored again, partly or whole (a retry after a failed commit, a replay after a
    /// crash), adds only the rows that are missing and leaves the stored ones as they were, over
    /// batches that take several statements.
    #[tokio::test]
    async fn sqlite_batches_stored_again_skip_the_rows_already_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let store = Store::connect(&url, 2).await.expect("open");
        store.migrate().await.expect("migrate");
        let id = ConversationId::parse("replayed").expect("id");
        let first: Vec<_> = (1..=5)
            .map(|seq| message(&id, seq, r#""first""#, None))
            .collect();
        store.insert_messages(&first).await.expect("first batch");
        // 40 rows (statements of 32 and 8), the first five already stored with other content.
        let again: Vec<_> = (1..=40)
            .map(|seq| {
                message(
                    &id,
                    seq,
                    r#"{"second":true}"#,
                    (seq % 3 == 0).then_some("k"),
                )
            })
            .collect();
        store.insert_messages(&again).await.expect("second batch");
        store
            .insert_messages(&again)
            .await
            .expect("the same batch once more");
        let stored = store
            .read(&id, 0, u64::MAX, 100, false)
            .await
            .expect("read");
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
        for m in &stored {
            let want = if m.seq <= 5 {
                first[m.seq as usize - 1].id
            } else {
                again[m.seq as usize - 1].id
            };
            assert_eq!(m.id, want, "seq {}", m.seq);
            let content = if m.seq <= 5 {
                r#""first""#
            } else {
                r#"{"second":true}"#
            };
            assert_eq!(m.content.get(), content, "seq {}", m.seq);
        }
        store.close().await;
    }

    #[test]
    fn sqlite_insert_sql_has_a_placeholder_per_value() {
        for size in sqlite_chunks(2047) {
            let sql = sqlite_insert_sql(size);
            assert_eq!(
                sql.matches('?').count(),
                size * MESSAGE_COLUMNS,
                "{size} rows"
            );
            // The column list, one per row.
            assert_eq!(sql.matches('(').count(), size + 1, "{size} rows");
            assert!(sql.starts_with("INSERT OR IGNORE INTO messages"));
        }
    }

    #[test]
    fn sqlite_chunks_are_powers_of_two_that_add_up() {
        for n in [0, 1, 2, 3, 7, 100, 1023, 1024, 1025, 5000] {
            let sizes: Vec<usize> = sqlite_chunks(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "{n}: {sizes:?}");
            assert!(
                sizes
                    .iter()
                    .all(|s| s.is_power_of_two() && *s <= MAX_ROWS_PER_INSERT),
                "{n}: {sizes:?}"
            );
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{n}: {sizes:?}");
        }
        assert_eq!(sqlite_chunks(100).collect::<Vec<_>>(), vec![64, 32, 4]);
    }
}
