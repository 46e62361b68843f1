//! `ferry admin`: the operator's client for the admin listener's `/admin` API.
//!
//! Prints tables for people (`--json`: the JSON answer as the node sent it). Exit status: 0 on success, 1 when
//! the listener cannot be reached or answers with an error (printed as `CODE: message`).

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;

/// One `ferry admin` request.
pub enum Action {
    Status,
    Slots,
    /// Drain a node; with `wait`, return only once it owns no slot.
    Drain(String, bool),
    Undrain(String),
    Rebalance,
    /// Hand a dead node's slots to the live nodes.
    Failover(String),
    /// Create an API key: name, scope.
    KeyCreate(String, String),
    KeyList,
    KeyRevoke(String),
    /// Rotate a key: id, grace in seconds.
    KeyRotate(String, u64),
}

pub struct Options {
    /// Base URL of the admin listener, e.g. `http://127.0.0.1:4001`.
    pub admin_url: String,
    pub api_key: Option<String>,
    pub json: bool,
}

/// The admin listener's base URL: `http://` added to a bare `host:port`, no trailing `/`.
fn base_url(admin_url: &str) -> anyhow::Result<String> {
    let text = admin_url.trim();
    let base = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    match reqwest::Url::parse(&base) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|h| !h.is_empty())
                && url.path() == "/"
                && !base.contains('?') =>
        {
            Ok(base.trim_end_matches('/').to_owned())
        }
        _ => anyhow::bail!(
            "invalid admin URL {admin_url:?}: give the admin listener as http://HOST:PORT"
        ),
    }
}

/// Why a request did not get an answer: reqwest's message and every cause below it.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Runs `action` and returns what to print on stdout.
pub async fn run(action: Action, options: &Options) -> anyhow::Result<String> {
    let base = base_url(&options.admin_url)?;
    let Some(key) = options.api_key.as_deref().filter(|k| !k.is_empty()) else {
        anyhow::bail!(
            "no admin API key: pass --api-key or set FERRY_API_KEY (or FERRY_BOOTSTRAP_API_KEY)"
        );
    };
    let mut body = None;
    let (method, path) = match &action {
        Action::Status => (reqwest::Method::GET, "/admin/cluster".to_owned()),
        Action::Slots => (reqwest::Method::GET, "/admin/slots".to_owned()),
        Action::Drain(node, _) => (
            reqwest::Method::POST,
            format!("/admin/nodes/{}/drain", path_segment(node)),
        ),
        Action::Undrain(node) => (
            reqwest::Method::POST,
            format!("/admin/nodes/{}/undrain", path_segment(node)),
        ),
        Action::Rebalance => (reqwest::Method::POST, "/admin/rebalance".to_owned()),
        Action::Failover(node) => (
            reqwest::Method::POST,
            format!("/admin/nodes/{}/failover", path_segment(node)),
        ),
        Action::KeyCreate(name, scope) => {
            body = Some(serde_json::json!({ "name": name, "scope": scope }));
            (reqwest::Method::POST, "/admin/keys".to_owned())
        }
        Action::KeyList => (reqwest::Method::GET, "/admin/keys".to_owned()),
        Action::KeyRevoke(id) => (
            reqwest::Method::DELETE,
            format!("/admin/keys/{}", path_segment(id)),
        ),
        Action::KeyRotate(id, grace_s) => {
            body = Some(serde_json::json!({ "grace_s": grace_s }));
            (
                reqwest::Method::POST,
                format!("/admin/keys/{}/rotate", path_segment(id)),
            )
        }
    };
    let url = format!("{base}{path}");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut request = client.request(method, &url).bearer_auth(key);
    if let Some(body) = &body {
        request = request.json(body);
    }
    let response = request.send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the admin listener at {base}: {}",
            describe(&e)
        )
    })?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer from {url}: {}", describe(&e)))?;
    let body: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{url} answered {status} without a JSON body: {e}"))?;
    if !status.is_success() {
        let code = body["error"].as_str().unwrap_or("error");
        let message = body["message"].as_str().unwrap_or("");
        anyhow::bail!("{code}: {message}");
    }
    if options.json {
        return Ok(text + "\n");
    }
    Ok(match action {
        Action::Status => render_status(serde_json::from_value(body)?),
        Action::Slots => render_slots(serde_json::from_value(body)?),
        Action::Drain(node, true) => {
            wait_drained(&client, &base, key, &node).await?;
            let mut out = render_nodes(&[serde_json::from_value(body)?]);
            out.push_str(&format!("{node} owns no slot.\n"));
            out
        }
        Action::Drain(..) | Action::Undrain(_) => render_nodes(&[serde_json::from_value(body)?]),
        Action::Rebalance => {
            let moves = body["moves"].as_array().map_or(0, Vec::len);
            let message = body["message"].as_str().unwrap_or_default();
            format!("{moves} slot moves started. {message}\n")
        }
        Action::Failover(_) => render_failover(serde_json::from_value(body)?),
        Action::KeyCreate(..) | Action::KeyRotate(..) => render_created_key(&body),
        Action::KeyList => render_keys(&body),
        Action::KeyRevoke(_) => format!(
            "{} revoked; every node refuses it within a second.\n",
            body["id"].as_str().unwrap_or_default()
        ),
    })
}

