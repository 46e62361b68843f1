//! Storing an archive batch, in one transaction, idempotently: multi-row `INSERT OR IGNORE`s on
//! SQLite; on Postgres a `COPY`, falling back to `INSERT … SELECT FROM
//! UNNEST` when part of the batch is already stored. A cluster member's batch first passes the
//! fence check ([`check_fence`]) inside the same transaction.

use std::sync::{Arc, OnceLock};

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqliteArguments;
use sqlx::Arguments;

use ferry_shards::record::{format_rfc3339_millis, push_rfc3339_millis, Message};

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

/// The text forms of each row's `id` and `created_at` for one SQLite insert: borrowed from the
/// message's rendering where it has one (a delivered message does), otherwise written into one
/// buffer that the statement's arguments borrow. No string of their own per row.
#[derive(Default)]
struct RowTexts {
    text: String,
    /// Per row: `None` where the rendering has them, else where in `text` the id ends (and the
    /// time begins) and where the time ends. A rendering, once there, stays: a row that had none
    /// here may have one by the time it is bound, and is read from `text` all the same.
    ends: Vec<Option<(usize, usize)>>,
}

impl RowTexts {
    fn fill(&mut self, chunk: &[Arc<Message>]) {
        self.text.clear();
        self.ends.clear();
        for m in chunk {
            if m.rendered_id_and_time().is_some() {
                self.ends.push(None);
                continue;
            }
            self.text.reserve(uuid::fmt::Hyphenated::LENGTH + 24);
            self.text.push_str(
                m.id.hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            );
            let id_end = self.text.len();
            push_rfc3339_millis(&mut self.text, m.created_at_ms);
            self.ends.push(Some((id_end, self.text.len())));
        }
    }

    /// Row `i` (of the chunk given to [`RowTexts::fill`]): its id and time.
    fn row<'a>(&'a self, i: usize, m: &'a Message) -> (&'a str, &'a str) {
        match self.ends[i] {
            Some((id_end, end)) => (
                &self.text[id_end - uuid::fmt::Hyphenated::LENGTH..id_end],
                &self.text[id_end..end],
            ),
            None => m
                .rendered_id_and_time()
                .expect("a rendering, once there, stays"),
        }
    }
}

