//! What `cluster` does to the cluster while its traffic runs, through the admin API, and how
//! long each step took:
//! - `drain`: `POST /admin/nodes/{id}/drain`, then poll `GET /admin/cluster` until the node owns
//!   no slot (the time from the request to that is the drain's headline number); then
//!   `undrain` it and [settle](#settling);
//! - `rebalance`: [settle](#settling) only;
//! - `none`: nothing.
//!
//! # Settling
//! `POST /admin/rebalance`, then poll until no slot is moving *and* a further rebalance request
//! plans no move (the leader moves at most `max_moves` slots at once and only at its next round,
//! so "nothing moving" alone can be a pause between two rounds, or the moment before the first).
//!
//! Every wait is bounded by `--disrupt-timeout`; a step that fails or times out ends the
//! disruption with an error in the report (and the run fails).

use std::time::Duration;

use tokio::time::Instant;

use crate::admin::{AdminClient, ClusterStatus};
use crate::cli::Disrupt;
use crate::report::DisruptionReport;

/// How often the cluster's status is read while waiting.
const POLL: Duration = Duration::from_millis(100);
/// Steps kept in the report's list (the rest are only acted on).
const MAX_STEPS: usize = 64;

/// What to do, and when.
pub struct Plan {
    pub kind: Disrupt,
    /// The node to drain; `None`: the active node that owns the most slots.
    pub node: Option<String>,
    /// Since the start of the traffic.
    pub at: Duration,
    /// The longest each wait may take.
    pub timeout: Duration,
}

/// Carries out `plan` against the cluster; returns what happened (never fails: a failure is the
/// report's `error`).
pub async fn run(admin: AdminClient, plan: Plan, start: Instant) -> DisruptionReport {
    let mut run = Run {
        admin,
        start,
        timeout: plan.timeout,
        report: DisruptionReport::default(),
    };
    if plan.kind == Disrupt::None {
        return run.report;
    }
    tokio::time::sleep_until(start + plan.at).await;
    let result = match plan.kind {
        Disrupt::Drain => run.drain(plan.node).await,
        Disrupt::Rebalance => run.settle().await,
        Disrupt::None => Ok(()),
    };
    if let Err(e) = result {
        run.step(format!("failed: {e}"));
        run.report.error = Some(e);
    }
    run.report
}

/// The active node owning the most slots (the lowest id among equals): the drain that moves the
/// most.
fn busiest_active(status: &ClusterStatus) -> Option<String> {
    status
        .nodes
        .iter()
        .filter(|n| n.state == "active" && n.slots > 0)
        .max_by(|a, b| a.slots.cmp(&b.slots).then_with(|| b.id.cmp(&a.id)))
        .map(|n| n.id.clone())
}

