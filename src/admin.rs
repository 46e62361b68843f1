//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`, the `/dashboard` slot
//! map, and, with an admin API key, `/admin/cluster`, `/admin/slots`, drain, undrain, rebalance
//! and failover.
//!
//! A node runs alone until clustering exists: it owns every slot at epoch 1, its placement is the
//! ring over one node (so a rebalance has nothing to move), and draining it would leave nowhere for
//! its slots to go, so a drain is refused with `conflict` (SIGTERM finishes in-flight work and
//! exits instead). The answers already have the cluster's shape (`nodes`, per-slot `owner`,
//! `epoch`, `state`), so clients and the `ferry admin` CLI need not change when more nodes join.
//!
//! Every answer forbids framing (`X-Frame-Options: DENY`, CSP `frame-ancestors 'none'`) and
//! sniffing, and carries a Content-Security-Policy that loads nothing; the dashboard's allows
//! exactly its own inline script (by hash), its inline styles and fetches to this listener.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;

use ferry_shards::node::Node;
use ferry_shards::record::format_rfc3339_millis;

use crate::auth::Auth;
use crate::http::error::ApiError;
use crate::http::PathParam;

/// Every slot's owner epoch while the node runs alone: ownership never changed hands.
pub const SINGLE_NODE_EPOCH: u64 = 1;
/// How often per-slot append rates are sampled.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What the admin surface says about this node.
pub struct NodeInfo {
    pub id: String,
    pub listen: String,
    pub admin: String,
    pub started_at_ms: i64,
}

#[derive(Clone)]
pub struct AdminState {
    pub node: Node,
    pub prometheus: PrometheusHandle,
    pub auth: Arc<Auth>,
    pub info: Arc<NodeInfo>,
    /// True once the node is shutting down (its state reads `draining`).
    pub shutdown: watch::Receiver<bool>,
    pub rates: Arc<SlotRates>,
    /// This node's cluster membership; `None` for a node that runs alone.
    pub cluster: Option<crate::cluster::Cluster>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(crate::http::healthz))
        .route("/readyz", get(readyz))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/slots.json", get(dashboard_slots))
        .route("/admin/cluster", get(cluster))
        .route("/admin/slots", get(slots))
        .route("/admin/nodes/{id}/drain", post(drain))
        .route("/admin/nodes/{id}/undrain", post(undrain))
        .route("/admin/nodes/{id}/failover", post(failover))
        .route("/admin/rebalance", post(rebalance))
        .merge(crate::admin_keys::routes())
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// What an admin answer may load when it does not say otherwise: nothing.
const DEFAULT_CSP: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(DEFAULT_CSP));
    response
}

/// The dashboard's policy: its one inline script by hash, inline styles (the cells' colours are
/// `style` attributes), fetches to this listener, nothing else.
fn dashboard_csp() -> &'static str {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            script_hash(DASHBOARD_TEMPLATE)
        )
    });
    &CSP
}

/// `sha256-…` of the page's inline script, as CSP hashes it: the exact text between the tags.
fn script_hash(page: &str) -> String {
    use sha2::{Digest, Sha256};
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script);
    format!(
        "sha256-{}",
        base64_standard(&Sha256::digest(script.as_bytes()))
    )
}

/// Standard base64 with padding (what CSP hash sources are written in).
fn base64_standard(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let (records, bytes) = state.node.archive_backlog();
    metrics::gauge!(ferry_shards::metrics::ARCHIVE_BACKLOG_RECORDS).set(records as f64);
    metrics::gauge!(ferry_shards::metrics::ARCHIVE_BACKLOG_BYTES).set(bytes as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// The same answer as the public listener's `/readyz`.
async fn readyz(State(state): State<AdminState>) -> Response {
    crate::http::readiness(&state.node, state.cluster.as_ref())
}

/// A caller holding an admin API key: 401 without valid credentials, 403 for any other caller.
pub struct AdminCaller;

impl FromRequestParts<AdminState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let ip = crate::http::transport::client_ip(&parts.extensions);
        match state
            .auth
            .authenticate(&parts.headers, ip.as_deref())
            .await?
        {
            principal if principal.is_admin() => Ok(AdminCaller),
            _ => {
                crate::metrics::count_auth_failure("not_admin");
                Err(ApiError::forbidden("the admin API needs an admin API key"))
            }
        }
    }
}

