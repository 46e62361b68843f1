//! Postgres for the integration tests.
//!
//! - [`TestDatabase`]: a fresh database (`ferry_test_<random>`) on the server named by
//!   `FERRY_TEST_DATABASE_URL` (ops/test.sh starts one and exports it), dropped when the test ends.
//! - [`PrivateCluster`]: a throwaway Postgres cluster of this test alone (`initdb` in a temp dir,
//!   its own port), which a test may stop and start again without touching anyone else's.
//!
//! Without `FERRY_TEST_DATABASE_URL` the Postgres tests skip with a note, so a bare `cargo test`
//! still works; ops/test.sh also sets `FERRY_REQUIRE_POSTGRES=1`, which turns a skip into a
//! failure so CI cannot pass without having run them.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tempfile::TempDir;

/// The server the per-test databases are created on (a URL whose user may `CREATE DATABASE`).
pub const URL_VAR: &str = "FERRY_TEST_DATABASE_URL";
/// `1`: a missing Postgres fails the test instead of skipping it.
pub const REQUIRE_VAR: &str = "FERRY_REQUIRE_POSTGRES";

fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(!required(), "{why}, and {REQUIRE_VAR}=1 forbids skipping");
    eprintln!("skipping a Postgres test: {why} (ops/test.sh provides Postgres)");
}

/// `url` with its database (the path) replaced by `database`; query parameters are kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("database url has a scheme");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}{query}")
}

/// A database of one test, dropped (with any connections still open) when this is dropped.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    /// What the server gets as `--database-url`.
    pub url: String,
}

impl TestDatabase {
    /// `None` (the test should return) when no Postgres is configured and skipping is allowed.
    pub async fn create() -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var(URL_VAR) else {
            skip(&format!("{URL_VAR} is not set"));
            return None;
        };
        let name = format!("ferry_test_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR} ({admin_url}): {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&admin_url, &name);
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }

    /// A small pool on this database, for assertions on what the server stored.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with its own
        // small runtime can.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin_url).await?;
                conn.execute(sql.as_str()).await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A Postgres cluster owned by one test: `initdb` into a temp dir, served on a free port of
/// 127.0.0.1 with trust auth. `stop` kills it the hard way (`pg_ctl stop -m immediate`, like a
/// crash: open connections break mid-statement); `start` brings it back on the same port.
pub struct PrivateCluster {
    /// Holds the data directory, the socket and the server log; removed on drop.
    root: TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Running as root: Postgres refuses that, so its commands run as the `postgres` user.
    as_postgres_user: bool,
}

impl PrivateCluster {
    /// `None` (the test should return) when the Postgres server binaries are not installed and
    /// skipping is allowed.
    pub fn create() -> Option<PrivateCluster> {
        let Some(bin) = server_bin_dir() else {
            skip("no Postgres server binaries under /usr/lib/postgresql/*/bin");
            return None;
        };
        // SAFETY: geteuid has no preconditions.
        let as_postgres_user = unsafe { libc::geteuid() } == 0;
        let root = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .expect("temp dir for the private cluster");
        if as_postgres_user {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(root.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let port = super::free_port();
        let cluster = PrivateCluster {
            root,
            bin,
            port,
            as_postgres_user,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.start();
        Some(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            path_str(self.root.path())
        );
        let data = self.data_dir();
        let log = self.root.path().join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Kills the server immediately (no checkpoint, connections cut), as a crash would.
    pub fn stop(&self) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("postgres.log")).unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .args(["-D", path_str(&data), "-m", "immediate", "stop"])
            .output();
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` and `pg_ctl`.
fn server_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(out.status.success(), "no postgres user on this machine");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}
