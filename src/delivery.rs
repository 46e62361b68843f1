//! Cursor-driven delivery: a subscriber is a position, not a queue.
//!
//! A [`Cursor`] yields every durable message after its position, in seq order, exactly once,
//! wherever the conversation lives:
//! - **on this node** (it owns the slot): from the hot ring when it holds them, otherwise from SQL
//!   in pages, then live as the durable seq advances. While such a cursor exists its
//!   conversation's actor is not retired (the watch receiver counts as a subscriber);
//! - **on another node**: live messages arrive through the cluster's Redis fan-out and are
//!   delivered only when they continue the position exactly; anything else (a gap, a lagged
//!   receiver, a Redis reconnect, or simply a second without news — a lost *last* message is no
//!   gap) makes the cursor read the missing messages from the owner, or from the archive while
//!   the owner is unavailable.
//!
//! Seqs a failover reserved for a lost node (`docs/runtime-semantics.md`, "Node loss") may hold
//! nothing: a batch that jumps over such seqs carries a `gap` for them, and a jump over seqs
//! that are not reserved is an error, as before.
//!
//! When the slot moves, a local cursor finds its log marked moved and continues as a remote one
//! from the same position (and a remote one becomes local when the slot comes here), so a
//! subscriber sees no gap and no repeat across moves. A cursor holds at most one page plus the
//! live messages that arrived ahead of it, so a slow consumer simply reads later — it is never
//! disconnected and never loses a message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use ferry_shards::actor::ConversationHandle;
use ferry_shards::ids::ConversationId;
use ferry_shards::record::Message;

use crate::http::error::ApiError;
use crate::http::AppState;
use crate::service::{self, Fetched};

/// Live messages kept ahead of a remote cursor's position before it reads from the owner
/// instead (a subscriber far behind does not buffer the live stream).
const MAX_AHEAD: usize = 4096;
/// Least time between two gap-driven reads from the owner.
const GAP_RETRY: Duration = Duration::from_millis(20);

pub struct Cursor {
    state: AppState,
    id: ConversationId,
    /// Last seq handed out.
    position: u64,
    page: usize,
    source: Source,
    /// The conversation's reserved seq ranges, read when a batch first jumps.
    reserved: Option<Vec<(u64, u64)>>,
}

/// What a cursor hands out next: reserved seqs it passed that hold nothing (`gap`, before the
/// messages), then messages in seq order. Never both empty.
#[derive(Debug, Default)]
pub struct Batch {
    pub gap: Option<(u64, u64)>,
    pub messages: Vec<Arc<Message>>,
}

enum Source {
    Local {
        handle: ConversationHandle,
        durable: watch::Receiver<u64>,
    },
    Remote(Box<Remote>),
}

struct Remote {
    live: Option<broadcast::Receiver<Arc<Message>>>,
    generation: Option<watch::Receiver<u64>>,
    /// Live messages past the position, waiting for the ones before them.
    ahead: BTreeMap<u64, Arc<Message>>,
    /// A read from the owner is due now.
    fetch: bool,
    next_check: Instant,
    last_fetch: Option<Instant>,
}