/// Per-slot append rates over the last [`RATE_WINDOW`], sampled in the background.
#[derive(Default)]
pub struct SlotRates {
    per_sec: Mutex<Vec<f64>>,
}

impl SlotRates {
    /// Samples `node`'s per-slot append counts every [`RATE_WINDOW`] until `stop` turns true.
    pub fn spawn(node: Node, mut stop: watch::Receiver<bool>) -> Arc<SlotRates> {
        let rates = Arc::new(SlotRates::default());
        let sampler = rates.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), node.slot_appends());
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RATE_WINDOW) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let now = (Instant::now(), node.slot_appends());
                let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
                let per_sec = now
                    .1
                    .iter()
                    .zip(&last.1)
                    .map(|(n, before)| n.saturating_sub(*before) as f64 / secs)
                    .collect();
                *sampler.per_sec.lock().unwrap_or_else(|e| e.into_inner()) = per_sec;
                last = now;
            }
        });
        rates
    }

    fn get(&self, slot: usize) -> f64 {
        let per_sec = self.per_sec.lock().unwrap_or_else(|e| e.into_inner());
        per_sec.get(slot).copied().unwrap_or(0.0)
    }
}

#[derive(Serialize, serde::Deserialize, Clone)]
pub struct SlotView {
    pub slot: u32,
    /// `null` while the slot is unassigned (a cluster that is still forming).
    pub owner: Option<String>,
    pub epoch: u64,
    /// `active`, `moving`, `unavailable` (its owner's lease expired) or `unassigned`.
    pub state: std::borrow::Cow<'static, str>,
    /// The node a moving slot goes to.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// The epoch the slot's last failover gave it; absent for a slot never failed over.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_failover_epoch: Option<u64>,
    /// Seqs failovers reserved in this slot's conversations for a lost node's messages; absent
    /// when none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reserved: Option<ReservedView>,
    /// Conversations with a running actor on this slot.
    pub conversations: usize,
    /// Appends acknowledged on this slot since the owner started.
    pub appends_total: u64,
    /// Appends acknowledged per second over the last completed 5 s sampling window.
    pub appends_per_sec: f64,
}

/// A slot's reserved seqs (see `docs/runtime-semantics.md`, "Node loss").
#[derive(Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReservedView {
    /// Conversations with reserved seqs.
    pub conversations: u64,
    /// Seqs reserved, in all of them.
    pub seqs: u64,
    /// Of those, written back when the lost node returned.
    pub restored: u64,
}

#[derive(Serialize, serde::Deserialize, Clone)]
pub struct NodeView {
    pub id: String,
    pub state: std::borrow::Cow<'static, str>,
    pub ready: bool,
    pub listen: String,
    pub admin: String,
    /// Where the other nodes reach this node's admin listener.
    pub advertise_url: String,
    /// The node's last lease renewal (database clock); `null` for a node that runs alone.
    pub last_heartbeat: Option<String>,
    pub slots: usize,
    pub conversations: usize,
    pub appends_per_sec: f64,
    pub archive_backlog_records: usize,
    pub archive_backlog_bytes: usize,
    pub started_at: String,
}

#[derive(Serialize)]
pub struct ClusterView {
    /// `single`: one node, no Redis or shared membership; `cluster`: nodes sharing Postgres
    /// and Redis.
    pub mode: &'static str,
    /// The node that answered.
    pub node: String,
    pub slot_count: u32,
    /// Slots without an owner (none while a node is up).
    pub unassigned_slots: usize,
    pub moving_slots: usize,
    pub unavailable_slots: usize,
    pub nodes: Vec<NodeView>,
}

