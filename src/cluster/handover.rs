//! Handing a slot this node owns to another node (DESIGN § 6, "Slot move A → B").
//!
//! The rebalancer has persisted the slot as `moving` with its target and asks the owner to carry
//! the move out ([`move_slot`]):
//! 1. tell every socket joined to the slot's conversations (on every node) to back off
//!    (`backpressure`), and hold the slot: new appends wait at its gate (up to
//!    `cluster.move_hold`, then `try_again` reason `slot_moving`);
//! 2. wait until no append of the slot is in flight (each is durable and answered);
//! 3. archive the slot's tail now (no linger), so the new owner finds every message, and every
//!    idempotency key, in SQL;
//! 4. compare-and-swap the row to the target at epoch + 1;
//! 5. let go: the slot's actors stop, its logs tell their readers to follow the conversation,
//!    the held appends are routed to the new owner, and the new owner is told to look now.
//!
//! Any failure before the swap cancels the move (the slot serves again here, same epoch). A swap
//! whose outcome is unknown (the database went away mid-commit) keeps the slot held until a read
//! of the row says who owns it.

use std::time::{Duration, Instant};

use ferry_shards::ownership::{self, Change, SlotState};

use super::peer::SlotHint;
use super::Cluster;
use crate::metrics as m;

/// Longest wait for in-flight appends of a held slot to finish.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for a held slot's tail to be archived.
const ARCHIVE_WAIT: Duration = Duration::from_secs(10);

/// Carries out the move of `slot` (owned here at `epoch`) to `target`. Returns once the slot
/// belongs to `target`, or with why it does not.
pub async fn move_slot(
    cluster: &Cluster,
    slot: u32,
    epoch: u64,
    target: &str,
) -> Result<(), String> {
    if !cluster.begin_moving(slot) {
        return Err(format!("slot {slot} is already being handed over"));
    }
    let started = Instant::now();
    let result = hand_over(cluster, slot, epoch, target, started).await;
    cluster.end_moving(slot);
    let outcome = if result.is_ok() { "ok" } else { "cancelled" };
    metrics::counter!(m::SLOT_MOVES_TOTAL, "result" => outcome).increment(1);
    match &result {
        Ok(()) => tracing::info!(
            slot,
            epoch = epoch + 1,
            target,
            took_ms = started.elapsed().as_millis() as u64,
            "slot handed over"
        ),
        Err(e) => tracing::warn!(slot, epoch, target, error = %e, "slot move cancelled"),
    }
    result
}

async fn hand_over(
    cluster: &Cluster,
    slot: u32,
    epoch: u64,
    target: &str,
    started: Instant,
) -> Result<(), String> {
    let db = cluster.db();
    let node = cluster.node();
    let gates = node.gates();
    let row = db
        .slot(slot)
        .await
        .map_err(|e| format!("cannot read slot {slot}: {e}"))?
        .ok_or_else(|| format!("slot {slot} does not exist"))?;
    let expected_state = SlotState::Moving {
        target: target.to_owned(),
    };
    if row.owner.as_deref() != Some(cluster.node_id())
        || row.epoch != epoch
        || row.state != expected_state
    {
        return Err(format!(
            "slot {slot} is not moving from this node at epoch {epoch} to {target} (row: {row:?})"
        ));
    }
    if gates.owned_epoch(slot) != Some(epoch) {
        return Err(format!(
            "slot {slot} is not served here at epoch {epoch} (gate epoch {})",
            gates.epoch(slot)
        ));
    }
    let hold_ms = cluster.config().move_hold.as_millis() as u64;
    cluster.fanout().slot_moving(slot, hold_ms.min(1000));
    gates.hold(slot);
    let held_at = Instant::now();
    let ready = gates.wait_idle(slot, IN_FLIGHT_WAIT).await
        && node.wait_slot_archived(slot, ARCHIVE_WAIT).await;
    if !ready {
        cancel(cluster, &row).await;
        return Err(format!(
            "slot {slot} did not settle (in flight {}, unarchived {})",
            gates.in_flight(slot),
            node.slot_unarchived(slot)
        ));
    }
    let nodes = match db.nodes().await {
        Ok(nodes) => super::node_views(&nodes),
        Err(e) => {
            cancel(cluster, &row).await;
            return Err(format!("cannot read the nodes: {e}"));
        }
    };
    let next = ownership::apply(&row, &Change::CompleteMove, &nodes).map_err(|e| e.to_string());
    let next = match next {
        Ok(next) => next,
        Err(e) => {
            cancel(cluster, &row).await;
            return Err(e);
        }
    };
    // The swap, retried while its outcome is unknown; the slot stays held meanwhile.
    let swapped = loop {
        match db.cas_slot(&row, &next).await {
            Ok(swapped) => break swapped,
            Err(e) => {
                tracing::warn!(slot, error = %e, "slot swap failed; checking the row");
                match db.slot(slot).await {
                    Ok(Some(now)) if now == next => break true,
                    Ok(Some(now)) if now == row => {}
                    Ok(_) => break false,
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    if !swapped {
        // Someone else changed the row (a reclaim after a lapse, a cancel): follow it.
        cluster.end_moving(slot);
        cluster.refresh_slot(slot).await;
        if gates.state(slot) == ferry_shards::gate::GateState::Holding {
            gates.set_serving(slot, epoch);
        }
        return Err(format!(
            "slot {slot} changed while it was being handed over"
        ));
    }
    node.release_slot(slot, next.epoch);
    metrics::histogram!(m::SLOT_MOVE_SECONDS).record(held_at.elapsed().as_secs_f64());
    tracing::debug!(
        slot,
        held_ms = held_at.elapsed().as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "slot released"
    );
    // Tell the new owner now rather than at its next refresh; the row is the truth either way.
    if let Some(url) = cluster
        .view()
        .nodes
        .get(target)
        .map(|n| n.advertise_url.clone())
    {
        let hint = SlotHint { slot };
        let _ = cluster
            .peers()
            .post::<_, serde_json::Value>(&url, "/internal/v1/slots/refresh", &hint)
            .await;
    }
    cluster.refresh_slot(slot).await;
    Ok(())
}

/// Puts a held slot back into service here and clears its `moving` mark.
async fn cancel(cluster: &Cluster, row: &ferry_shards::ownership::SlotRow) {
    let view = cluster.view();
    if let Ok(next) = ownership::apply(row, &Change::CancelMove, &view.node_views()) {
        if let Err(e) = cluster.db().cas_slot(row, &next).await {
            tracing::warn!(slot = row.slot, error = %e, "cannot clear the moving mark");
        }
    }
    cluster.node().gates().set_serving(row.slot, row.epoch);
}
