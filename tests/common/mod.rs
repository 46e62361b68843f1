//! Shared harness for the integration tests: starts the real `ferry` binary on port 0 with a
//! temporary data dir, waits for its `ferry ready` line, and drives it over HTTP.
//!
//! A [`TestServer`] owns its temp dir, so `kill9`/`terminate` followed by `restart` reuses the
//! same data. The server's stderr goes to a file in that dir and is printed when a test fails
//! (or when the binary does not come up). Nothing here sleeps for a fixed time: every wait is a
//! poll against a deadline that fails the test with a clear message.

#![allow(dead_code)]

pub mod cluster;
pub mod pg;
pub mod s3;
pub mod ws;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The bootstrap admin key every server gets unless a test asks for a generated one.
pub const API_KEY: &str = "it-admin-key-7f3c9a";

/// How long the binary may take from spawn to `ferry ready` (debug build, WAL recovery).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Every HTTP request fails after this instead of hanging the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A port of 127.0.0.1 that nothing listens on now, for a process the test starts on a fixed
/// port (and may start again on the same one).
///
/// Taken outside the kernel's ephemeral range (`ip_local_port_range`), so no outgoing connection
/// and no other `bind(0)` on this machine can be handed it between this call and the child's
/// bind, nor while the child is down for a restart. Each port is handed out once per test binary;
/// the start is random so test binaries running at the same time rarely try the same ones, and a
/// port somebody holds is skipped.
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let candidates: Vec<u16> = (10_000u32..=65_535)
        .filter(|p| *p < low || *p > high)
        .map(|p| p as u16)
        .collect();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0)
        ^ (std::process::id() as usize).wrapping_mul(7919);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for k in 0..candidates.len() {
        let port = candidates[seed.wrapping_add(k) % candidates.len()];
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port of 127.0.0.1 outside the ephemeral range {low}-{high}");
}

/// How to start a server; kept by the [`TestServer`] so `restart` starts it the same way.
pub struct ServerBuilder {
    /// Holds the data dir, the stderr log and any config file for the server's whole life.
    root: TempDir,
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// `Some(key)`: exported as `FERRY_BOOTSTRAP_API_KEY`; `None`: let the server generate one.
    bootstrap_key: Option<String>,
    /// Pass `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`; off for config-precedence tests.
    listen_flags: bool,
    /// Keep the `[rate]` defaults. Off by default: tests drive one key and one IP far past
    /// them; the tests of the limits turn them on.
    rate_limits: bool,
}

impl ServerBuilder {
    /// The data dir the server will get (`<root>/data`), e.g. to mount a filesystem there first.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Sets `FERRY_*` (or any) environment variable for the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Keeps the `[rate]` limits at their defaults (or what the test's env and config set).
    pub fn with_rate_limits(mut self) -> Self {
        self.rate_limits = true;
        self
    }

    /// Extra command-line arguments after `ferry serve`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Registers `key` as the admin key (`FERRY_BOOTSTRAP_API_KEY`) instead of [`API_KEY`].
    pub fn bootstrap_key(mut self, key: &str) -> Self {
        self.bootstrap_key = Some(key.to_owned());
        self
    }

    /// Starts without `FERRY_BOOTSTRAP_API_KEY`: an empty database makes the server print a key.
    pub fn without_bootstrap_key(mut self) -> Self {
        self.bootstrap_key = None;
        self
    }

    /// Does not pass `--listen`/`--admin-listen`; the test supplies addresses another way.
    pub fn without_listen_flags(mut self) -> Self {
        self.listen_flags = false;
        self
    }

    /// Passes `--database-url URL` (the server uses Postgres for a `postgres://` URL).
    pub fn database_url(self, url: &str) -> Self {
        self.arg("--database-url").arg(url)
    }

    /// Runs on the per-test Postgres database `db` (which must outlive the server).
    pub fn postgres(self, db: &pg::TestDatabase) -> Self {
        self.database_url(&db.url)
    }

    /// Writes `toml` to a file in the server's temp dir and passes it as `--config`.
    pub fn config_file(self, toml: &str) -> Self {
        let path = self.root.path().join("ferry.toml");
        std::fs::write(&path, toml).expect("write config file");
        let path = path.to_str().expect("utf-8 temp path").to_owned();
        self.arg("--config").arg(&path)
    }

