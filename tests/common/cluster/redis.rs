//! A private `redis-server` for one test: its own temp dir and a free port of 127.0.0.1, no
//! persistence (`--save "" --appendonly no`), killed on drop.
//!
//! [`RedisServer::stop`] kills it (SIGKILL: every subscriber connection breaks and every
//! publication in flight is lost, as in a crash); [`RedisServer::start`] brings a fresh, empty
//! server back on the same port, so the nodes' URLs stay valid and they only have to reconnect.
//!
//! Without `redis-server` installed the cluster tests skip with a note, unless
//! `FERRY_REQUIRE_PEERS` is set (ops/test.sh sets it), which turns the skip into a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// `ops/test.sh` sets this when it has installed the peer servers (Redis among them).
pub const REQUIRE_VAR: &str = "FERRY_REQUIRE_PEERS";
/// How long a started server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RedisServer {
    /// Working dir (`--dir`) and `redis.log`; removed on drop.
    root: TempDir,
    pub port: u16,
    child: Option<Child>,
    /// How many times a server was started on this port.
    pub starts: usize,
}

impl RedisServer {
    /// `None` (the test should return) when `redis-server` is not installed and skipping is
    /// allowed.
    pub fn create() -> Option<RedisServer> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os(REQUIRE_VAR).is_none(),
                "redis-server is required ({REQUIRE_VAR} is set) but not installed"
            );
            eprintln!("redis-server not installed: skipping a cluster test");
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("ferry-redis-")
            .tempdir()
            .expect("temp dir for redis");
        let port = super::super::free_port();
        let mut server = RedisServer {
            root,
            port,
            child: None,
            starts: 0,
        };
        server.start();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server on this port and waits (bounded) until it answers `PING`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("redis.log"))
            .expect("open redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait redis"))
            {
                self.child = None;
                panic!(
                    "redis-server exited ({status}) before answering on port {}:\n{}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING on port {} within {START_TIMEOUT:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and reaps it; its data is gone (no persistence).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("redis-server is not running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The server's output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a Redis server on `port` answers `PING` with `+PONG` (short timeouts).
pub fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
