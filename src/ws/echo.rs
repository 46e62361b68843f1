//! Joins with `{"echo": false}`: the messages a join sends itself are not pushed back to it.
//!
//! A join's delivery reads every message of the conversation; it has to tell its own apart
//! without anything stored in the message. [`OwnSends`] learns the seq of each of the join's sends
//! when its outcome arrives, and the delivery skips those seqs. The delivery can see a message
//! before that outcome reaches the socket (both follow the same durable advance), so for a
//! message whose seq it does not know as its own it first waits until every send made *before the
//! message was looked at* has its outcome: a message that is already durable can only be one of
//! those, never a later send, so a join that keeps sending never holds other senders' messages
//! back for longer than one append takes.
//!
//! Memory: the seqs learned and not yet skipped, at most [`MAX_KNOWN`] (the oldest are forgotten
//! past that and would be pushed after all: a harmless echo, never a lost message), and one entry
//! per send in flight (bounded by `limits.socket_in_flight`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Most own seqs remembered ahead of the delivery.
const MAX_KNOWN: usize = 16_384;

/// The sends of one join and the seqs they were given.
#[derive(Default)]
pub struct OwnSends {
    state: Mutex<State>,
    resolved: Notify,
}

#[derive(Default)]
struct State {
    /// The number the next send gets.
    next: u64,
    /// Sends whose outcome has not arrived.
    unresolved: BTreeSet<u64>,
    /// Seqs of this join's sends that the delivery has not reached yet.
    seqs: BTreeSet<u64>,
}

/// One send of the join, in flight until [`SendTicket::resolve`] (or until it is dropped, when the
/// send never got a seq).
pub struct SendTicket {
    sends: Arc<OwnSends>,
    n: u64,
    seq: Option<u64>,
}

impl OwnSends {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a send; call it before the send is handed on.
    pub fn submit(self: &Arc<Self>) -> SendTicket {
        let mut state = self.lock();
        let n = state.next;
        state.next += 1;
        state.unresolved.insert(n);
        SendTicket {
            sends: self.clone(),
            n,
            seq: None,
        }
    }

    /// Whether the message at `seq` was sent by this join. The delivery asks in seq order: every
    /// remembered seq below `seq` is forgotten (it was skipped, or will never be reached).
    pub async fn is_own(&self, seq: u64) -> bool {
        // Sends numbered from here on were made after the message was first looked at.
        let mut horizon = None;
        loop {
            let notified = self.resolved.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                let horizon = *horizon.get_or_insert(state.next);
                if state.seqs.first().is_some_and(|&first| first < seq) {
                    state.seqs = state.seqs.split_off(&seq);
                }
                if state.seqs.remove(&seq) {
                    return true;
                }
                if state.unresolved.first().is_none_or(|&n| n >= horizon) {
                    return false;
                }
            }
            notified.await;
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.lock().seqs.len()
    }
}

impl SendTicket {
    /// The send's outcome: the seq it was stored at, or `None` (refused, or a repeat of an
    /// idempotency key whose message is not this send's).
    pub fn resolve(mut self, seq: Option<u64>) {
        self.seq = seq;
    }
}

impl Drop for SendTicket {
    fn drop(&mut self) {
        {
            let mut state = self.sends.lock();
            state.unresolved.remove(&self.n);
            if let Some(seq) = self.seq {
                state.seqs.insert(seq);
                if state.seqs.len() > MAX_KNOWN {
                    state.seqs.pop_first();
                }
            }
        }
        self.sends.resolved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn own_seqs_are_skipped_and_others_pass() {
        let sends = Arc::new(OwnSends::default());
        sends.submit().resolve(Some(2));
        sends.submit().resolve(None);
        assert!(!sends.is_own(1).await);
        assert!(sends.is_own(2).await);
        assert!(!sends.is_own(3).await);
        assert_eq!(sends.remembered(), 0);
    }

    #[tokio::test]
    async fn a_message_waits_for_the_sends_made_before_it_was_looked_at() {
        let sends = Arc::new(OwnSends::default());
        let ticket = sends.submit();
        let check = tokio::spawn({
            let sends = sends.clone();
            async move { sends.is_own(7).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !check.is_finished(),
            "decided before the earlier send resolved"
        );
        // A send made after the message was looked at does not hold it back.
        let later = sends.submit();
        ticket.resolve(Some(7));
        assert!(check.await.unwrap());
        drop(later);
    }

    #[tokio::test]
    async fn later_sends_never_hold_a_message_back() {
        let sends = Arc::new(OwnSends::default());
        let first = sends.submit();
        let check = tokio::spawn({
            let sends = sends.clone();
            async move { sends.is_own(5).await }
        });
        tokio::task::yield_now().await;
        let _later: Vec<_> = (0..10).map(|_| sends.submit()).collect();
        drop(first);
        assert!(!check.await.unwrap());
    }

    #[tokio::test]
    async fn seqs_behind_the_delivery_are_forgotten_and_memory_is_bounded() {
        let sends = Arc::new(OwnSends::default());
        for seq in [3, 4, 9] {
            sends.submit().resolve(Some(seq));
        }
        assert!(!sends.is_own(6).await);
        assert_eq!(sends.remembered(), 1);
        for seq in 0..(MAX_KNOWN as u64 + 10) {
            sends.submit().resolve(Some(100 + seq));
        }
        assert_eq!(sends.remembered(), MAX_KNOWN);
        // The oldest were forgotten: pushed after all.
        assert!(!sends.is_own(100).await);
        assert!(sends.is_own(200).await);
    }
}
