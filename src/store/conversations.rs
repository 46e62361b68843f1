//! Conversations and their participants: create or join ([`Store::upsert_conversation`]),
//! read one back, list a participant's conversations. The participant list lives twice, as the
//! JSON array on the conversation row and as `conversation_participants` rows (the index
//! `conversations_of` reads); an upsert writes both in one transaction.

use serde_json::value::RawValue;
use sqlx::types::Json;

use ferry_shards::archive::ConversationMeta;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::format_rfc3339_millis;

use super::{Backend, Db, Store, StoreError};

/// Outcome of creating a conversation.
pub struct Upserted {
    pub meta: ConversationMeta,
    pub created: bool,
    /// Participants this call added (all of them when it created the conversation).
    pub added: Vec<ParticipantId>,
}

/// `participants, metadata, created_at_ms` of a conversation.
type ConversationRow = (Json<Vec<String>>, Json<Box<RawValue>>, i64);

const SELECT_CONVERSATION: &str =
    "SELECT participants, metadata, created_at_ms FROM conversations WHERE id = $1";

impl Store {
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
            if let (true, Some(slots)) = (inserted, self.cluster_slots) {
                // The slot's failovers so far happened before this conversation existed: none
                // of them reserves seqs in it (src/cluster/reserve.rs).
                sqlx::query(crate::cluster::reserve::MARK_CREATED)
                .bind(id.as_str())
                .bind(ferry_shards::placement::slot_of(id.as_str(), slots) as i32)
                .execute(&mut *tx)
                .await?;
            }
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