struct Run {
    admin: AdminClient,
    start: Instant,
    timeout: Duration,
    report: DisruptionReport,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Run {
    fn at(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn step(&mut self, what: String) {
        if self.report.steps.len() < MAX_STEPS {
            let line = format!("{:.2}s {what}", self.at());
            self.report.steps.push(line);
        }
    }

    /// The cluster's status, noting the most slots seen moving at once.
    async fn status(&mut self) -> Result<ClusterStatus, String> {
        let status = self.admin.cluster().await.map_err(|e| e.to_string())?;
        self.report.max_moving_slots = self.report.max_moving_slots.max(status.moving_slots);
        Ok(status)
    }

    /// Polls the status until `done` holds, for at most the timeout. A failed read is retried
    /// (a node of the cluster may be busy moving); only the deadline ends the wait.
    async fn wait_until(
        &mut self,
        what: &str,
        done: impl Fn(&ClusterStatus) -> bool,
    ) -> Result<ClusterStatus, String> {
        let deadline = Instant::now() + self.timeout;
        let mut last_error = None;
        loop {
            match self.status().await {
                Ok(s) if done(&s) => return Ok(s),
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                let why = last_error.map_or(String::new(), |e| format!(" (last error: {e})"));
                return Err(format!("{what}: not within {:?}{why}", self.timeout));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn drain(&mut self, node: Option<String>) -> Result<(), String> {
        let status = self.status().await?;
        if status.mode != "cluster" {
            return Err(format!(
                "the admin API answers mode {:?}: not a cluster",
                status.mode
            ));
        }
        let node = match node {
            Some(node) => node,
            None => busiest_active(&status)
                .ok_or_else(|| "no active node owns a slot: nothing to drain".to_owned())?,
        };
        let before = status
            .slots_of(&node)
            .ok_or_else(|| format!("no node {node:?} in the cluster"))?;
        if let Some(n) = status
            .nodes
            .iter()
            .find(|n| n.id == node && n.state != "active")
        {
            self.step(format!("{node} is {} before its drain", n.state));
        }
        self.report.node = Some(node.clone());
        self.report.node_slots_before = Some(before);
        self.report.drain_requested_at_s = Some(self.at());
        let asked = Instant::now();
        self.admin
            .drain(&node)
            .await
            .map_err(|e| format!("drain {node}: {e}"))?;
        self.step(format!("drain {node} requested ({before} slots)"));
        self.wait_until(&format!("{node} to own no slot"), |s| {
            s.slots_of(&node) == Some(0)
        })
        .await?;
        self.report.drain_to_empty_ms = Some(ms(asked.elapsed()));
        self.step(format!("{node} owns no slot"));
        self.admin
            .undrain(&node)
            .await
            .map_err(|e| format!("undrain {node}: {e}"))?;
        self.step(format!("undrain {node}"));
        self.settle().await?;
        let after = self.status().await?.slots_of(&node);
        self.report.node_slots_after = after;
        if let Some(n) = after {
            self.step(format!("{node} owns {n} slots"));
        }
        Ok(())
    }

    /// Rebalance, then wait until nothing moves and nothing more is planned.
    async fn settle(&mut self) -> Result<(), String> {
        self.report.rebalance_requested_at_s = Some(self.at());
        let asked = Instant::now();
        let moves = self
            .admin
            .rebalance()
            .await
            .map_err(|e| format!("rebalance: {e}"))?;
        self.report.rebalance_moves = Some(moves);
        self.step(format!("rebalance requested: {moves} moves planned"));
        let deadline = asked + self.timeout;
        let mut planned = moves;
        loop {
            let idle = self
                .wait_until("no slot moving after the rebalance", |s| {
                    s.moving_slots == 0
                })
                .await?;
            if idle.unavailable_slots > 0 || idle.unassigned_slots > 0 {
                return Err(format!(
                    "{} slots unavailable and {} unassigned after the rebalance",
                    idle.unavailable_slots, idle.unassigned_slots
                ));
            }
            let more = self
                .admin
                .rebalance()
                .await
                .map_err(|e| format!("rebalance: {e}"))?;
            if more == 0 {
                break;
            }
            if more != planned {
                self.step(format!("rebalance continues: {more} moves planned"));
                planned = more;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "a rebalance still plans {more} moves {:?} after the first request",
                    self.timeout
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        self.report.rebalance_to_settled_ms = Some(ms(asked.elapsed()));
        self.step("settled: no slot moving, nothing planned".to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_drain_is_the_busiest_active_node() {
        let status: ClusterStatus = serde_json::from_value(serde_json::json!({
            "mode": "cluster", "node": "n1", "slot_count": 512,
            "nodes": [
                {"id": "n1", "state": "drained", "slots": 0},
                {"id": "n2", "state": "active", "slots": 200},
                {"id": "n3", "state": "active", "slots": 200},
                {"id": "n4", "state": "draining", "slots": 300}
            ]
        }))
        .expect("parses");
        assert_eq!(busiest_active(&status).as_deref(), Some("n2"));
        let idle: ClusterStatus = serde_json::from_value(serde_json::json!({
            "mode": "cluster", "node": "n1", "slot_count": 512,
            "nodes": [{"id": "n1", "state": "drained", "slots": 0}]
        }))
        .expect("parses");
        assert_eq!(busiest_active(&idle), None);
    }
}
