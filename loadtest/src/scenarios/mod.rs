//! One module per scenario, each a `run(args, target) -> Report`. They share the setup helpers
//! here and the WebSocket [`subscriber`] used by `fanout` and `resume`.

pub mod append;
pub mod connections;
pub mod fanout;
pub mod mixed;
pub mod resume;
pub mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::append::Names;
use crate::cli::{Args, Target};
use crate::ferry::FerryHttp;
use crate::LoadError;

/// Conversations created (or counted) at once during setup.
const SETUP_CONCURRENCY: usize = 32;

/// The run's names, with the separator each system allows (`.` is a NATS subject level).
pub fn names(args: &Args, target: &Target) -> Names {
    let sep = match target {
        Target::Ferry { .. } => '-',
        Target::Nats(_) => '.',
        Target::Redis(_) => ':',
    };
    Names::new(&args.prefix, args.conversations, sep)
}

/// The Ferry HTTP client for setup and checks, or `Unsupported` for a peer target.
pub fn ferry_http(args: &Args, target: &Target) -> Result<(FerryHttp, String), LoadError> {
    match target {
        Target::Ferry {
            http_base,
            api_key,
            ws_url,
        } => Ok((
            FerryHttp::new(
                http_base,
                api_key,
                Duration::from_secs_f64(args.drain_timeout),
            )?,
            ws_url.clone(),
        )),
        other => Err(LoadError::Unsupported {
            scenario: args.scenario.to_string(),
            target: other.system().to_owned(),
        }),
    }
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