/// `draining` once the node is shutting down (its slots with it), else `active`.
fn node_state(state: &AdminState) -> &'static str {
    if *state.shutdown.borrow() {
        "draining"
    } else {
        "active"
    }
}

pub fn slot_views(state: &AdminState) -> Vec<SlotView> {
    let conversations = state.node.slot_conversations();
    let appends = state.node.slot_appends();
    let slot_state = node_state(state);
    (0..state.node.config().slot_count)
        .map(|slot| {
            let i = slot as usize;
            SlotView {
                slot,
                owner: Some(state.info.id.clone()),
                epoch: SINGLE_NODE_EPOCH,
                state: slot_state.into(),
                target: None,
                last_failover_epoch: None,
                reserved: None,
                conversations: conversations.get(i).copied().unwrap_or(0),
                appends_total: appends.get(i).copied().unwrap_or(0),
                appends_per_sec: state.rates.get(i),
            }
        })
        .collect()
}

pub fn node_view(state: &AdminState, slots: &[SlotView]) -> NodeView {
    let (records, bytes) = state.node.archive_backlog();
    NodeView {
        id: state.info.id.clone(),
        state: node_state(state).into(),
        ready: state.node.ready(),
        listen: state.info.listen.clone(),
        admin: state.info.admin.clone(),
        advertise_url: format!("http://{}", state.info.admin),
        last_heartbeat: None,
        slots: slots.len(),
        conversations: slots.iter().map(|s| s.conversations).sum(),
        appends_per_sec: slots.iter().map(|s| s.appends_per_sec).sum::<f64>() + 0.0,
        archive_backlog_records: records,
        archive_backlog_bytes: bytes,
        started_at: format_rfc3339_millis(state.info.started_at_ms),
    }
}

fn cluster_view(state: &AdminState) -> ClusterView {
    let slots = slot_views(state);
    ClusterView {
        mode: "single",
        node: state.info.id.clone(),
        slot_count: state.node.config().slot_count,
        unassigned_slots: 0,
        moving_slots: 0,
        unavailable_slots: 0,
        nodes: vec![node_view(state, &slots)],
    }
}

/// The cluster and its slots as the answering node sees them: the tables from Postgres, each
/// node's own counters from that node.
async fn snapshot(state: &AdminState) -> (ClusterView, Vec<SlotView>) {
    match &state.cluster {
        None => (cluster_view(state), slot_views(state)),
        Some(cluster) => crate::cluster::admin::snapshot(state, cluster).await,
    }
}

async fn cluster(_: AdminCaller, State(state): State<AdminState>) -> Json<ClusterView> {
    Json(snapshot(&state).await.0)
}

#[derive(Serialize)]
struct SlotsBody {
    slots: Vec<SlotView>,
}

async fn slots(_: AdminCaller, State(state): State<AdminState>) -> Json<SlotsBody> {
    Json(SlotsBody {
        slots: snapshot(&state).await.1,
    })
}

/// The node `id` names, or `not_found`.
fn this_node<'a>(state: &'a AdminState, id: &str) -> Result<&'a NodeInfo, ApiError> {
    if id == state.info.id {
        Ok(&state.info)
    } else {
        Err(ApiError::not_found(format!(
            "no node {id:?} in this cluster (its only node is {:?})",
            state.info.id
        )))
    }
}