impl Cursor {
    /// A cursor after `after_seq`; `local` is the conversation's handle when this node owns it.
    pub fn new(
        state: AppState,
        id: ConversationId,
        local: Option<ConversationHandle>,
        after_seq: u64,
        page: usize,
    ) -> Cursor {
        let source = match local {
            Some(handle) => Source::Local {
                durable: handle.log.watch_durable(),
                handle,
            },
            None => Source::Remote(Box::new(remote_source(&state, &id))),
        };
        Cursor {
            state,
            id,
            position: after_seq,
            page: page.max(1),
            source,
            reserved: None,
        }
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next non-empty batch after the position; waits for new messages when caught up.
    pub async fn next_batch(&mut self) -> Result<Batch, ApiError> {
        loop {
            let became = match &mut self.source {
                Source::Local { handle, durable } => {
                    if handle.log.is_moved() {
                        Some(Source::Remote(Box::new(remote_source(
                            &self.state,
                            &self.id,
                        ))))
                    } else {
                        let durable_seq = *durable.borrow_and_update();
                        if durable_seq > self.position {
                            let batch = self
                                .state
                                .node
                                .read_after(handle, self.position, self.page)
                                .await?;
                            if !batch.is_empty() {
                                return self.advance(batch).await;
                            }
                        }
                        if durable.changed().await.is_err() {
                            return Err(ApiError::unavailable("conversation stopped"));
                        }
                        None
                    }
                }
                Source::Remote(remote) => {
                    // Boxed: a remote read is the largest future here, and a cursor that waits
                    // on its local log (most of them, most of the time) should not carry its
                    // room (this future lives in every joined topic's delivery).
                    let step = Box::pin(next_remote(
                        &self.state,
                        &self.id,
                        self.position,
                        self.page,
                        remote,
                    ))
                    .await?;
                    match step {
                        RemoteStep::Batch(batch) => return self.advance(batch).await,
                        RemoteStep::BecameLocal(handle) => Some(Source::Local {
                            durable: handle.log.watch_durable(),
                            handle,
                        }),
                        RemoteStep::Waited => None,
                    }
                }
            };
            if let Some(source) = became {
                self.source = source;
            }
        }
    }

    /// Hands out `batch` (non-empty, ascending, after the position) up to its first hole; a
    /// jump over reserved seqs at its start becomes the batch's gap.
    async fn advance(&mut self, mut batch: Vec<Arc<Message>>) -> Result<Batch, ApiError> {
        let mut gap = None;
        let first = batch[0].seq;
        if first != self.position + 1 {
            let (from, to) = (self.position + 1, first.saturating_sub(1));
            // Boxed like a remote read: rare, and a query's future is large.
            if !Box::pin(self.reserved_covers(from, to)).await? {
                return Err(ApiError::unavailable(format!(
                    "history between seq {} and {} is not readable",
                    self.position, first
                )));
            }
            gap = Some((from, to));
        }
        // A hole inside the batch is handed out by the next call, with its own gap.
        if let Some(cut) = (1..batch.len()).find(|&i| batch[i].seq != batch[i - 1].seq + 1) {
            batch.truncate(cut);
        }
        if let Some(last) = batch.last() {
            self.position = last.seq;
        }
        Ok(Batch {
            gap,
            messages: batch,
        })
    }

    /// Whether `from..=to` is all reserved seqs (read again once if the ranges known do not
    /// cover it: a reservation may be newer than the cursor).
    async fn reserved_covers(&mut self, from: u64, to: u64) -> Result<bool, ApiError> {
        if let Some(ranges) = &self.reserved {
            if service::all_reserved(ranges, from, to) {
                return Ok(true);
            }
        }
        let ranges = service::reserved_ranges(&self.state, &self.id).await?;
        let covered = service::all_reserved(&ranges, from, to);
        self.reserved = Some(ranges);
        Ok(covered)
    }
}

fn remote_source(state: &AppState, id: &ConversationId) -> Remote {
    let fanout = state.cluster.as_ref().map(|c| c.fanout());
    Remote {
        live: fanout.map(|f| f.subscribe(id)),
        generation: fanout.map(|f| f.generation()),
        ahead: BTreeMap::new(),
        fetch: true,
        next_check: Instant::now(),
        last_fetch: None,
    }
}

enum RemoteStep {
    Batch(Vec<Arc<Message>>),
    BecameLocal(ConversationHandle),
    Waited,
}

async fn next_remote(
    state: &AppState,
    id: &ConversationId,
    position: u64,
    page: usize,
    remote: &mut Remote,
) -> Result<RemoteStep, ApiError> {
    // What arrived live meanwhile.
    if let Some(live) = remote.live.as_mut() {
        loop {
            match live.try_recv() {
                Ok(m) if m.seq > position => {
                    if remote.ahead.len() < MAX_AHEAD {
                        remote.ahead.insert(m.seq, m);
                    } else {
                        remote.fetch = true;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(_)) => remote.fetch = true,
                Err(_) => break,
            }
        }
    }
    remote.ahead = remote.ahead.split_off(&(position + 1));
    // Live messages that continue the position exactly.
    if remote.ahead.keys().next() == Some(&(position + 1)) {
        let mut batch = Vec::new();
        let mut next = position + 1;
        while let Some(m) = remote.ahead.remove(&next) {
            batch.push(m);
            next += 1;
            if batch.len() >= page {
                break;
            }
        }
        return Ok(RemoteStep::Batch(batch));
    }
    let now = Instant::now();
    let gap = !remote.ahead.is_empty()
        && remote
            .last_fetch
            .is_none_or(|t| now.duration_since(t) >= GAP_RETRY);
    if gap || remote.fetch || now >= remote.next_check {
        remote.fetch = false;
        remote.last_fetch = Some(now);
        remote.next_check = now + service::TOP_SEQ_CHECK;
        match service::fetch_after(state, id, position, page).await? {
            Fetched::Local(handle) => return Ok(RemoteStep::BecameLocal(handle)),
            Fetched::Messages(batch) => {
                if batch.len() >= page {
                    remote.fetch = true;
                }
                if !batch.is_empty() {
                    if gap {
                        metrics::counter!(crate::metrics::FANOUT_GAP_FILLS_TOTAL).increment(1);
                    }
                    return Ok(RemoteStep::Batch(batch));
                }
            }
        }
    }
    // Wait for news: a live message, a reconnect, or the next check.
    let wake = if remote.ahead.is_empty() {
        remote.next_check
    } else {
        (now + GAP_RETRY).min(remote.next_check)
    };
    enum Woke {
        Live(Result<Arc<Message>, broadcast::error::RecvError>),
        Reconnected(bool),
        Timer,
    }
    let woke = {
        let (live, generation) = (&mut remote.live, &mut remote.generation);
        let live = async {
            match live.as_mut() {
                Some(live) => live.recv().await,
                None => std::future::pending().await,
            }
        };
        let generation = async {
            match generation.as_mut() {
                Some(g) => g.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = live => Woke::Live(m),
            r = generation => Woke::Reconnected(r),
            _ = tokio::time::sleep_until(wake) => Woke::Timer,
        }
    };
    match woke {
        Woke::Live(Ok(m)) if m.seq > position => {
            remote.ahead.insert(m.seq, m);
        }
        Woke::Live(Ok(_)) | Woke::Timer => {}
        Woke::Live(Err(broadcast::error::RecvError::Lagged(_))) => remote.fetch = true,
        Woke::Live(Err(broadcast::error::RecvError::Closed)) => remote.live = None,
        Woke::Reconnected(true) => remote.fetch = true,
        Woke::Reconnected(false) => remote.generation = None,
    }
    Ok(RemoteStep::Waited)
}