    fn command(&self, data_dir: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.arg("serve").arg("--data-dir").arg(data_dir);
        if self.listen_flags {
            cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        }
        cmd.args(&self.args);
        // The developer's own FERRY_* settings must not leak into the test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FERRY_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("FERRY_LOG", "info").env("NO_COLOR", "1");
        if let Some(key) = &self.bootstrap_key {
            cmd.env("FERRY_BOOTSTRAP_API_KEY", key);
        }
        if !self.rate_limits {
            for limit in [
                "APPENDS",
                "CONNECTS_PER_IP",
                "AUTH_FAILURES_PER_IP",
                "EPHEMERAL",
            ] {
                cmd.env(format!("FERRY_RATE__{limit}"), "0");
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the binary expecting it to refuse to start: it must exit (bounded wait) without a
    /// ready line. Returns the exit status, stdout and stderr.
    pub fn start_expecting_failure(&self) -> (ExitStatus, String, String) {
        let mut child = self
            .command(&self.root.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry binary");
        let deadline = Instant::now() + READY_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferry was expected to refuse to start but kept running");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        assert!(
            !stdout.contains("ferry ready"),
            "ferry printed its ready line although it should refuse to start: {stdout}"
        );
        (status, stdout, stderr)
    }

    pub fn start(self) -> TestServer {
        let mut server = TestServer {
            builder: self,
            child: None,
            stdout: None,
            listen: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
            node: String::new(),
            key: None,
            preamble: Vec::new(),
            starts: 0,
            http: reqwest::Client::new(),
        };
        server.key = server.builder.bootstrap_key.clone();
        server.spawn();
        server
    }
}

/// A running (or stopped, awaiting `restart`) `ferry serve` process.
pub struct TestServer {
    builder: ServerBuilder,
    child: Option<Child>,
    /// Lines the binary prints on stdout after the ready line (drained by a thread).
    stdout: Option<Receiver<String>>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub node: String,
    /// The admin key requests carry: the bootstrap key, or the one the server generated.
    pub key: Option<String>,
    /// Stdout lines printed before `ferry ready` by the most recent start.
    pub preamble: Vec<String>,
    /// How many times the binary was started on this data dir.
    pub starts: usize,
    http: reqwest::Client,
}

impl TestServer {
    /// A builder with the bootstrap key set and port-0 listeners.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            root: tempfile::Builder::new()
                .prefix("ferry-it-")
                .tempdir()
                .expect("create temp dir"),
            env: Vec::new(),
            args: Vec::new(),
            bootstrap_key: Some(API_KEY.to_owned()),
            listen_flags: true,
            rate_limits: false,
        }
    }

    /// Starts a server with the defaults (bootstrap key, port 0, fresh data dir).
    pub fn start() -> TestServer {
        TestServer::builder().start()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.builder.root.path().join("data")
    }

    fn stderr_path(&self) -> PathBuf {
        self.builder.root.path().join("stderr.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "spawn while a child is running");
        self.starts += 1;
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open stderr log");
        {
            use std::io::Write;
            let mut s = &stderr;
            let _ = writeln!(s, "===== start #{} =====", self.starts);
        }
        let mut cmd = self.builder.command(&self.data_dir());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("spawn ferry binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.child = Some(child);
        self.preamble.clear();

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("ferry ready ") => {
                    self.parse_ready(&line);
                    break;
                }
                Ok(line) => self.preamble.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    self.kill_quietly();
                    panic!(
                        "ferry did not print its ready line within {READY_TIMEOUT:?}; stdout so far: \
                         {:?} (stderr below)",
                        self.preamble
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(EXIT_TIMEOUT);
                    panic!(
                        "ferry exited ({status}) before printing its ready line; stdout: {:?} \
                         (stderr below)",
                        self.preamble
                    );
                }
            }
        }
        self.stdout = Some(rx);
        if let Some(line) = self
            .preamble
            .iter()
            .find(|l| l.starts_with("ferry admin-key "))
        {
            self.key = Some(line["ferry admin-key ".len()..].trim().to_owned());
        }
        self.http = self.build_client();
    }

    fn parse_ready(&mut self, line: &str) {
        let fields: BTreeMap<&str, &str> = line["ferry ready ".len()..]
            .split_whitespace()
            .map(|kv| {
                kv.split_once('=')
                    .unwrap_or_else(|| panic!("ready line field {kv:?} is not key=value: {line:?}"))
            })
            .collect();
        let keys: Vec<&str> = fields.keys().copied().collect();
        assert_eq!(
            keys,
            ["admin", "listen", "node"],
            "ready line has unexpected fields: {line:?}"
        );
        self.listen = fields["listen"]
            .parse()
            .unwrap_or_else(|e| panic!("bad listen address in {line:?}: {e}"));
        self.admin = fields["admin"]
            .parse()
            .unwrap_or_else(|e| panic!("bad admin address in {line:?}: {e}"));
        self.node = fields["node"].to_owned();
    }

    fn build_client(&self) -> reqwest::Client {
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.key {
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {key}")).expect("header value"),
            );
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build http client")
    }

    /// A client that sends no credentials.
    pub fn anonymous_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build http client")
    }