async fn drain(
    _: AdminCaller,
    State(state): State<AdminState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeView>, ApiError> {
    if let Some(cluster) = &state.cluster {
        return crate::cluster::admin::drain(&state, cluster, &id)
            .await
            .map(Json);
    }
    let node = this_node(&state, &id)?;
    tracing::warn!(node = %node.id, "drain refused: no other node can take the slots");
    Err(ApiError::conflict(format!(
        "node {:?} is the only node: no other node can take its {} slots. \
         To take it out of service, stop it with SIGTERM (it finishes in-flight work first)",
        node.id,
        state.node.config().slot_count
    )))
}

async fn undrain(
    _: AdminCaller,
    State(state): State<AdminState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeView>, ApiError> {
    if let Some(cluster) = &state.cluster {
        return crate::cluster::admin::undrain(&state, cluster, &id)
            .await
            .map(Json);
    }
    this_node(&state, &id)?;
    if *state.shutdown.borrow() {
        return Err(ApiError::conflict(
            "this node is shutting down; it cannot take its slots back",
        ));
    }
    // Already active and owning every slot: nothing to change.
    let slots = slot_views(&state);
    Ok(Json(node_view(&state, &slots)))
}

#[derive(Serialize)]
pub struct RebalanceBody {
    /// Slot moves started toward the ring's placement.
    pub moves: Vec<SlotMove>,
    pub message: String,
}

#[derive(Serialize)]
pub struct SlotMove {
    pub slot: u32,
    /// `null` for an unassigned slot being assigned.
    pub from: Option<String>,
    pub to: String,
}

async fn rebalance(
    _: AdminCaller,
    State(state): State<AdminState>,
) -> Result<Json<RebalanceBody>, ApiError> {
    if let Some(cluster) = &state.cluster {
        return crate::cluster::admin::rebalance(cluster).await.map(Json);
    }
    tracing::info!(node = %state.info.id, moves = 0, "rebalance: placement already matches");
    Ok(Json(RebalanceBody {
        moves: Vec::new(),
        message: format!(
            "placement already matches the ring: all {} slots are on the only node {:?}",
            state.node.config().slot_count,
            state.info.id
        ),
    }))
}

#[derive(Serialize)]
pub struct FailoverBody {
    /// The node failed over.
    pub node: String,
    /// Its slots that changed owner, each at its new epoch.
    pub moves: Vec<crate::cluster::failover::SlotFailover>,
    pub message: String,
}

async fn failover(
    _: AdminCaller,
    State(state): State<AdminState>,
    PathParam(id): PathParam,
) -> Result<Json<FailoverBody>, ApiError> {
    if let Some(cluster) = &state.cluster {
        return crate::cluster::admin::failover(cluster, &id)
            .await
            .map(Json);
    }
    let node = this_node(&state, &id)?;
    let mut conflict = ApiError::conflict(format!(
        "node {:?} is the only node and it is alive: only a dead node's slots are failed over",
        node.id
    ));
    conflict.reason = Some("node_alive");
    Err(conflict)
}

/// The slot map's data: public, like the page (no message or conversation data in it).
async fn dashboard_slots(State(state): State<AdminState>) -> Json<ClusterSnapshot> {
    let (cluster, slots) = snapshot(&state).await;
    Json(ClusterSnapshot { cluster, slots })
}

#[derive(Serialize)]
struct ClusterSnapshot {
    cluster: ClusterView,
    slots: Vec<SlotView>,
}

async fn dashboard(State(state): State<AdminState>) -> Response {
    let (cluster, slots) = snapshot(&state).await;
    (
        [(header::CONTENT_SECURITY_POLICY, dashboard_csp())],
        Html(render_dashboard(&cluster, &slots)),
    )
        .into_response()
}

/// The slot map as one self-contained page: rendered here, refreshed in place every 2 s from
/// `/dashboard/slots.json` (rates computed from the change in `appends_total`).
fn render_dashboard(cluster: &ClusterView, slots: &[SlotView]) -> String {
    let mut nodes = String::new();
    for n in &cluster.nodes {
        nodes.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{:.0}</td><td>{}</td></tr>",
            escape(&n.id),
            n.state,
            if n.ready { "yes" } else { "no" },
            escape(&n.listen),
            n.slots,
            n.conversations,
            n.appends_per_sec,
            n.archive_backlog_records,
        ));
    }
    let mut cells = String::with_capacity(slots.len() * 120);
    for s in slots {
        cells.push_str(&format!(
            "<div class=\"slot {state}\" data-slot=\"{slot}\" data-owner=\"{owner}\" \
             style=\"--hue:{hue}\" title=\"slot {slot} · owner {owner} · \
             epoch {epoch} · {state}{target} · {conv} conversations · {rate:.1} appends/s\">{slot}</div>",
            slot = s.slot,
            owner = escape(s.owner.as_deref().unwrap_or("-")),
            hue = owner_hue(&cluster.nodes, s.owner.as_deref().unwrap_or("-")),
            target = s
                .target
                .as_deref()
                .map(|t| format!(" → {}", escape(t)))
                .unwrap_or_default(),
            epoch = s.epoch,
            state = s.state,
            conv = s.conversations,
            rate = s.appends_per_sec,
        ));
    }
    DASHBOARD_TEMPLATE
        .replace("{{node}}", &escape(&cluster.node))
        .replace("{{mode}}", cluster.mode)
        .replace("{{slot_count}}", &cluster.slot_count.to_string())
        .replace("{{nodes}}", &nodes)
        .replace("{{cells}}", &cells)
}

