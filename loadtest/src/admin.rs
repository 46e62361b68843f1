//! The Ferry admin API as the `cluster` scenario uses it: cluster status, drain, undrain and
//! rebalance. Any node's admin listener acts for the whole cluster, so [`AdminClient`] holds
//! every `--admin-targets` URL and, when one cannot be reached (or answers 5xx), asks the next.
//! A refusal (4xx, e.g. `409 conflict` for a drain that would leave no active node) is an
//! answer, not an outage: it is returned at once.
//!
//! Every request is bounded by the client's timeout; nothing here retries beyond one pass over
//! the targets.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::LoadError;

/// `GET /admin/cluster`, reduced to what the scenario reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterStatus {
    /// `cluster` or `single`.
    pub mode: String,
    /// The node that answered.
    pub node: String,
    pub slot_count: u32,
    #[serde(default)]
    pub moving_slots: usize,
    #[serde(default)]
    pub unavailable_slots: usize,
    #[serde(default)]
    pub unassigned_slots: usize,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub state: String,
    /// Slots this node owns (moving ones included until they land).
    pub slots: usize,
}

impl ClusterStatus {
    /// Slots `node` owns; `None` when the cluster does not list it.
    pub fn slots_of(&self, node: &str) -> Option<usize> {
        self.nodes.iter().find(|n| n.id == node).map(|n| n.slots)
    }
}

#[derive(Clone)]
pub struct AdminClient {
    client: reqwest::Client,
    /// Admin listener base URLs, no trailing slash, in `--admin-targets` order.
    bases: Vec<String>,
}

impl AdminClient {
    pub fn new(bases: &[String], key: &str, timeout: Duration) -> Result<AdminClient, LoadError> {
        let bases: Vec<String> = bases
            .iter()
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(LoadError::Args("no --admin-targets".into()));
        }
        if let Some(bad) = bases
            .iter()
            .find(|b| !(b.starts_with("http://") || b.starts_with("https://")))
        {
            return Err(LoadError::Args(format!(
                "bad admin target {bad:?}: expected http:// or https://"
            )));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        let auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| LoadError::Args("the admin key is not a valid header value".into()))?;
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .build()?;
        Ok(AdminClient { client, bases })
    }

    pub async fn cluster(&self) -> Result<ClusterStatus, LoadError> {
        let body = self.call(reqwest::Method::GET, "/admin/cluster").await?;
        serde_json::from_value(body.clone())
            .map_err(|e| LoadError::Admin(format!("GET /admin/cluster: {e}: {body}")))
    }

    pub async fn drain(&self, node: &str) -> Result<(), LoadError> {
        self.call(reqwest::Method::POST, &format!("/admin/nodes/{node}/drain"))
            .await
            .map(|_| ())
    }

    pub async fn undrain(&self, node: &str) -> Result<(), LoadError> {
        self.call(
            reqwest::Method::POST,
            &format!("/admin/nodes/{node}/undrain"),
        )
        .await
        .map(|_| ())
    }

    /// `POST /admin/rebalance`; returns how many moves it planned.
    pub async fn rebalance(&self) -> Result<usize, LoadError> {
        let body = self.call(reqwest::Method::POST, "/admin/rebalance").await?;
        body["moves"]
            .as_array()
            .map(Vec::len)
            .ok_or_else(|| LoadError::Admin(format!("POST /admin/rebalance: no moves: {body}")))
    }

    /// One request, tried on each admin target in turn until one answers (2xx or 4xx).
    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Value, LoadError> {
        let mut outages = Vec::new();
        for base in &self.bases {
            let sent = self
                .client
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    outages.push(format!("{base}: {e}"));
                    continue;
                }
            };
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status.is_server_error() {
                outages.push(format!("{base}: {status} {text}"));
                continue;
            }
            if !status.is_success() {
                return Err(LoadError::Admin(format!(
                    "{method} {base}{path}: {status} {text}"
                )));
            }
            return serde_json::from_str(&text).map_err(|e| {
                LoadError::Admin(format!("{method} {base}{path}: not JSON ({e}): {text}"))
            });
        }
        Err(LoadError::Admin(format!(
            "{method} {path}: no admin target answered: {}",
            outages.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cluster_status_the_admin_api_answers() {
        let body = serde_json::json!({
            "mode": "cluster", "node": "n1", "slot_count": 512, "unassigned_slots": 0,
            "moving_slots": 3, "unavailable_slots": 0,
            "nodes": [
                {"id": "n1", "state": "active", "ready": true, "slots": 200, "listen": "x"},
                {"id": "n2", "state": "draining", "ready": false, "slots": 0}
            ]
        });
        let s: ClusterStatus = serde_json::from_value(body).expect("parses");
        assert_eq!(
            (s.moving_slots, s.slots_of("n1"), s.slots_of("n2")),
            (3, Some(200), Some(0))
        );
        assert_eq!(s.slots_of("n9"), None);
    }

    #[test]
    fn admin_targets_must_be_http_urls() {
        let t = Duration::from_secs(1);
        assert!(AdminClient::new(&["http://127.0.0.1:1/".into()], "k", t).is_ok());
        assert!(AdminClient::new(&["127.0.0.1:1".into()], "k", t).is_err());
        assert!(AdminClient::new(&[], "k", t).is_err());
    }
}
