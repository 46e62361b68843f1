//! NATS JetStream: one file-storage stream per run capturing `<prefix>.<run>.>`; each
//! conversation is a subject. An append is a JetStream publish, acknowledged by its `PubAck`
//! (sent once the stream has stored the message, which with `sync_interval: always` includes
//! the fsync).

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::append::{Appender, Names, Outcome, Payload};
use crate::LoadError;

#[derive(Clone)]
pub struct NatsAppender {
    js: jetstream::Context,
    subjects: std::sync::Arc<[String]>,
    payload: Payload,
}

fn err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Nats(e.to_string())
}

impl NatsAppender {
    /// `connections` clients to `url`, and the run's stream created through the first.
    pub async fn connect_all(
        url: &str,
        connections: usize,
        names: &Names,
        payload: Payload,
    ) -> Result<Vec<NatsAppender>, LoadError> {
        let prefix = names
            .conversations
            .first()
            .and_then(|n| n.split('.').next())
            .unwrap_or("lt")
            .to_owned();
        let mut out = Vec::new();
        for i in 0..connections {
            let client = async_nats::connect(url).await.map_err(err)?;
            let js = jetstream::new(client);
            if i == 0 {
                js.get_or_create_stream(stream::Config {
                    name: format!("{prefix}_{}", names.run),
                    subjects: vec![format!("{prefix}.{}.>", names.run)],
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(err)?;
            }
            out.push(NatsAppender {
                js,
                subjects: names.conversations.clone(),
                payload: payload.clone(),
            });
        }
        Ok(out)
    }
}

impl Appender for NatsAppender {
    fn append(&self, conv: usize, index: u64) -> BoxFuture<'static, Outcome> {
        let js = self.js.clone();
        let subject = self.subjects[conv].clone();
        let body = Bytes::from(self.payload.content(index));
        Box::pin(async move {
            let ack = match js.publish(subject, body).await {
                Ok(ack) => ack,
                Err(e) => return Outcome::Error(format!("publish: {e}")),
            };
            match ack.await {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(format!("puback: {e}")),
            }
        })
    }
}