fn render_created_key(body: &Value) -> String {
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
    let mut out = String::new();
    let _ = writeln!(out, "id      {}", text("id"));
    let _ = writeln!(out, "name    {}", text("name"));
    let _ = writeln!(out, "scope   {}", text("scope"));
    let _ = writeln!(out, "key     {}", text("key"));
    if let Some(old) = body["replaces"].as_str() {
        let until = body["replaced_key_expires_at"].as_str().unwrap_or("now");
        let _ = writeln!(out, "replaces {old} (works until {until})");
    }
    out.push_str("The key is shown only now; store it.\n");
    out
}

fn render_keys(body: &Value) -> String {
    let mut out = format!(
        "{:<21} {:<8} {:<9} {:<25} {:<25} {}\n",
        "ID", "SCOPE", "STATE", "CREATED", "LAST USED", "NAME"
    );
    for key in body["keys"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let text = |k: &str| key[k].as_str().unwrap_or("-").to_owned();
        let _ = writeln!(
            out,
            "{:<21} {:<8} {:<9} {:<25} {:<25} {}",
            text("id"),
            text("scope"),
            text("state"),
            text("created_at"),
            text("last_used_at"),
            text("name")
        );
    }
    out
}

/// Polls `/admin/slots` until `node` owns no slot (at most ten minutes).
async fn wait_drained(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    node: &str,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let url = format!("{base}/admin/slots");
    loop {
        let owned = match client.get(&url).bearer_auth(key).send().await {
            Ok(r) if r.status().is_success() => r.json::<Slots>().await.ok().map(|s| {
                s.slots
                    .iter()
                    .filter(|slot| slot.owner.as_deref() == Some(node))
                    .count()
            }),
            _ => None,
        };
        if owned == Some(0) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{node} still owns {} slots after 10 minutes",
                owned.unwrap_or(0)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Percent-encodes everything but the characters node ids are made of.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct Cluster {
    mode: String,
    node: String,
    slot_count: u32,
    unassigned_slots: usize,
    #[serde(default)]
    moving_slots: usize,
    #[serde(default)]
    unavailable_slots: usize,
    nodes: Vec<NodeRow>,
}

#[derive(Deserialize)]
struct NodeRow {
    id: String,
    state: String,
    ready: bool,
    listen: String,
    admin: String,
    slots: usize,
    conversations: usize,
    appends_per_sec: f64,
    archive_backlog_records: usize,
}

#[derive(Deserialize)]
struct Slots {
    slots: Vec<SlotRow>,
}

#[derive(Deserialize)]
struct SlotRow {
    slot: u32,
    owner: Option<String>,
    epoch: u64,
    state: String,
    #[serde(default)]
    conversations: usize,
    #[serde(default)]
    appends_total: u64,
    #[serde(default)]
    appends_per_sec: f64,
}

fn render_status(cluster: Cluster) -> String {
    let mode = if cluster.mode == "single" {
        "single node".to_owned()
    } else {
        cluster.mode
    };
    let nodes = match cluster.nodes.len() {
        1 => "1 node".to_owned(),
        n => format!("{n} nodes"),
    };
    let mut out = format!(
        "cluster: {mode}, {nodes}, {} slots, {} unassigned, {} moving, {} unavailable \
         (answered by {})\n",
        cluster.slot_count,
        cluster.unassigned_slots,
        cluster.moving_slots,
        cluster.unavailable_slots,
        cluster.node
    );
    out.push_str(&render_nodes(&cluster.nodes));
    out
}

fn render_nodes(nodes: &[NodeRow]) -> String {
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.state.clone(),
                if n.ready { "yes" } else { "no" }.to_owned(),
                n.slots.to_string(),
                n.conversations.to_string(),
                format!("{:.1}", n.appends_per_sec),
                n.archive_backlog_records.to_string(),
                n.listen.clone(),
                n.admin.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NODE",
            "STATE",
            "READY",
            "SLOTS",
            "CONVERSATIONS",
            "APPENDS/S",
            "BACKLOG",
            "LISTEN",
            "ADMIN",
        ],
        &rows,
    )
}