/// The values of one SQLite insert ([`sqlite_insert_sql`]), row by row in column order, added
/// straight into arguments sized for them.
fn sqlite_rows<'q>(
    chunk: &'q [Arc<Message>],
    texts: &'q RowTexts,
) -> Result<SqliteArguments<'q>, sqlx::Error> {
    fn add<'q, T>(args: &mut SqliteArguments<'q>, value: T) -> Result<(), sqlx::Error>
    where
        T: 'q + sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        args.add(value).map_err(sqlx::Error::Encode)
    }
    let mut args = SqliteArguments::default();
    args.reserve(chunk.len() * MESSAGE_COLUMNS, 0);
    for (i, m) in chunk.iter().enumerate() {
        let (id, created_at) = texts.row(i, m);
        add(&mut args, m.conversation_id.as_str())?;
        add(&mut args, to_i64(m.seq))?;
        add(&mut args, id)?;
        add(&mut args, m.sender.as_str())?;
        add(&mut args, &*m.kind)?;
        add(&mut args, m.content.get())?;
        add(&mut args, m.metadata.get())?;
        add(&mut args, created_at)?;
        add(&mut args, m.created_at_ms)?;
        add(&mut args, m.idempotency_key.as_deref())?;
        add(&mut args, i64::from(m.slot))?;
    }
    Ok(args)
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
                let mut texts = RowTexts::default();
                for size in sqlite_chunks(messages.len()) {
                    let (chunk, after) = rest.split_at(size);
                    rest = after;
                    texts.fill(chunk);
                    sqlx::query_with(sqlite_insert_sql(size), sqlite_rows(chunk, &texts)?)
                        .execute(&mut *tx)
                        .await?;
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
    // The id and the time as text: from the rendering where there is one (see `RowTexts`).
    let rendered = m.rendered_id_and_time();
    let mut id_buf = uuid::Uuid::encode_buffer();
    let id = match rendered {
        Some((id, _)) => id,
        None => m.id.hyphenated().encode_lower(&mut id_buf),
    };
    csv_text(buf, m.conversation_id.as_str());
    let _ = write!(buf, ",{},{id},", m.seq);
    csv_text(buf, m.sender.as_str());
    buf.push(b',');
    csv_text(buf, &m.kind);
    buf.push(b',');
    csv_text(buf, m.content.get());
    buf.push(b',');
    csv_text(buf, m.metadata.get());
    buf.push(b',');
    match rendered {
        Some((_, time)) => buf.extend_from_slice(time.as_bytes()),
        None => buf.extend_from_slice(format_rfc3339_millis(m.created_at_ms).as_bytes()),
    }
    let _ = write!(buf, ",{},", m.created_at_ms);
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

    /// A migrated SQLite store in a directory of its own (kept as long as the first value).
    async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let store = Store::connect(&url, 2).await.expect("open");
        store.migrate().await.expect("migrate");
        (dir, store)
    }

    /// A batch stored again, partly or whole (a retry after a failed commit, a replay after a
    /// crash), adds only the rows that are missing and leaves the stored ones as they were, over
    /// batches that take several statements.
    #[tokio::test]
    async fn sqlite_batches_stored_again_skip_the_rows_already_there() {
        let (_dir, store) = sqlite_store().await;
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

    /// The `id` and `created_at` columns hold the text forms of the message's id and time,
    /// whatever the time's width, row by row across a batch's statements.
    #[tokio::test]
    async fn sqlite_rows_store_each_id_and_time_as_text() {
        let (_dir, store) = sqlite_store().await;
        let id = ConversationId::parse("times").expect("id");
        // 7 rows: statements of 4, 2 and 1. Years 1970, 2023, 10000 (a wider time) and -1, each
        // both rendered and not.
        let times = [
            0,
            1_700_000_000_123,
            253_402_300_800_000,
            -62_198_755_200_001,
        ];
        let batch: Vec<Arc<Message>> = (1..=7)
            .map(|seq| {
                let mut m = Arc::unwrap_or_clone(message(&id, seq, "1", None));
                m.created_at_ms = times[seq as usize % times.len()];
                // Some rows are bound from their rendering, the others from text written here.
                if seq % 3 == 0 {
                    m.json_parts();
                }
                Arc::new(m)
            })
            .collect();
        store.insert_messages(&batch).await.expect("insert");
        let Db::Sqlite(pool) = &store.db else {
            unreachable!("sqlite url")
        };
        let rows: Vec<(i64, String, String, i64)> =
            sqlx::query_as("SELECT seq, id, created_at, created_at_ms FROM messages ORDER BY seq")
                .fetch_all(pool)
                .await
                .expect("select");
        assert_eq!(rows.len(), batch.len());
        for (m, (seq, id, created_at, ms)) in batch.iter().zip(rows) {
            assert_eq!(seq, m.seq as i64);
            assert_eq!(id, m.id.to_string(), "seq {seq}");
            assert_eq!(
                created_at,
                format_rfc3339_millis(m.created_at_ms),
                "seq {seq}"
            );
            assert_eq!(ms, m.created_at_ms);
        }
        assert!(batch
            .iter()
            .any(|m| format_rfc3339_millis(m.created_at_ms).len() != 24));
        store.close().await;
    }

    /// A COPY row is the same whether the id and time come from the rendering or are written
    /// for it, and holds them as text.
    #[test]
    fn csv_rows_are_the_same_rendered_or_not() {
        let id = ConversationId::parse("csv").expect("id");
        let plain = message(&id, 3, r#"{"a":"say \"hi\""}"#, Some("k"));
        let rendered = Arc::new((*plain).clone());
        rendered.json_parts();
        assert!(plain.rendered_id_and_time().is_none());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        csv_message_row(&mut a, &plain);
        csv_message_row(&mut b, &rendered);
        assert_eq!(
            String::from_utf8(a).unwrap(),
            String::from_utf8(b.clone()).unwrap()
        );
        let row = String::from_utf8(b).unwrap();
        let want = format!(
            ",3,{},\"alice\",\"text\",\"{{\"\"a\"\":\"\"say \\\"\"hi\\\"\"\"\"}}\",\"{{}}\",{},{},\"k\",5\n",
            plain.id,
            format_rfc3339_millis(plain.created_at_ms),
            plain.created_at_ms
        );
        assert_eq!(row, format!("\"csv\"{want}"));
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
