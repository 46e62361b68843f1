//! One module per scenario, each a `run(args, targets) -> Report`. They share the setup helpers
//! here and the WebSocket [`subscriber`] used by `fanout`, `resume` and `cluster`.
//!
//! With several targets (the nodes of one Ferry cluster) setup and the final reads go through
//! the first one (any node answers for any conversation), and clients are handed out over all of
//! them round robin ([`Targets::for_client`]).

pub mod append;
pub mod cluster;
pub mod connections;
pub mod fanout;
pub mod mixed;
pub mod resume;
pub mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::append::Names;
use crate::cli::{Args, Target, Targets};
use crate::ferry::FerryHttp;
use crate::LoadError;

/// Conversations created (or counted) at once during setup.
pub(crate) const SETUP_CONCURRENCY: usize = 32;

/// The run's names, with the separator each system allows (`.` is a NATS subject level).
pub fn names(args: &Args, targets: &Targets) -> Names {
    let sep = match targets.first() {
        Target::Ferry { .. } => '-',
        Target::Nats(_) => '.',
        Target::Redis(_) => ':',
    };
    Names::new(&args.prefix, args.conversations, sep)
}

/// One Ferry node as a client sees it: its HTTP API and its socket URL.
#[derive(Clone)]
pub struct Endpoint {
    pub http: FerryHttp,
    pub ws_url: String,
    /// The node's base URL, for messages.
    pub base: String,
}

/// Every target as a Ferry [`Endpoint`] (in `--target` order), or `Unsupported` for a peer.
pub fn ferry_endpoints(args: &Args, targets: &Targets) -> Result<Vec<Endpoint>, LoadError> {
    targets
        .iter()
        .map(|target| match target {
            Target::Ferry {
                http_base,
                api_key,
                ws_url,
            } => Ok(Endpoint {
                http: FerryHttp::new(
                    http_base,
                    api_key,
                    Duration::from_secs_f64(args.drain_timeout),
                )?,
                ws_url: ws_url.clone(),
                base: http_base.clone(),
            }),
            other => Err(LoadError::Unsupported {
                scenario: args.scenario.to_string(),
                target: other.system().to_owned(),
            }),
        })
        .collect()
}

/// The Ferry HTTP client of the first target, for setup and checks, or `Unsupported` for a peer.
pub fn ferry_http(args: &Args, targets: &Targets) -> Result<FerryHttp, LoadError> {
    let mut endpoints = ferry_endpoints(args, targets)?;
    Ok(endpoints.swap_remove(0).http)
}

/// Creates every conversation of the run (before the clock starts).
pub async fn create_conversations(http: &FerryHttp, names: &Names) -> Result<(), LoadError> {
    stream::iter(names.conversations.iter().cloned())
        .map(|id| {
            let http = http.clone();
            async move { http.create_conversation(&id).await }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Each conversation's `last_seq`, read over HTTP after the traffic: the truth subscribers are
/// checked against.
pub async fn final_seqs(http: &FerryHttp, names: &Names) -> Result<Arc<Vec<u64>>, LoadError> {
    let seqs = stream::iter(names.conversations.iter().cloned())
        .map(|id| {
            let http = http.clone();
            async move { http.last_seq(&id).await }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect::<Vec<u64>>()
        .await?;
    Ok(Arc::new(seqs))
}
