//! The command line. One flat set of flags shared by every scenario (each scenario reads the
//! ones it needs), so a bench script can run the same workload against every target by changing
//! only `--target`.
//!
//! `--target` may name several Ferry nodes of one cluster ([`Targets`]): scenarios hand their
//! clients out over them round robin, and a client keeps its node for the whole run.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::LoadError;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ferry-loadtest",
    version,
    about = "Load generator for Ferry and its peers"
)]
pub struct Args {
    /// What to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// `http://host:port` (Ferry), `nats://host:port` (JetStream) or `redis://host:port` (Streams).
    /// Repeat it (or separate with commas) to name every node of one Ferry cluster: clients are
    /// spread over the nodes round robin, each keeping its node.
    #[arg(
        long = "target",
        visible_alias = "targets",
        required = true,
        value_delimiter = ','
    )]
    pub targets: Vec<String>,
    /// Appends per second (all conversations together); for `connections`, sockets opened per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of traffic (for `connections`: seconds to hold the sockets after the ramp).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Ferry API key (sent as `Authorization: Bearer` and as the WebSocket `token`).
    #[arg(
        long,
        env = "FERRY_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub api_key: String,
    /// How Ferry appends travel.
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub transport: Transport,
    /// `append --transport ws`: whether the publishing sockets get their own messages pushed back
    /// (`--echo false` joins with `{"echo": false}`, as a publisher that reads nothing would).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub echo: bool,
    /// Conversations (streams / subjects for peers) the appends spread over, round robin.
    #[arg(long, default_value_t = 16)]
    pub conversations: usize,
    /// Approximate size in bytes of each message's content.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// HTTP clients, WebSockets, NATS or Redis connections the appends are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Appends in flight at once; a due send beyond this is skipped and counted.
    #[arg(long, default_value_t = 1024)]
    pub max_outstanding: usize,
    /// `fanout`/`resume`: subscribers joined to each conversation (one socket each).
    #[arg(long, default_value_t = 2)]
    pub subscribers: usize,
    /// `resume`: disconnects and rejoins per minute, over all subscribers.
    #[arg(long, default_value_t = 600.0)]
    pub reconnects_per_min: f64,
    /// `connections`: idle sockets to open.
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// The server's pid: every scenario that publishes reports its CPU (cores, µs per ack) over
    /// the publishing window; `connections` reads its VmRSS before and after the ramp.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds between heartbeats on every socket (the server closes sockets silent for 60 s).
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat_secs: f64,
    /// `mixed`: concurrent readers (closed loop: forward pages, backward pages, replay joins).
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// `mixed`: page size of reads.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
    /// Seconds to wait after the last send for replies and deliveries before counting them lost.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Append a markdown table row (with a header when the file is new) here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write an SVG of latency and throughput over time here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Name of this run in the markdown row and the plot title (default: target and transport).
    #[arg(long)]
    pub label: Option<String>,
    /// Prefix of conversation ids, stream names and subjects; a per-run suffix keeps runs apart.
    #[arg(long, default_value = "lt")]
    pub prefix: String,
    /// Never draw the progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// `cluster`: the admin listeners (`http://host:port`) of the cluster's nodes, repeated or
    /// comma-separated. Any one acts for the whole cluster; the next is tried when one fails.
    #[arg(
        long = "admin-targets",
        visible_alias = "admin-target",
        value_delimiter = ','
    )]
    pub admin_targets: Vec<String>,
    /// Admin API key for `--admin-targets` (default: `--api-key`).
    #[arg(
        long,
        env = "FERRY_ADMIN_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_key: String,
    /// `cluster`: what to do to the cluster while the traffic runs.
    #[arg(long, value_enum, default_value_t = Disrupt::Drain)]
    pub disrupt: Disrupt,
    /// `cluster --disrupt drain`: the node to drain (default: the active node that owns the most
    /// slots).
    #[arg(long)]
    pub drain_node: Option<String>,
    /// `cluster`: seconds after the first scheduled send at which the disruption starts
    /// (default: a fifth of `--duration`).
    #[arg(long)]
    pub disrupt_at: Option<f64>,
    /// `cluster`: longest wait, in seconds, for each step of the disruption (the drained node to
    /// own no slot; no slot to be moving after the rebalance), and for a writer or subscriber
    /// whose node went away to be joined again on another.
    #[arg(long, default_value_t = 60.0)]
    pub disrupt_timeout: f64,
    /// `cluster`: the servers' `cluster.move_hold` in seconds (how long an append to a moving
    /// slot waits before `try_again`); an ack slower than this counts as one that hit a move.
    #[arg(long, default_value_t = 2.0)]
    pub move_hold: f64,
    /// `cluster`: accept `gap` pushes and page `gaps` as seqs a failover reserved for a lost node
    /// (a run that kills a node under `durability = "local"` and fails it over): counted as
    /// reserved gaps, not violations. Every acknowledged send must still be stored at its seq.
    #[arg(long)]
    pub reserved_gaps: bool,
}