    /// A client carrying `Authorization: Bearer <key>` for the server's admin key.
    pub fn client(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// `http://<public listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// `http://<admin listener><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Whether the process was started and has not been seen to exit (a paused one runs).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM, ...) to the running process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) of ferry failed");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// Stdout lines printed since the ready line (non-blocking).
    pub fn stdout_since_ready(&self) -> Vec<String> {
        self.stdout
            .as_ref()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }

    /// SIGKILL, then reap the process. Returns its exit status (killed by signal 9).
    pub fn kill9(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("server is not running");
        child.kill().expect("SIGKILL ferry");
        let status = child.wait().expect("reap ferry");
        self.child = None;
        status
    }

    /// SIGTERM, then wait (bounded) for the process to exit on its own.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// Polls until the child exits or `timeout` passes (then kills it and fails the test).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("server is not running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                self.kill_quietly();
                panic!("ferry did not exit within {timeout:?} (stderr below)");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets an environment variable for every later start (`restart`, `start_expecting_failure`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.builder.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the binary on the same data dir expecting it to refuse; the server must be stopped.
    pub fn start_expecting_failure(&self) -> (ExitStatus, String, String) {
        assert!(
            self.child.is_none(),
            "stop the server first (kill9 or terminate)"
        );
        self.builder.start_expecting_failure()
    }

    /// Starts the binary again on the same data dir, config and key. The server must be stopped.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs the server stopped first (kill9 or terminate)"
        );
        self.spawn();
    }

    fn kill_quietly(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Everything the server wrote to stderr, all starts.
    pub fn stderr_all(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// The last 16 KiB of the server's stderr (all starts), for failure messages.
    pub fn stderr_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.stderr_path()) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
            let _ = f.read_to_string(&mut text);
        }
        format!(
            "----- ferry stderr ({}) -----\n{text}\n----- end stderr -----",
            self.stderr_path().display()
        )
    }

    pub fn root(&self) -> &Path {
        self.builder.root.path()
    }

    // ----- HTTP helpers -----

    /// `PUT /v1/conversations/{id}` with `participants`; asserts 201 or 200.
    pub async fn create_conversation(&self, id: &str, participants: &[&str]) -> Value {
        let resp = self
            .client()
            .put(self.url(&format!("/v1/conversations/{id}")))
            .json(&json!({ "participants": participants }))
            .send()
            .await
            .expect("PUT conversation");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("PUT conversation body");
        assert!(
            status == 201 || status == 200,
            "PUT conversation {id}: {status} {body}"
        );
        body
    }

    /// `POST .../messages` with `body`; returns (status, JSON body).
    pub async fn post_message(&self, conversation: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client()
            .post(self.url(&format!("/v1/conversations/{conversation}/messages")))
            .json(body)
            .send()
            .await
            .expect("POST message");
        let status = resp.status().as_u16();
        let body = resp.json().await.expect("POST message: JSON body");
        (status, body)
    }

    /// Appends `content` from `sender`; asserts 201 and returns the ack.
    pub async fn append(&self, conversation: &str, sender: &str, content: Value) -> Ack {
        let (status, body) = self
            .post_message(
                conversation,
                &json!({ "sender": sender, "content": content }),
            )
            .await;
        assert_eq!(status, 201, "append to {conversation}: {body}");
        Ack::from_json(&body)
    }

    /// `GET path` with the admin key; must answer 200 with a JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self
            .client()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: JSON body: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// `GET .../messages?<query>`; asserts 200 and returns the page.
    pub async fn page(&self, conversation: &str, query: &str) -> Page {
        let resp = self
            .client()
            .get(self.url(&format!(
                "/v1/conversations/{conversation}/messages?{query}"
            )))
            .send()
            .await
            .expect("GET messages");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("GET messages: JSON body");
        assert_eq!(status, 200, "GET {conversation} messages?{query}: {body}");
        Page::from_json(&body)
    }

    /// Every message of the conversation, walking `after_seq` pages of 1000.
    pub async fn read_all(&self, conversation: &str) -> (Vec<Value>, u64) {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .page(conversation, &format!("after_seq={after}&limit=1000"))
                .await;
            if let Some(last) = page.messages.last() {
                after = seq_of(last);
            }
            let empty = page.messages.is_empty();
            all.extend(page.messages);
            if !page.has_more {
                return (all, page.last_seq);
            }
            assert!(!empty, "empty page with has_more=true after_seq={after}");
        }
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        let resp = self
            .anonymous_client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200, "GET /metrics");
        resp.text().await.expect("metrics text")
    }

    /// Polls `/metrics` until nothing durable is waiting for the archive (so reads below the
    /// ring must come from SQL), failing after `timeout`.
    pub async fn wait_archived(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            let backlog = metric_sum(&text, "ferry_archive_backlog_records", &[]);
            if backlog == Some(0.0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "archive backlog still {backlog:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl TestServer {
    /// Polls `/metrics` until the sum of `name{labels}` reaches `at_least`; returns it.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        timeout: Duration,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = metric_sum(&self.metrics().await, name, labels).unwrap_or(0.0);
            if value >= at_least {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} is {value} after {timeout:?}, expected at least {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every file under `dir` (recursively) whose name ends with `suffix`, sorted.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.stderr_tail());
        }
        self.kill_quietly();
    }
}

