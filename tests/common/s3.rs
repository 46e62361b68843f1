//! S3-compatible object storage for the integration tests: a private `s3s-fs` server per test (its
//! own temp dir and port), which the test may stop and start again.
//!
//! The binary comes from `FERRY_TEST_S3S_FS`, else `s3s-fs` on `PATH` or in `~/.cargo/bin`
//! (ops/test.sh installs it: `cargo install --locked s3s-fs@0.14.1 --features binary`). Without
//! it the S3 tests skip with a note, unless `FERRY_REQUIRE_S3=1` (set by ops/test.sh).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ServerBuilder;

pub const BIN_VAR: &str = "FERRY_TEST_S3S_FS";
pub const REQUIRE_VAR: &str = "FERRY_REQUIRE_S3";
pub const BUCKET: &str = "ferry-test";
const ACCESS_KEY: &str = "ferry-test-access";
const SECRET_KEY: &str = "ferry-test-secret";

fn binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var(BIN_VAR) {
        return Some(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}

pub struct S3Server {
    /// `data/<bucket>/…` holds the objects; `stderr.log` the server's output.
    root: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
}

impl S3Server {
    /// `None` (the test should return) when no `s3s-fs` is installed and skipping is allowed.
    pub fn start() -> Option<S3Server> {
        let Some(bin) = binary() else {
            let required = std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "no s3s-fs binary, and {REQUIRE_VAR}=1 forbids skipping"
            );
            eprintln!("skipping an S3 test: no s3s-fs binary (ops/test.sh installs it)");
            return None;
        };
        let root = tempfile::Builder::new()
            .prefix("ferry-s3-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(root.path().join("data").join(BUCKET)).expect("bucket dir");
        let port = super::free_port();
        let mut server = S3Server {
            root,
            bin,
            child: None,
            port,
        };
        server.restart();
        Some(server)
    }

    /// Starts the server (again, on the same port and data) and waits until it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("stderr.log"))
            .expect("s3s-fs log");
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {} within 20s: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (connections refused from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `s3://<bucket>` for `--object-store`.
    pub fn url(&self) -> String {
        format!("s3://{BUCKET}")
    }

    /// Points a ferry server at this store: `--object-store` and the AWS environment.
    pub fn configure(&self, builder: ServerBuilder) -> ServerBuilder {
        builder
            .arg("--object-store")
            .arg(&self.url())
            .env(
                "AWS_ENDPOINT_URL",
                &format!("http://127.0.0.1:{}", self.port),
            )
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
    }

    /// Segment objects (`*.seg`) in the bucket.
    pub fn segment_objects(&self) -> Vec<PathBuf> {
        super::files_with_suffix(&self.root.path().join("data").join(BUCKET), ".seg")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