/// Well-separated hues, one per node in the order of the node table (the page's script uses
/// the same palette, so cells keep their colour when it refreshes them).
const PALETTE: [u32; 10] = [210, 30, 140, 280, 0, 175, 55, 320, 100, 250];

fn owner_hue(nodes: &[NodeView], owner: &str) -> u32 {
    nodes
        .iter()
        .position(|n| n.id == owner)
        .map_or(0, |i| PALETTE[i % PALETTE.len()])
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const DASHBOARD_TEMPLATE: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(slot: u32, owner: &str, rate: f64) -> SlotView {
        SlotView {
            slot,
            owner: Some(owner.into()),
            epoch: 1,
            state: "active".into(),
            target: None,
            last_failover_epoch: None,
            reserved: None,
            conversations: 2,
            appends_total: 10,
            appends_per_sec: rate,
        }
    }

    #[test]
    fn the_dashboard_has_one_cell_per_slot_and_escapes_names() {
        let slots: Vec<SlotView> = (0..8).map(|s| slot(s, "n<1>", 1.5)).collect();
        let cluster = ClusterView {
            mode: "single",
            node: "n<1>".into(),
            slot_count: 8,
            unassigned_slots: 0,
            moving_slots: 0,
            unavailable_slots: 0,
            nodes: vec![],
        };
        let html = render_dashboard(&cluster, &slots);
        assert_eq!(html.matches("class=\"slot active\"").count(), 8);
        assert!(html.contains("data-slot=\"7\""));
        assert!(html.contains("owner n&lt;1&gt;"));
        assert!(!html.contains("n<1>"));
        assert!(!html.contains("{{"), "every placeholder is filled");
    }

    #[test]
    fn the_dashboard_policy_allows_its_one_script_by_hash() {
        assert_eq!(
            DASHBOARD_TEMPLATE.matches("<script").count(),
            1,
            "one inline script, hashed in the CSP; add another and hash it too"
        );
        assert!(
            !DASHBOARD_TEMPLATE
                .split_whitespace()
                .any(|word| word.starts_with("on") && word.contains('=')),
            "no inline event handlers (the CSP blocks them)"
        );
        // Known vectors (RFC 4648) and a known CSP hash (of the empty script).
        assert_eq!(base64_standard(b"foob"), "Zm9vYg==");
        assert_eq!(base64_standard(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64_standard(b"foobar"), "Zm9vYmFy");
        assert_eq!(
            script_hash("<script></script>"),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        let csp = dashboard_csp();
        assert!(csp.contains(&format!("script-src '{}'", script_hash(DASHBOARD_TEMPLATE))));
        assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-eval"));
    }
}
