//! `resume`: `fanout` with churn. Every subscriber drops its socket on a schedule that adds up
//! to `--reconnects-per-min` over all of them, and rejoins with `after_seq` = the last seq it saw.
//! The zero-gap checker must find every seq 1..final exactly once, in order, on every
//! subscriber, where `final` is the conversation's `last_seq` read over HTTP after the traffic;
//! anything else lands in `failures` (and the binary exits non-zero).

use crate::cli::{Args, Targets};
use crate::report::Report;
use crate::LoadError;

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    let rate = if args.reconnects_per_min > 0.0 {
        args.reconnects_per_min
    } else {
        return Err(LoadError::Args(
            "resume needs --reconnects-per-min > 0".into(),
        ));
    };
    super::fanout::run_ferry(args, targets, Some(rate)).await
}