#[derive(Deserialize)]
struct Failover {
    moves: Vec<FailoverMove>,
    message: String,
}

#[derive(Deserialize)]
struct FailoverMove {
    slot: u32,
    to: String,
    epoch: u64,
}

fn render_failover(failover: Failover) -> String {
    let mut out = format!("{}\n", failover.message);
    if !failover.moves.is_empty() {
        let rows = failover
            .moves
            .iter()
            .map(|m| vec![m.slot.to_string(), m.to.clone(), m.epoch.to_string()])
            .collect::<Vec<_>>();
        out.push_str(&table(&["SLOT", "TO", "EPOCH"], &rows));
    }
    out
}

fn render_slots(slots: Slots) -> String {
    let rows = slots
        .slots
        .iter()
        .map(|s| {
            vec![
                s.slot.to_string(),
                s.owner.clone().unwrap_or_else(|| "-".to_owned()),
                s.epoch.to_string(),
                s.state.clone(),
                s.conversations.to_string(),
                s.appends_total.to_string(),
                format!("{:.1}", s.appends_per_sec),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "SLOT",
            "OWNER",
            "EPOCH",
            "STATE",
            "CONVERSATIONS",
            "APPENDS",
            "APPENDS/S",
        ],
        &rows,
    )
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{cell:<w$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let text = table(
            &["A", "LONG"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(text, "A    LONG\nxyz  1\nq    22\n");
    }

    #[test]
    fn admin_urls_need_a_host() {
        assert_eq!(base_url("127.0.0.1:4001").unwrap(), "http://127.0.0.1:4001");
        assert_eq!(base_url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(base_url("HTTPS://h").unwrap(), "HTTPS://h");
        for bad in ["", " ", "http://", "ftp://h:1", "http://h:1/x", "h:1?q"] {
            assert!(base_url(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_failover_lists_its_moves_under_its_message() {
        let body = serde_json::json!({
            "node": "n3",
            "moves": [{"slot": 4, "to": "n1", "epoch": 7}, {"slot": 9, "to": "n2", "epoch": 3}],
            "message": "2 slots of n3 failed over to the live nodes",
        });
        assert_eq!(
            render_failover(serde_json::from_value(body).unwrap()),
            "2 slots of n3 failed over to the live nodes\n\
             SLOT  TO  EPOCH\n4     n1  7\n9     n2  3\n"
        );
        let none = serde_json::json!({"node": "n3", "moves": [], "message": "n3 owns no slot"});
        assert_eq!(
            render_failover(serde_json::from_value(none).unwrap()),
            "n3 owns no slot\n"
        );
    }

    #[test]
    fn node_ids_are_escaped_in_paths() {
        assert_eq!(path_segment("node-1.a_b"), "node-1.a_b");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
