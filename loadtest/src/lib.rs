//! `ferry-loadtest`: the load generator behind every number in `docs/benchmarks.md`, and the
//! harness the smoke tests drive through [`run`].
//!
//! It is open-loop: a [`pacer::Pacer`] fixes when send *i* is due (`start + i / rate`) before the
//! run begins, and every latency is measured from that scheduled instant, so a slow server cannot
//! hide its stalls by slowing the generator down (no coordinated omission). Sends that would push
//! the number of outstanding requests past `--max-outstanding` are skipped and counted, never
//! queued. The tool never starts servers; it only talks to the target it is given.
//!
//! # Layout
//! - [`cli`]: the command line ([`cli::Args`]) and target parsing ([`cli::Targets`]: one target,
//!   or every node of a Ferry cluster).
//! - [`pacer`]: the send schedule and the loop that dispatches on it.
//! - [`stats`]: per-worker [`stats::Recorder`]s (HDR histograms, counters, a per-second
//!   timeline) that merge into one at the end.
//! - [`gapcheck`]: the zero-gap checker: subscribers (gaps, repeats, reordering) and, for
//!   `cluster`, the stored log against every acknowledged idempotency key.
//! - [`ferry`]: the Ferry HTTP client and a raw Phoenix Channels V2 WebSocket client.
//! - [`admin`]: the Ferry admin API client (cluster status, drain, undrain, rebalance).
//! - [`peers`]: NATS JetStream and Redis Streams drivers of the same append workload.
//! - [`append`]: the shared appender machinery (workers, outcomes) every scenario publishes with.
//! - [`scenarios`]: one module per scenario (`append`, `fanout`, `resume`, `connections`, `mixed`,
//!   `cluster`).
//! - [`report`]: the final [`report::Report`], its JSON and markdown forms; [`plot`] its SVG.
//! - [`progress`]: live counters and the terminal progress bar.
//! - [`cpu`]: CPU burned by the server (`--server-pid`) and the tool while publishing.

pub mod admin;
pub mod append;
pub mod cli;
pub mod cpu;
pub mod ferry;
pub mod gapcheck;
pub mod pacer;
pub mod peers;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod stats;

pub use cli::{Args, Disrupt, Scenario, Target, Targets, Transport};
pub use report::Report;

/// Everything that stops a run before it can produce a report. Per-request failures are not
/// errors of the run: they are counted in the report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("bad target {0:?}: expected http://, https://, nats:// or redis://")]
    Target(String),
    #[error("scenario {scenario} cannot run against {target}")]
    Unsupported { scenario: String, target: String },
    #[error("bad arguments: {0}")]
    Args(String),
    #[error("setup failed: {0}")]
    Setup(String),
    #[error("admin api: {0}")]
    Admin(String),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("nats: {0}")]
    Nats(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("plot: {0}")]
    Plot(String),
}

/// Runs the scenario `args` names against its target and returns the report. Outputs
/// (`--json`, `--markdown`, `--plot`) are written by the caller: see [`report::write_outputs`].
pub async fn run(args: &Args) -> Result<Report, LoadError> {
    args.validate()?;
    let targets = Targets::parse(&args.targets, &args.api_key)?;
    match args.scenario {
        Scenario::Append => scenarios::append::run(args, &targets).await,
        Scenario::Fanout => scenarios::fanout::run(args, &targets).await,
        Scenario::Resume => scenarios::resume::run(args, &targets).await,
        Scenario::Connections => scenarios::connections::run(args, &targets).await,
        Scenario::Mixed => scenarios::mixed::run(args, &targets).await,
        Scenario::Cluster => scenarios::cluster::run(args, &targets).await,
    }
}
