//! Cursor-driven delivery: a subscriber is a position, not a queue.
//!
//! A [`Cursor`] yields every durable message after its position, in seq order, exactly once:
//! from the hot ring when it holds them, otherwise from SQL in pages, then live as the durable
//! seq advances. It holds at most one page in memory, so a slow consumer simply reads later —
//! it is never disconnected and never loses a message. While a cursor exists its conversation's
//! actor is not retired (the watch receiver counts as a subscriber).

use std::sync::Arc;

use tokio::sync::watch;

use ferry_shards::actor::ConversationHandle;
use ferry_shards::node::Node;
use ferry_shards::record::Message;

use crate::http::error::ApiError;

pub struct Cursor {
    node: Node,
    handle: ConversationHandle,
    /// Last seq handed out.
    position: u64,
    durable: watch::Receiver<u64>,
    page: usize,
}

impl Cursor {
    pub fn new(node: Node, handle: ConversationHandle, after_seq: u64, page: usize) -> Cursor {
        let durable = handle.log.watch_durable();
        Cursor {
            node,
            handle,
            position: after_seq,
            durable,
            page: page.max(1),
        }
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next non-empty batch after the position; waits for new messages when caught up.
    pub async fn next_batch(&mut self) -> Result<Vec<Arc<Message>>, ApiError> {
        loop {
            let durable = *self.durable.borrow_and_update();
            if durable > self.position {
                let batch = self
                    .node
                    .read_after(&self.handle, self.position, self.page)
                    .await?;
                if let Some(last) = batch.last() {
                    debug_assert_eq!(batch[0].seq, self.position + 1);
                    if batch[0].seq != self.position + 1 {
                        return Err(ApiError::unavailable(format!(
                            "history between seq {} and {} is not readable",
                            self.position, batch[0].seq
                        )));
                    }
                    self.position = last.seq;
                    return Ok(batch);
                }
            }
            if self.durable.changed().await.is_err() {
                return Err(ApiError::unavailable("conversation stopped"));
            }
        }
    }
}
