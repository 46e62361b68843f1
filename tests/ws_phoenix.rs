//! The official `phoenix` JavaScript client (npm `phoenix` 1.8, Node, `ws` as transport)
//! against the real binary: two clients join one conversation (one authenticated the phoenix
//! 1.8 way, with the token as a subprotocol, one with the `token` param), one sends over the
//! socket, both receive; the server is killed with SIGKILL mid-stream and restarted on the same
//! port and data dir; the clients reconnect on their own, rejoin with `after_seq` = the last seq
//! they saw, and must end up with exactly the conversation's log, seq by seq, in the same order.
//!
//! Needs `node` and `npm` (ops/test.sh installs them); without them this test fails, it does not
//! skip. `tests/js/node_modules` is installed with `npm ci` from the committed lock file when
//! missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{free_port, seq_of, TestServer};

const JWT_SECRET: &str = "ws-phoenix-secret-73ad-at-least-32-bytes";
const CONVERSATION: &str = "room";
/// Messages alice sends over her socket.
const ALICE_SENDS: u64 = 5;
/// Messages appended over HTTP before the crash…
const BEFORE_CRASH: u64 = 30;
/// …and by an appender that is running when the server is killed.
const AROUND_CRASH: u64 = 60;
/// The appender's progress at which the server is killed.
const KILL_AFTER: u64 = 10;
/// Every wait on the Node script fails the test after this.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// An HS256 end-user token for `sub`.
fn jwt(sub: &str) -> String {
    common::user_token(JWT_SECRET, sub)
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Fails with a clear message when a tool is missing: this suite must not pass by skipping.
fn require_tool(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required by the phoenix client tests (tests/js) but was not found on PATH; \
         ops/test.sh installs Node.js and npm, or install them by hand (Node 20 or newer)"
    );
}

