//! Looking is not owning: reading a conversation without starting its writer.
//!
//! [`Node::peek`] answers from whatever already holds the conversation, in this order:
//! - its active actor's handle: the live log (ring, then the archive below it) and the cached
//!   description;
//! - a log WAL recovery left in the registry (no actor runs): that log, whose durable seq is the
//!   conversation's last seq, and the archive below its ring;
//! - the archive alone. With no actor and no log, every durable message is archived (a
//!   conversation retires only once it is, and a log stays registered while anything of it is
//!   not), so the archive's last seq is exact.
//!
//! A recovered log the archive is ahead of (a WAL repair cut off archived records) is passed
//! over, as activation passes it over: the archive then holds the complete history.

use std::sync::Arc;

use super::{Node, NodeError, Shared};
use crate::actor::ConversationHandle;
use crate::archive::ConversationMeta;
use crate::conversation_log::ConversationLog;
use crate::ids::ConversationId;
use crate::metrics as m;
use crate::record::Message;

/// A read-only view of one conversation; see the module docs. Cheap to hold; it keeps no actor
/// alive and registers nothing.
pub struct ConversationReader {
    shared: Arc<Shared>,
    id: ConversationId,
    source: Source,
}

enum Source {
    Active(ConversationHandle),
    Recovered {
        log: Arc<ConversationLog>,
        meta: Arc<ConversationMeta>,
    },
    Archived {
        meta: Arc<ConversationMeta>,
        last_seq: u64,
    },
}

impl Node {
    /// A read-only view of a conversation of a slot this node owns; starts no actor. `NotFound`
    /// when the conversation does not exist, `NotOwner` for a slot this node does not own.
    pub async fn peek(&self, id: &ConversationId) -> Result<ConversationReader, NodeError> {
        let slot = self.slot_of(id);
        let (handle, log) = {
            let registry = self.shared.registry(slot);
            (
                registry.handles.get(id).cloned(),
                registry.logs.get(id).cloned(),
            )
        };
        let reader = |source| ConversationReader {
            shared: self.shared.clone(),
            id: id.clone(),
            source,
        };
        if let Some(handle) = handle {
            return Ok(reader(Source::Active(handle)));
        }
        if self.shared.gates.owned_epoch(slot).is_none() {
            return Err(NodeError::NotOwner { slot });
        }
        let summary = self
            .shared
            .archive
            .describe_conversation(id)
            .await?
            .ok_or(NodeError::NotFound)?;
        let meta = Arc::new(summary.meta);
        Ok(reader(match log {
            Some(log) if log.durable_seq() >= summary.last_seq => Source::Recovered { log, meta },
            _ => Source::Archived {
                meta,
                last_seq: summary.last_seq,
            },
        }))
    }
}

impl ConversationReader {
    pub fn id(&self) -> &ConversationId {
        &self.id
    }

    /// The description: the active actor's cached copy, otherwise the archive's.
    pub fn meta(&self) -> Arc<ConversationMeta> {
        match &self.source {
            Source::Active(handle) => handle.meta(),
            Source::Recovered { meta, .. } | Source::Archived { meta, .. } => meta.clone(),
        }
    }

    /// The last durable seq (live while a log backs this view).
    pub fn last_seq(&self) -> u64 {
        match &self.source {
            Source::Active(handle) => handle.log.durable_seq(),
            Source::Recovered { log, .. } => log.durable_seq(),
            Source::Archived { last_seq, .. } => *last_seq,
        }
    }

    /// The conversation's actor, when it was running as this view was taken.
    pub fn active(&self) -> Option<&ConversationHandle> {
        match &self.source {
            Source::Active(handle) => Some(handle),
            _ => None,
        }
    }

    fn log(&self) -> Option<&Arc<ConversationLog>> {
        match &self.source {
            Source::Active(handle) => Some(&handle.log),
            Source::Recovered { log, .. } => Some(log),
            Source::Archived { .. } => None,
        }
    }

    /// Messages with `seq > after_seq`, at most `limit`, ascending.
    pub async fn read_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, NodeError> {
        match self.log() {
            Some(log) => read_log_after(&self.shared, log, after_seq, limit).await,
            None => {
                let last_seq = self.last_seq();
                if limit == 0 || after_seq >= last_seq {
                    return Ok(Vec::new());
                }
                metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
                let before_seq = last_seq + 1;
                Ok(self
                    .shared
                    .archive
                    .read_messages(&self.id, after_seq, before_seq, limit, false)
                    .await?)
            }
        }
    }

    /// The newest messages with `seq < before_seq`, at most `limit`, ascending.
    pub async fn read_before(
        &self,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, NodeError> {
        match self.log() {
            Some(log) => read_log_before(&self.shared, log, before_seq, limit).await,
            None => {
                let below = before_seq.min(self.last_seq().saturating_add(1));
                if limit == 0 || below <= 1 {
                    return Ok(Vec::new());
                }
                metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
                Ok(self
                    .shared
                    .archive
                    .read_messages(&self.id, 0, below, limit, true)
                    .await?)
            }
        }
    }
}

/// Messages with `seq > after_seq`, at most `limit`, ascending: ring first, archive below it.
pub(super) async fn read_log_after(
    shared: &Shared,
    log: &ConversationLog,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<Arc<Message>>, NodeError> {
    let ring = log.read_after(after_seq, limit);
    if after_seq.saturating_add(1) >= ring.ring_first_seq || after_seq >= ring.durable_seq {
        shared.ack_metrics.ring_reads.increment(1);
        return Ok(ring.messages);
    }
    metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
    let mut out = shared
        .archive
        .read_messages(&log.id, after_seq, ring.ring_first_seq, limit, false)
        .await?;
    // Fewer than `limit` means SQL gave everything it holds before the ring: the ring goes on
    // from there (seqs between them, if any, are reserved ones that hold nothing).
    if out.len() < limit {
        let room = limit - out.len();
        out.extend(ring.messages.into_iter().take(room));
    }
    Ok(out)
}

/// The newest messages with `seq < before_seq`, at most `limit`, ascending: ring first, archive
/// below it.
pub(super) async fn read_log_before(
    shared: &Shared,
    log: &ConversationLog,
    before_seq: u64,
    limit: usize,
) -> Result<Vec<Arc<Message>>, NodeError> {
    let (ring_first_seq, mut from_ring) = log.read_before(before_seq, limit);
    let below = before_seq.min(ring_first_seq);
    if from_ring.len() >= limit || below <= 1 {
        return Ok(from_ring);
    }
    metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
    let mut out = shared
        .archive
        .read_messages(&log.id, 0, below, limit - from_ring.len(), true)
        .await?;
    out.append(&mut from_ring);
    Ok(out)
}