/// What the `cluster` scenario does to the cluster while its traffic runs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Disrupt {
    /// Drain one node until it owns no slot, then undrain it and rebalance until no slot moves.
    Drain,
    /// Ask for a rebalance and wait until no slot moves.
    Rebalance,
    /// Nothing: steady traffic over every node, checked the same way.
    None,
}

impl std::fmt::Display for Disrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().map(|v| v.get_name().to_owned());
        f.write_str(name.as_deref().unwrap_or("?"))
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Append,
    Fanout,
    Resume,
    Connections,
    Mixed,
    Cluster,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Http,
    Ws,
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().map(|v| v.get_name().to_owned());
        f.write_str(name.as_deref().unwrap_or("?"))
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
        })
    }
}

/// What `--target` points at.
#[derive(Debug, Clone)]
pub enum Target {
    Ferry {
        /// `http://host:port`, no trailing slash.
        http_base: String,
        /// The full socket URL including `vsn` and `token`.
        ws_url: String,
        api_key: String,
    },
    Nats(String),
    Redis(String),
}

impl Target {
    pub fn parse(target: &str, api_key: &str) -> Result<Target, LoadError> {
        let trimmed = target.trim_end_matches('/');
        if let Some(rest) = trimmed
            .strip_prefix("http://")
            .map(|r| ("ws://", r))
            .or_else(|| trimmed.strip_prefix("https://").map(|r| ("wss://", r)))
        {
            let (ws_scheme, host) = rest;
            return Ok(Target::Ferry {
                http_base: trimmed.to_owned(),
                ws_url: format!("{ws_scheme}{host}/socket/websocket?vsn=2.0.0&token={api_key}"),
                api_key: api_key.to_owned(),
            });
        }
        if trimmed.starts_with("nats://") {
            return Ok(Target::Nats(trimmed.to_owned()));
        }
        if trimmed.starts_with("redis://") {
            return Ok(Target::Redis(trimmed.to_owned()));
        }
        Err(LoadError::Target(target.to_owned()))
    }

    /// `ferry`, `nats` or `redis`, for reports.
    pub fn system(&self) -> &'static str {
        match self {
            Target::Ferry { .. } => "ferry",
            Target::Nats(_) => "nats",
            Target::Redis(_) => "redis",
        }
    }
}

/// Every `--target` of a run: one system, and several only when they are the nodes of one Ferry
/// cluster. Never empty.
#[derive(Debug, Clone)]
pub struct Targets {
    all: Vec<Target>,
}

impl Targets {
    pub fn parse(targets: &[String], api_key: &str) -> Result<Targets, LoadError> {
        let all = targets
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| Target::parse(t, api_key))
            .collect::<Result<Vec<_>, _>>()?;
        if all.is_empty() {
            return Err(LoadError::Args("--target is required".into()));
        }
        if all.len() > 1 && !all.iter().all(|t| matches!(t, Target::Ferry { .. })) {
            return Err(LoadError::Args(
                "several --target values must all be Ferry nodes (http:// or https://)".into(),
            ));
        }
        Ok(Targets { all })
    }

    /// The target setup, checks and single-connection peers use.
    pub fn first(&self) -> &Target {
        &self.all[0]
    }

    /// The target of client `k` (round robin: a client keeps its node).
    pub fn for_client(&self, k: usize) -> &Target {
        &self.all[k % self.all.len()]
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Always false: there is at least one target.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.all.iter()
    }
}

