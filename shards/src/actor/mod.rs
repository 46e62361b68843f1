//! Slot and conversation actors (ractor).
//!
//! - [`slot::SlotActor`]: one per slot. Owns the lifecycle of its conversations: starts a
//!   conversation actor on first use without waiting for it to load, restarts it when it fails,
//!   and stops it when it has been idle and everything it wrote is archived. It is not on the
//!   append path once a conversation actor exists.
//! - [`conversation::ConversationActor`]: one per active conversation. Loads its state (the
//!   archive's snapshot and any WAL-recovered messages) in `pre_start`, then dedupes idempotency
//!   keys, assigns `seq`, and submits the record to the WAL without waiting for the fsync; the
//!   WAL's completion (on the writer thread) makes the message visible and answers the caller.
//!
//! ractor mailboxes are unbounded, so what goes into them is bounded in front of them: callers
//! reserve a place with
//! [`ConversationLog::try_admit`](crate::conversation_log::ConversationLog::try_admit) and get
//! `try_again` when the conversation already has `mailbox_capacity` appends waiting; a slot
//! actor gets one `Activate` per pending activation, and those are bounded per node
//! (`max_activations`, else `try_again` `activating`).

pub mod conversation;
pub mod slot;

use std::sync::{Arc, RwLock};

use ractor::ActorRef;

use crate::archive::ConversationMeta;
use crate::conversation_log::ConversationLog;

/// What a caller holds to talk to an active conversation without going through its slot.
#[derive(Clone)]
pub struct ConversationHandle {
    pub actor: ActorRef<conversation::ConversationMsg>,
    pub log: Arc<ConversationLog>,
    pub meta: Arc<RwLock<Arc<ConversationMeta>>>,
}

impl ConversationHandle {
    pub fn meta(&self) -> Arc<ConversationMeta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_meta(&self, meta: ConversationMeta) {
        *self.meta.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(meta);
    }
}
