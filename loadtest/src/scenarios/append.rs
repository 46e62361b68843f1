//! `append`: open-loop appends at `--rate` over the target's append path, spread round robin
//! over `--conversations`; measures scheduled-send-to-ack latency.

use std::sync::Arc;

use tokio::time::Instant;

use crate::append::Publisher;
use crate::cli::{Args, Target, Targets};
use crate::pacer::Pacer;
use crate::progress::{Live, Progress};
use crate::report::Report;
use crate::LoadError;

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    let names = super::names(args, targets);
    if let Target::Ferry { .. } = targets.first() {
        let http = super::ferry_http(args, targets)?;
        super::create_conversations(&http, &names).await?;
    }
    let publisher = Publisher::connect(args, targets, &names).await?;
    let pacer = Pacer::new(args.rate, args.duration);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), pacer.total(), !args.no_progress);
    let start = Instant::now();
    let published = publisher.run(pacer, start, live).await;
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish();
    Ok(Report::published(
        args,
        targets,
        &names,
        pacer.total(),
        published,
        elapsed,
    ))
}