impl Args {
    /// Rejects values that would make the run meaningless or divide by zero.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: &str| Err(LoadError::Args(m.to_owned()));
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("--rate must be > 0");
        }
        if !(self.duration.is_finite() && self.duration >= 0.0) {
            return bad("--duration must be >= 0");
        }
        if self.conversations == 0 || self.connections == 0 || self.max_outstanding == 0 {
            return bad("--conversations, --connections and --max-outstanding must be > 0");
        }
        if !(self.heartbeat_secs.is_finite() && self.heartbeat_secs > 0.0) {
            return bad("--heartbeat-secs must be > 0");
        }
        if !(self.drain_timeout.is_finite() && self.drain_timeout > 0.0) {
            return bad("--drain-timeout must be > 0");
        }
        if self.page_size == 0 {
            return bad("--page-size must be > 0");
        }
        if self.scenario == Scenario::Cluster {
            if self.disrupt != Disrupt::None && self.admin_targets.is_empty() {
                return bad("cluster --disrupt drain|rebalance needs --admin-targets");
            }
            if !(self.disrupt_timeout.is_finite() && self.disrupt_timeout > 0.0) {
                return bad("--disrupt-timeout must be > 0");
            }
            if !(self.move_hold.is_finite() && self.move_hold > 0.0) {
                return bad("--move-hold must be > 0");
            }
            if self
                .disrupt_at
                .is_some_and(|at| !(at.is_finite() && at >= 0.0))
            {
                return bad("--disrupt-at must be >= 0");
            }
        }
        Ok(())
    }

    /// The admin key: `--admin-key`, else `--api-key`.
    pub fn admin_key(&self) -> &str {
        if self.admin_key.is_empty() {
            &self.api_key
        } else {
            &self.admin_key
        }
    }

    /// The run's name in tables and plots.
    pub fn label(&self, targets: &Targets) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        let name = match targets.first() {
            Target::Ferry { .. } if self.scenario == Scenario::Cluster => {
                format!("ferry cluster {}", self.disrupt)
            }
            Target::Ferry { .. } => format!("ferry {}", self.transport),
            other => other.system().to_owned(),
        };
        if targets.len() > 1 {
            format!("{name} ({} nodes)", targets.len())
        } else {
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn targets_repeat_or_split_on_commas_and_must_be_one_system() {
        let a = Args::try_parse_from([
            "ferry-loadtest",
            "append",
            "--target",
            "http://127.0.0.1:1,http://127.0.0.1:2/",
            "--target",
            "http://127.0.0.1:3",
        ])
        .expect("parses");
        assert_eq!(a.targets.len(), 3);
        let t = Targets::parse(&a.targets, "k").expect("ferry nodes");
        assert_eq!(t.len(), 3);
        let Target::Ferry { http_base, .. } = t.for_client(4) else {
            panic!("a ferry target");
        };
        assert_eq!(
            http_base, "http://127.0.0.1:2",
            "client 4 of 3 is on the second node"
        );
        assert!(Targets::parse(&["nats://a:1".into(), "nats://b:1".into()], "").is_err());
        assert!(Targets::parse(&[" ".into()], "").is_err());
        assert_eq!(a.label(&t), "ferry http (3 nodes)");
    }

    #[test]
    fn cluster_disruptions_need_admin_targets() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "ferry-loadtest",
                "cluster",
                "--target",
                "http://127.0.0.1:1",
            ];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).expect("parses")
        };
        assert!(parse(&[]).validate().is_err(), "drain is the default");
        assert!(parse(&["--disrupt", "none"]).validate().is_ok());
        let a = parse(&["--admin-targets", "http://127.0.0.1:2,http://127.0.0.1:3"]);
        assert!(a.validate().is_ok());
        assert_eq!(a.admin_targets.len(), 2);
    }
}
