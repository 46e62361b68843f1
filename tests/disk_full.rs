//! The disk-full drill: the real binary on a data dir that is a tiny tmpfs of its own. The disk
//! fills while appends keep coming; the node must answer `try_again` (`disk_full`) instead of
//! acknowledging what it cannot store, lose nothing it acknowledged, never poison its WAL for a
//! lack of space, and take appends again on its own once space returns — without a restart.
//!
//! Needs root (to mount). Where mounting is not allowed the test fails, unless
//! `FERRY_SKIP_MOUNT_TESTS=1` says to skip it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{metric_sum, seq_of, TestServer, API_KEY};

const SKIP_VAR: &str = "FERRY_SKIP_MOUNT_TESTS";
const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs mounted for one test, unmounted (lazily, so an open file cannot keep it) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `None` (the test returns) when mounting is not allowed and `FERRY_SKIP_MOUNT_TESTS=1`.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("create mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        let failure = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failure {
            assert!(
                std::env::var(SKIP_VAR).is_ok_and(|v| v == "1"),
                "cannot mount a tmpfs for the disk-full drill ({why}); run as root, or set \
                 {SKIP_VAR}=1 to skip it"
            );
            eprintln!("skipping the disk-full drill: {why}");
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes zeros to `path` until the filesystem refuses: afterwards nothing else fits.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Smaller writes take the last partial chunk too.
    let byte = [0u8; 512];
    while let Ok(n) = f.write(&byte) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

fn append_body(i: usize) -> Value {
    json!({
        "sender": "alice",
        "content": {"i": i, "pad": "x".repeat(16 * 1024)},
        "idempotency_key": format!("drill-{i}"),
    })
}

async fn disk_full_gauge(server: &TestServer) -> f64 {
    metric_sum(&server.metrics().await, "ferry_wal_disk_full", &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_appends_loses_nothing_and_recovers_without_a_restart() {
    let builder = TestServer::builder().env("FERRY_WAL__SEGMENT_BYTES", &(1u64 << 20).to_string());
    let Some(_mount) = Tmpfs::mount(&builder.data_dir(), "12m") else {
        return;
    };
    let mut server = builder.start();
    server.create_conversation("drill", &["alice"]).await;
    let url = server.url("/v1/conversations/drill/messages");
    // Its own client: a held append may wait longer than the harness' request timeout.
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let resp = http
                .post(&url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .expect("POST message");
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let body: Value = resp.json().await.expect("JSON body");
            (status, retry_after, body)
        }
    };

    let mut acked: Vec<(usize, u64)> = Vec::new();
    for i in 0..5 {
        let (status, _, body) = post(append_body(i)).await;
        assert_eq!(status, 201, "{body}");
        acked.push((i, seq_of(&body)));
    }
    let filler = server.data_dir().join("filler");
    let filled = fill(&filler);
    assert!(filled > 0, "the filler took no space");

    // Appends go on into the preallocated segment(s) until a new segment is needed: that one
    // waits for space, and the node says so.
    let mut held = None;
    let mut i = acked.len();
    let deadline = Instant::now() + WAIT;
    while held.is_none() {
        assert!(
            Instant::now() < deadline,
            "the disk never counted as full; {} appends acknowledged",
            acked.len()
        );
        let task = tokio::spawn(post(append_body(i)));
        loop {
            if task.is_finished() {
                let (status, _, body) = task.await.expect("append task");
                assert_eq!(status, 201, "append {i} before the disk was full: {body}");
                acked.push((i, seq_of(&body)));
                break;
            }
            if disk_full_gauge(&server).await == 1.0 {
                held = Some((i, task));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "append {i} neither answered nor held"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i += 1;
    }
    let (held_i, held_task) = held.expect("held");

    // While full: new appends get 503 try_again disk_full with a retry hint; nothing poisons.
    for j in 0..3 {
        let (status, retry_after, body) = post(append_body(i + j)).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "try_again", "{body}");
        assert_eq!(body["detail"], "disk_full", "{body}");
        assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
        assert!(retry_after.is_some(), "no Retry-After header: {body}");
        let text = body.to_string();
        assert!(
            !text.contains("No space") && !text.contains("/data"),
            "internal detail sent: {text}"
        );
    }
    let metrics = server.metrics().await;
    assert_eq!(metric_sum(&metrics, "ferry_wal_poisoned", &[]), Some(0.0));
    assert!(metric_sum(&metrics, "ferry_wal_disk_full_total", &[]).unwrap_or(0.0) >= 1.0);
    assert!(
        metric_sum(
            &metrics,
            "ferry_try_again_total",
            &[("reason", "disk_full")]
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    assert!(
        server.stderr_all().contains("wal disk full"),
        "the node did not log the full disk:\n{}",
        server.stderr_tail()
    );
    assert!(
        !held_task.is_finished(),
        "the held append was answered while the disk was full"
    );

    // Space returns: the held append completes, the node takes appends again by itself.
    std::fs::remove_file(&filler).expect("remove filler");
    let (status, _, body) = held_task.await.expect("held append");
    assert_eq!(status, 201, "the held append after space returned: {body}");
    acked.push((held_i, seq_of(&body)));
    let deadline = Instant::now() + WAIT;
    while disk_full_gauge(&server).await != 0.0 {
        assert!(Instant::now() < deadline, "ferry_wal_disk_full stays 1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in 0..5 {
        let (status, _, body) = post(append_body(i + 100 + k)).await;
        assert_eq!(status, 201, "append after space returned: {body}");
        acked.push((i + 100 + k, seq_of(&body)));
    }
    assert!(server.stderr_all().contains("wal has disk space again"));

    // Seqs are contiguous (nothing refused took one), and every acknowledged message survives
    // a kill -9.
    let seqs: Vec<u64> = acked.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    server.kill9();
    server.restart();
    let (messages, last_seq) = server.read_all("drill").await;
    assert_eq!(last_seq, seqs.len() as u64);
    for (i, seq) in &acked {
        let m = &messages[(*seq - 1) as usize];
        assert_eq!(seq_of(m), *seq);
        assert_eq!(m["content"]["i"], json!(i), "message at seq {seq}");
    }
    drop(server);
}