/// Installs the locked `phoenix` and `ws` packages when `node_modules` is missing.
fn ensure_node_modules() {
    require_tool("node");
    let dir = js_dir();
    if dir.join("node_modules/phoenix/package.json").exists()
        && dir.join("node_modules/ws/package.json").exists()
    {
        return;
    }
    require_tool("npm");
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .expect("run npm ci");
    assert!(
        output.status.success(),
        "npm ci in {} failed: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port that was free a moment ago, so a restarted server can listen on the same one.
/// The Node script: its JSON lines arrive on a channel; commands go to its stdin.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    /// Everything received so far, for failure messages.
    log: Vec<Value>,
}

impl Script {
    fn start(script: &str, env: &[(&str, String)]) -> Script {
        let mut cmd = Command::new("node");
        cmd.arg(js_dir().join(script))
            .current_dir(js_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"event": "unparsed", "line": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Script {
            child,
            stdin,
            lines,
            log: Vec::new(),
        }
    }

    /// Reads lines until `done` says so; fails after STEP_TIMEOUT.
    fn wait_until(&mut self, what: &str, mut done: impl FnMut(&Value) -> bool) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    assert_ne!(line["event"], "problem", "client reported: {line}");
                    assert_ne!(line["event"], "join_error", "client reported: {line}");
                    let stop = done(&line);
                    self.log.push(line);
                    if stop {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{what}: not within {STEP_TIMEOUT:?}; script said: {}",
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{what}: the script exited; it said: {}", self.tail())
                }
            }
        }
    }

    fn tail(&self) -> String {
        let start = self.log.len().saturating_sub(40);
        self.log[start..]
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to script");
        self.stdin.flush().expect("flush script stdin");
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tracks the highest seq each client has seen.
#[derive(Default)]
struct Seen {
    alice: u64,
    bob: u64,
}

impl Seen {
    fn update(&mut self, line: &Value) {
        if line["event"] == "seen" {
            let seq = line["seq"].as_u64().unwrap_or(0);
            match line["client"].as_str() {
                Some("alice") => self.alice = self.alice.max(seq),
                Some("bob") => self.bob = self.bob.max(seq),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_clients_resume_exactly_after_a_server_crash() {
    ensure_node_modules();
    let port = free_port();
    let mut server = TestServer::builder()
        .without_listen_flags()
        .arg("--listen")
        .arg(&format!("127.0.0.1:{port}"))
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .env("FERRY_JWT_SECRET", JWT_SECRET)
        .start();
    server
        .create_conversation(CONVERSATION, &["alice", "bob"])
        .await;

    let mut script = Script::start(
        "resume.mjs",
        &[
            ("FERRY_SOCKET_URL", format!("ws://127.0.0.1:{port}/socket")),
            ("FERRY_CONVERSATION", CONVERSATION.to_owned()),
            ("FERRY_ALICE_TOKEN", jwt("alice")),
            ("FERRY_BOB_TOKEN", jwt("bob")),
            ("FERRY_ALICE_SENDS", ALICE_SENDS.to_string()),
        ],
    );
    let mut joined = (false, false);
    script.wait_until("both clients join", |line| {
        if line["event"] == "joined" {
            assert_eq!(line["response"]["conversation_id"], CONVERSATION, "{line}");
            match line["client"].as_str() {
                Some("alice") => joined.0 = true,
                Some("bob") => joined.1 = true,
                _ => {}
            }
        }
        joined == (true, true)
    });

    // Live traffic from both sides: alice over her socket, bob over HTTP.
    for i in 0..BEFORE_CRASH {
        server
            .append(CONVERSATION, "bob", json!({"from": "bob", "i": i}))
            .await;
    }
    let mut seen = Seen::default();
    let mut alice_sent = false;
    let target = BEFORE_CRASH + ALICE_SENDS;
    script.wait_until("both clients see the first messages", |line| {
        seen.update(line);
        alice_sent |= line["event"] == "sent_all";
        alice_sent && seen.alice == target && seen.bob == target
    });

    // An appender that keeps going while the server is killed and restarted: each message has
    // an idempotency key and is retried until acknowledged, so none is lost or doubled.
    let progress = Arc::new(AtomicU64::new(0));
    let appender = {
        let client = server.client();
        let url = server.url(&format!("/v1/conversations/{CONVERSATION}/messages"));
        let progress = progress.clone();
        tokio::spawn(async move {
            for i in 0..AROUND_CRASH {
                let body = json!({
                    "sender": "bob",
                    "content": {"from": "appender", "i": i},
                    "idempotency_key": format!("around-{i}"),
                });
                let deadline = Instant::now() + STEP_TIMEOUT;
                loop {
                    match client.post(&url).json(&body).send().await {
                        Ok(resp) if resp.status().as_u16() == 201 => break,
                        Ok(resp)
                            if resp.status().as_u16() == 429 || resp.status().as_u16() == 503 => {}
                        Ok(resp) => panic!("append {i}: {} {:?}", resp.status(), resp.text().await),
                        Err(_) => {} // the server is down: retry
                    }
                    assert!(Instant::now() < deadline, "append {i} never succeeded");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    while progress.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < deadline, "appender made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| {
        server.kill9();
        server.restart();
    });
    assert_eq!(server.listen.port(), port, "restarted on the same port");
    tokio::time::timeout(STEP_TIMEOUT, appender)
        .await
        .expect("appender finished in time")
        .expect("appender");

    let (log, last_seq) = server.read_all(CONVERSATION).await;
    assert_eq!(
        log.iter().map(seq_of).collect::<Vec<_>>(),
        (1..=last_seq).collect::<Vec<_>>()
    );
    assert_eq!(
        last_seq,
        BEFORE_CRASH + ALICE_SENDS + AROUND_CRASH,
        "every message stored exactly once"
    );
    let log_ids: Vec<&str> = log.iter().map(|m| m["id"].as_str().expect("id")).collect();

    script.command(&format!("finish {last_seq}"));
    let mut done = Vec::new();
    script.wait_until("both clients report", |line| {
        if line["event"] == "done" {
            done.push(line.clone());
        }
        done.len() == 2
    });
    let mut reconnected = 0;
    for report in &done {
        let client = report["client"].as_str().expect("client");
        let seqs: Vec<u64> = report["seqs"]
            .as_array()
            .expect("seqs")
            .iter()
            .map(|s| s.as_u64().expect("seq"))
            .collect();
        assert_eq!(
            report["problems"],
            json!([]),
            "{client} saw gaps or repeats: {report}"
        );
        assert_eq!(
            seqs,
            (1..=last_seq).collect::<Vec<_>>(),
            "{client} received every seq exactly once, in order"
        );
        let ids: Vec<&str> = report["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|s| s.as_str().expect("id"))
            .collect();
        assert_eq!(ids, log_ids, "{client} saw the log's order");
        let joins: Vec<u64> = report["joins"]
            .as_array()
            .expect("joins")
            .iter()
            .map(|s| s.as_u64().expect("after_seq"))
            .collect();
        assert_eq!(joins[0], 0, "{client}: first join from the start");
        if joins.len() >= 2 {
            reconnected += 1;
            assert!(
                joins[1..].iter().any(|&after| after >= target),
                "{client} rejoined with the seq it had seen ({joins:?})"
            );
        }
        if client == "alice" {
            let senders = report["senders"].as_array().expect("senders");
            let own = senders.iter().filter(|s| *s == "alice").count() as u64;
            assert_eq!(own, ALICE_SENDS, "alice's socket sends are stored as alice");
        }
    }
    assert_eq!(
        reconnected, 2,
        "both clients reconnected after the crash: {done:?}"
    );
    let _ = script.child.wait();
}

/// A token that expires while the phoenix client is connected: the server errors the joined
/// topic, closes the socket, refuses the expired token on reconnect, and the client, once its
/// `params` function returns a fresh token, reconnects, rejoins from the last seq it saw and
/// receives what comes next, with nothing repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phoenix_client_reconnects_with_a_fresh_token_after_expiry() {
    ensure_node_modules();
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", JWT_SECRET)
        .env("FERRY_AUTH__JWT_LEEWAY", "0")
        .start();
    server.create_conversation("expiring", &["alice"]).await;
    server.append("expiring", "bob", json!("before")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "exp": now + 6}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign");
    let mut script = Script::start(
        "expiry.mjs",
        &[
            ("FERRY_SOCKET_URL", format!("ws://{}/socket", server.listen)),
            ("FERRY_CONVERSATION", "expiring".to_owned()),
            ("FERRY_TOKEN", short),
        ],
    );
    script.wait_until("joined, and saw seq 1", |line| line["event"] == "seen");
    let mut channel_errored = false;
    let mut close = Value::Null;
    script.wait_until("the socket is closed at expiry", |line| {
        match line["event"].as_str() {
            Some("channel_error") => channel_errored = true,
            Some("closed") => close = line.clone(),
            _ => {}
        }
        !close.is_null()
    });
    assert!(channel_errored, "phx_error before the close");
    assert_eq!(close["code"], 4401, "{close}");
    assert_eq!(close["reason"], "token expired", "{close}");
    // Reconnecting with the expired token fails (the client keeps trying).
    script.wait_until("a refused reconnect", |line| {
        line["event"] == "socket_error"
    });

    script.command(&format!("token {}", jwt("alice")));
    script.wait_until("rejoined with a fresh token", |line| {
        line["event"] == "joined" && line["after_seq"] == 1
    });
    server.append("expiring", "bob", json!("after")).await;
    script.wait_until("saw seq 2", |line| {
        assert_ne!(line["seq"], 1, "seq 1 repeated after the rejoin: {line}");
        line["event"] == "seen" && line["seq"] == 2
    });
}
