//! Redis Streams: each conversation is a stream key; an append is `XADD key * d <payload>`,
//! acknowledged by its reply (with `appendfsync always`, Redis fsyncs the AOF before replying).
//! [`RedisSubscriber`] is the fanout side: `XREAD BLOCK` on one key from its own connection.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::append::{Appender, Names, Outcome, Payload};
use crate::LoadError;

/// How long one `XREAD` blocks; short, so a subscriber notices the end of the run promptly.
const BLOCK_MS: usize = 200;

async fn connect(url: &str) -> Result<MultiplexedConnection, LoadError> {
    let client = redis::Client::open(url)?;
    // The default response timeout (500 ms) would turn a slow fsync into an error; the run's
    // own drain timeout is the bound that matters.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

#[derive(Clone)]
pub struct RedisAppender {
    conn: MultiplexedConnection,
    keys: Arc<[String]>,
    payload: Payload,
}

impl RedisAppender {
    pub async fn connect_all(
        url: &str,
        connections: usize,
        names: &Names,
        payload: Payload,
    ) -> Result<Vec<RedisAppender>, LoadError> {
        let mut out = Vec::new();
        for _ in 0..connections {
            out.push(RedisAppender {
                conn: connect(url).await?,
                keys: names.conversations.clone(),
                payload: payload.clone(),
            });
        }
        Ok(out)
    }
}

impl Appender for RedisAppender {
    fn append(&self, conv: usize, index: u64) -> BoxFuture<'static, Outcome> {
        let mut conn = self.conn.clone();
        let key = self.keys[conv].clone();
        let body = self.payload.content(index);
        Box::pin(async move {
            let reply: Result<String, _> = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("d")
                .arg(body)
                .query_async(&mut conn)
                .await;
            match reply {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(format!("XADD {key}: {e}")),
            }
        })
    }
}

/// One fanout subscriber: `XREAD BLOCK` from `$`-equivalent `0-0` of a fresh key.
pub struct RedisSubscriber {
    conn: MultiplexedConnection,
    key: String,
    last_id: String,
}

/// An entry read by a subscriber: the send index found in its payload.
pub struct ReadEntry {
    pub index: Option<u64>,
}

impl RedisSubscriber {
    pub async fn connect(url: &str, key: &str) -> Result<RedisSubscriber, LoadError> {
        Ok(RedisSubscriber {
            conn: connect(url).await?,
            key: key.to_owned(),
            last_id: "0-0".to_owned(),
        })
    }

    /// The next batch (empty after [`BLOCK_MS`] without traffic).
    pub async fn read(&mut self) -> Result<Vec<ReadEntry>, LoadError> {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id)
            .query_async(&mut self.conn)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let index = entry
                    .get::<String>("d")
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
                    .and_then(|v| v["i"].as_u64());
                self.last_id = entry.id;
                out.push(ReadEntry { index });
            }
        }
        Ok(out)
    }

    /// How long a read may block, for callers that bound their wait.
    pub fn block() -> Duration {
        Duration::from_millis(BLOCK_MS as u64)
    }
}