/// An append acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub conversation_id: String,
    pub seq: u64,
    pub id: String,
    pub created_at: String,
    pub deduped: bool,
}

impl Ack {
    pub fn from_json(body: &Value) -> Ack {
        let field = |name: &str| {
            body.get(name)
                .unwrap_or_else(|| panic!("ack has no {name}: {body}"))
        };
        Ack {
            conversation_id: field("conversation_id")
                .as_str()
                .expect("conversation_id string")
                .to_owned(),
            seq: field("seq").as_u64().expect("seq u64"),
            id: field("id").as_str().expect("id string").to_owned(),
            created_at: field("created_at")
                .as_str()
                .expect("created_at string")
                .to_owned(),
            deduped: field("deduped").as_bool().expect("deduped bool"),
        }
    }
}

/// One `GET .../messages` answer.
#[derive(Debug, Clone)]
pub struct Page {
    pub messages: Vec<Value>,
    pub last_seq: u64,
    pub has_more: bool,
    pub first_available_seq: u64,
    /// `gaps`: reserved seqs that hold nothing (after a failover), `(from_seq, to_seq)`.
    pub gaps: Vec<(u64, u64)>,
}

impl Page {
    pub fn from_json(body: &Value) -> Page {
        Page {
            messages: body["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("page has no messages array: {body}"))
                .clone(),
            last_seq: body["last_seq"].as_u64().expect("last_seq u64"),
            has_more: body["has_more"].as_bool().expect("has_more bool"),
            first_available_seq: body["first_available_seq"]
                .as_u64()
                .expect("first_available_seq u64"),
            gaps: body["gaps"]
                .as_array()
                .map(|gaps| {
                    gaps.iter()
                        .map(|g| {
                            (
                                g["from_seq"].as_u64().expect("gap from_seq"),
                                g["to_seq"].as_u64().expect("gap to_seq"),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.messages.iter().map(seq_of).collect()
    }
}

pub fn seq_of(message: &Value) -> u64 {
    message["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("message without seq: {message}"))
}

/// Asserts an error answer: `status`, JSON `{error: code, message: string}`.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.expect("error body");
    assert_ne!(got, 500, "{what}: server answered 500: {text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {got} {text:?}"));
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{what}: expected {status} {code}, got {got} {body}"
    );
    assert!(
        body["message"].is_string(),
        "{what}: error without message: {body}"
    );
    body
}

/// Sum of every sample of `name` (not `_bucket`/`_sum`/`_count` unless named) whose labels
/// include all of `labels`; `None` when the metric is absent.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if matches {
            let v: f64 = value.parse().unwrap_or(0.0);
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// An HS256 end-user token for `sub`, signed with `secret` (`FERRY_JWT_SECRET`), valid for an hour.
pub fn user_token(secret: &str, sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}
