//! The `ferry serve` command line as operators meet it: the generated admin key, configuration
//! precedence (flag > env > file > default) and refusal of bad configuration.

mod common;

use std::net::IpAddr;
use std::path::Path;

use serde_json::json;

use common::{expect_error, TestServer};

fn ip(addr: &str) -> IpAddr {
    addr.parse().expect("ip")
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// `--redis-url` (here through its variable) is accepted; the node says it runs alone, without
/// logging the URL's password, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_url_without_postgres_or_secret_is_refused_with_what_is_missing() {
    let server = TestServer::builder()
        .env("FERRY_REDIS_URL", "redis://ops:hunter2@127.0.0.1:1/0")
        .start_expecting_failure();
    let (status, _stdout, stderr) = server;
    assert!(
        !status.success(),
        "a half-configured cluster member must not start"
    );
    assert!(
        stderr.contains("Postgres") && stderr.contains("--cluster-secret"),
        "the message names both missing settings: {stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password is not printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_key_is_printed_once_and_works() {
    let mut server = TestServer::builder().without_bootstrap_key().start();
    assert_eq!(
        server.preamble.len(),
        1,
        "exactly one line before the ready line: {:?}",
        server.preamble
    );
    let line = &server.preamble[0];
    let key = line
        .strip_prefix("ferry admin-key ")
        .unwrap_or_else(|| panic!("first stdout line should be `ferry admin-key KEY`: {line:?}"))
        .to_owned();
    assert!(
        key.len() >= 16 && !key.contains(char::is_whitespace),
        "key looks wrong: {key:?}"
    );
    assert_eq!(server.key.as_deref(), Some(key.as_str()));

    // The key works; another does not.
    let created = server.create_conversation("keyed", &["a"]).await;
    assert_eq!(created["id"], "keyed");
    let resp = server
        .anonymous_client()
        .get(server.url("/v1/conversations/keyed"))
        .bearer_auth(format!("{key}x"))
        .send()
        .await
        .expect("wrong key");
    expect_error(resp, 401, "unauthorized", "a different key").await;

    // Shown once: not in the logs, not in the data dir.
    assert!(
        !server.stderr_all().contains(&key),
        "the generated key must not be logged"
    );

    // A restart (clean, then a crash) prints no new key and the old one keeps working.
    assert!(server.terminate().success());
    server.restart();
    assert!(
        server.preamble.is_empty(),
        "a restart must not print a key: {:?}",
        server.preamble
    );
    server.append("keyed", "a", json!("after restart")).await;
    server.kill9();
    server.restart();
    assert!(server.preamble.is_empty(), "{:?}", server.preamble);
    assert!(server.stdout_since_ready().is_empty());
    let ack = server.append("keyed", "a", json!("after crash")).await;
    assert_eq!(ack.seq, 2);

    assert!(server.terminate().success());
    let mut files = Vec::new();
    files_under(&server.data_dir(), &mut files);
    assert!(!files.is_empty(), "the data dir holds the database");
    for file in files {
        let bytes = std::fs::read(&file).expect("read data file");
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key is stored in plain text in {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_follow_flag_env_file_default_precedence() {
    // Env only (no flags): FERRY_LISTEN / FERRY_ADMIN_LISTEN / FERRY_NODE_ID are used, and a
    // section key (FERRY_LIMITS__MAX_MESSAGE_BYTES) reaches the server too.
    let server = TestServer::builder()
        .without_listen_flags()
        .env("FERRY_LISTEN", "127.0.0.2:0")
        .env("FERRY_ADMIN_LISTEN", "127.0.0.2:0")
        .env("FERRY_NODE_ID", "env-node")
        .env("FERRY_LIMITS__MAX_MESSAGE_BYTES", "1024")
        .start();
    assert_eq!(server.listen.ip(), ip("127.0.0.2"), "FERRY_LISTEN");
    assert_eq!(server.admin.ip(), ip("127.0.0.2"), "FERRY_ADMIN_LISTEN");
    assert_eq!(server.node, "env-node", "FERRY_NODE_ID");
    server.create_conversation("small", &["a"]).await;
    server.append("small", "a", json!("x".repeat(500))).await;
    let (status, body) = server
        .post_message(
            "small",
            &json!({"sender": "a", "content": "x".repeat(2000)}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("too_large")),
        "FERRY_LIMITS__MAX_MESSAGE_BYTES=1024 must reject 2000 bytes: {body}"
    );
    drop(server);

    // Flags beat env.
    let server = TestServer::builder()
        .without_listen_flags()
        .env("FERRY_LISTEN", "127.0.0.2:0")
        .env("FERRY_ADMIN_LISTEN", "127.0.0.2:0")
        .env("FERRY_NODE_ID", "env-node")
        .arg("--listen")
        .arg("127.0.0.3:0")
        .arg("--admin-listen")
        .arg("127.0.0.3:0")
        .arg("--node-id")
        .arg("flag-node")
        .start();
    assert_eq!(
        server.listen.ip(),
        ip("127.0.0.3"),
        "--listen beats FERRY_LISTEN"
    );
    assert_eq!(
        server.admin.ip(),
        ip("127.0.0.3"),
        "--admin-listen beats env"
    );
    assert_eq!(server.node, "flag-node", "--node-id beats FERRY_NODE_ID");
    let resp = server
        .client()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(resp.status().as_u16(), 200);
    drop(server);

    // Env beats the config file, which beats the default.
    let server = TestServer::builder()
        .without_listen_flags()
        .config_file(
            "listen = \"127.0.0.4:0\"\nadmin_listen = \"127.0.0.4:0\"\nnode_id = \"file-node\"\n",
        )
        .env("FERRY_ADMIN_LISTEN", "127.0.0.2:0")
        .start();
    assert_eq!(
        server.listen.ip(),
        ip("127.0.0.4"),
        "file listen beats the default"
    );
    assert_eq!(server.admin.ip(), ip("127.0.0.2"), "env beats file");
    assert_eq!(server.node, "file-node");
}

#[test]
fn bad_configuration_is_refused_at_start() {
    for (key, value, what) in [
        ("FERRY_WAL__FSYNC", "sometimes", "bad fsync policy"),
        (
            "FERRY_WAL__FSYNK",
            "always",
            "unknown key in a known section",
        ),
        (
            "FERRY_ARCHIVE__SQL_RETENTION",
            "7",
            "duration without a unit",
        ),
        (
            "FERRY_LISTEN",
            "not-an-address",
            "unparseable listen address",
        ),
    ] {
        let (status, _stdout, stderr) = TestServer::builder()
            .without_listen_flags()
            .env("FERRY_LISTEN", "127.0.0.1:0")
            .env("FERRY_ADMIN_LISTEN", "127.0.0.1:0")
            .env(key, value)
            .start_expecting_failure();
        assert!(
            !status.success() && status.code().is_some(),
            "{what} ({key}={value}): expected a clean non-zero exit, got {status}\n{stderr}"
        );
        assert!(
            stderr.contains("ferry:"),
            "{what}: the reason should be printed on stderr: {stderr}"
        );
    }
}

/// The server's log once it holds the `ferry ready` line.
async fn logged_ready(server: &TestServer) -> String {
    common::cluster::wait_for(
        "the ready line in the log",
        std::time::Duration::from_secs(10),
        || async {
            let log = server.stderr_all();
            if log.contains("ferry ready") {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .await
}

/// Logs piped to a file (as in a container) carry no ANSI escape codes, even with NO_COLOR unset,
/// so the `ferry ready listen=… admin=… node=…` line parses; `log_format = "json"` carries the
/// same fields as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_are_plain_and_json_logs_carry_the_same_fields() {
    let server = TestServer::builder()
        .env("NO_COLOR", "")
        .arg("--node-id")
        .arg("plain-node")
        .start();
    // The ready line is logged just after it is printed on stdout, which `start` waits for.
    let log = logged_ready(&server).await;
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a piped log: {log}"
    );
    let ready = log
        .lines()
        .find(|l| l.contains("ferry ready"))
        .unwrap_or_else(|| panic!("no ready line in {log}"));
    assert!(
        ready.contains(&format!("listen={}", server.listen))
            && ready.contains(&format!("admin={}", server.admin))
            && ready.contains("node=plain-node"),
        "{ready}"
    );
    drop(server);

    let server = TestServer::builder()
        .env("NO_COLOR", "")
        .env("FERRY_LOG_FORMAT", "json")
        .arg("--node-id")
        .arg("json-node")
        .start();
    let log = logged_ready(&server).await;
    let ready: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "ferry ready")
        .unwrap_or_else(|| panic!("no JSON ready line in {log}"));
    let fields = &ready["fields"];
    assert_eq!(fields["listen"], server.listen.to_string(), "{ready}");
    assert_eq!(fields["admin"], server.admin.to_string(), "{ready}");
    assert_eq!(fields["node"], "json-node", "{ready}");
    assert_eq!(ready["level"], "INFO", "{ready}");
}
