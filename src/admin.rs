//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use ferry_shards::node::Node;

#[derive(Clone)]
pub struct AdminState {
    pub node: Node,
    pub prometheus: PrometheusHandle,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
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

async fn readyz(State(state): State<AdminState>) -> StatusCode {
    if state.node.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
