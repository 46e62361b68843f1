//! A cluster of real `ferry serve` processes for the integration tests, with the faults the
//! cluster must survive and the workloads and checker that prove it did.
//!
//! # What it starts
//! [`TestCluster::start`] creates one fresh Postgres database ([`TestDatabase`]) and one private
//! [`RedisServer`], then per node `nK` (K = 1..n): a [`TcpProxy`] in front of Postgres, a
//! [`TcpProxy`] in front of Redis, and one [`TestServer`] started as
//! `ferry serve --node-id nK --database-url <pg via its proxy> --redis-url <redis via its proxy>
//! --cluster-secret S`, with its own data dir, port-0 listeners, the shared bootstrap admin key
//! and the `[cluster]` settings of [`BASE_ENV`] (a test adds or overrides keys with `extra_env`).
//! Nodes are numbered from 1 everywhere (`node(1)` is `n1`).
//!
//! # Faults
//! `kill9`, `terminate` (SIGTERM, waits for the exit status), `restart` (same data dir, same node
//! id, new ports), `pause`/`resume` (SIGSTOP/SIGCONT), `cut_postgres`/`heal_postgres` and
//! `cut_redis`/`heal_redis` (that node's proxy), `stop_redis`/`start_redis` (the shared server, on
//! the same port).
//!
//! # Workloads and the checker
//! [`workload::Writers`] (HTTP and WebSocket writers through every node), [`subscribers::Subscribers`]
//! (one socket per conversation, joined through a node that does not own it) and
//! [`check::check`]. They find nodes through the cluster's [`NodeBook`], which follows restarts.
//!
//! # Clean-up
//! Everything is owned and released on drop, also when a test panics: the nodes are killed
//! first (a paused one too: SIGKILL works on a stopped process), then the proxies, Redis, and
//! finally the database is dropped. Workload tasks are aborted when their handle drops. Blocking
//! steps (starting a node, waiting for its exit) run in `block_in_place`, so tests must use
//! `#[tokio::test(flavor = "multi_thread")]`.
//!
//! # One cluster at a time
//! A cluster holds a process-wide lock for its whole life, so the tests of one binary run their
//! clusters one after the other: two 3-node clusters on a 2-core machine would turn lease
//! timing (a 1.5 s lease in the fencing tests) into a coin toss.
//!
//! # No sleeps
//! Nothing here sleeps for a fixed time hoping a condition holds afterwards: every wait is
//! [`wait_for`], which polls a condition against a deadline and panics with what it waited for
//! and the last state it observed. (Writers pace their sends and honour `retry_after_ms`; that
//! is load shaping, not waiting.)

pub mod check;
pub mod phx;
pub mod proxy;
pub mod redis;
pub mod subscribers;
pub mod workload;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitStatus;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde::Deserialize;
use serde_json::{json, Value};

use self::check::CheckSummary;
use self::proxy::TcpProxy;
use self::redis::RedisServer;
use self::subscribers::Subscribers;
use self::workload::WriteLog;
use super::pg::{self, TestDatabase};
use super::{TestServer, API_KEY};

/// `--cluster-secret` of every node.
pub const SECRET: &str = "it-cluster-secret-5d21";
/// `slots.count` of every node: small, so drains and rebalances finish quickly.
pub const SLOT_COUNT: u32 = 64;
/// Default `cluster.heartbeat` and `cluster.lease` of the harness (tests may override both).
pub const HEARTBEAT: Duration = Duration::from_millis(300);
pub const LEASE: Duration = Duration::from_secs(3);

/// Settings every node gets before the test's `extra_env` (which wins on the same key).
pub const BASE_ENV: &[(&str, &str)] = &[
    ("FERRY_SLOTS__COUNT", "64"),
    ("FERRY_CLUSTER__HEARTBEAT", "300ms"),
    ("FERRY_CLUSTER__LEASE", "3s"),
    ("FERRY_CLUSTER__MAX_MOVES", "64"),
    ("FERRY_CLUSTER__DRAIN_TIMEOUT", "30s"),
];

/// How often [`wait_for`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bound on every admin request of the harness (a paused node never answers).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A SIGTERM drains first: allow `drain_timeout` plus recovery.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(45);
/// Default bound for waiting on the cluster's state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(45);

/// `Authorization: Bearer <the bootstrap admin key>`.
pub fn auth_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {API_KEY}")).expect("header value"),
    );
    headers
}

/// Runs a blocking step (start a node, wait for an exit) without stalling the runtime's other
/// tasks (the workloads).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Polls `probe` every 50 ms until it returns `Ok`, for at most `timeout`; then panics with
/// `what` and the last `Err` (the observed state). A probe that hangs is bounded by its own
/// request timeouts.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut polls = 0u64;
    loop {
        polls += 1;
        match probe().await {
            Ok(value) => return value,
            Err(state) => {
                if Instant::now() >= deadline {
                    panic!(
                        "timed out after {timeout:?} ({polls} polls) waiting for: {what}\n\
                         last observed: {state}"
                    );
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Completes once `stop` reads `true` (or its sender is gone). Holds no borrow of the value,
/// so it can sit in a `select!` whose other branches await.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A conversation the test created: its id and its slot (from the PUT answer).
#[derive(Debug, Clone)]
pub struct Conversation {
    pub id: String,
    pub slot: u32,
}

pub fn ids(conversations: &[Conversation]) -> Vec<String> {
    conversations.iter().map(|c| c.id.clone()).collect()
}

/// The public and admin addresses of a node's current process.
#[derive(Debug, Clone, Copy)]
pub struct NodeAddrs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// Where each node (1-based) can be reached right now: `None` while it is down. Shared with
/// the workload tasks, so they follow a node that restarts on new ports.
#[derive(Debug, Clone, Default)]
pub struct NodeBook {
    nodes: Arc<RwLock<Vec<Option<NodeAddrs>>>>,
}

impl NodeBook {
    pub fn empty() -> NodeBook {
        NodeBook::default()
    }

    /// A book of the given running servers (n1, n2, … in that order).
    pub fn of(servers: &[&TestServer]) -> NodeBook {
        let book = NodeBook::default();
        for server in servers {
            book.nodes.write().expect("node book").push(Some(NodeAddrs {
                listen: server.listen,
                admin: server.admin,
            }));
        }
        book
    }

    pub fn len(&self) -> usize {
        self.nodes.read().expect("node book").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, node: usize) -> Option<NodeAddrs> {
        self.nodes.read().expect("node book")[node - 1]
    }

    pub fn listen(&self, node: usize) -> Option<SocketAddr> {
        self.get(node).map(|a| a.listen)
    }

    /// Node `node` runs at `server`'s current addresses.
    pub fn up(&self, node: usize, server: &TestServer) {
        self.nodes.write().expect("node book")[node - 1] = Some(NodeAddrs {
            listen: server.listen,
            admin: server.admin,
        });
    }

    /// Node `node` is not running.
    pub fn down(&self, node: usize) {
        self.nodes.write().expect("node book")[node - 1] = None;
    }
}

/// One node in `GET /admin/cluster`.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    pub state: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub advertise_url: Option<String>,
    #[serde(default)]
    pub last_heartbeat: Option<String>,
    /// Slots it owns.
    #[serde(default)]
    pub slots: usize,
}

/// `GET /admin/cluster`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterView {
    pub mode: String,
    pub node: String,
    pub slot_count: u32,
    #[serde(default)]
    pub unassigned_slots: usize,
    #[serde(default)]
    pub moving_slots: usize,
    #[serde(default)]
    pub unavailable_slots: usize,
    pub nodes: Vec<NodeEntry>,
}

impl ClusterView {
    pub fn node(&self, id: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn state_of(&self, id: &str) -> Option<&str> {
        self.node(id).map(|n| n.state.as_str())
    }

    /// `n1=active/21 n2=draining/3 …` for failure messages.
    pub fn brief(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}={}/{}", n.id, n.state, n.slots))
            .collect();
        format!(
            "mode {} (asked {}): {} unassigned, {} moving, {} unavailable; nodes {}",
            self.mode,
            self.node,
            self.unassigned_slots,
            self.moving_slots,
            self.unavailable_slots,
            nodes.join(" ")
        )
    }
}

/// One slot in `GET /admin/slots`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SlotEntry {
    pub slot: u32,
    pub owner: Option<String>,
    pub epoch: u64,
    pub state: String,
    #[serde(default)]
    pub target: Option<String>,
}

/// `GET /admin/slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap(pub Vec<SlotEntry>);

impl SlotMap {
    pub fn owner_of(&self, slot: u32) -> Option<&str> {
        self.0
            .iter()
            .find(|s| s.slot == slot)
            .and_then(|s| s.owner.as_deref())
    }

    pub fn owned_by(&self, node_id: &str) -> Vec<u32> {
        self.0
            .iter()
            .filter(|s| s.owner.as_deref() == Some(node_id))
            .map(|s| s.slot)
            .collect()
    }

    pub fn in_state(&self, state: &str) -> Vec<u32> {
        self.0
            .iter()
            .filter(|s| s.state == state)
            .map(|s| s.slot)
            .collect()
    }

    pub fn epochs(&self) -> BTreeMap<u32, u64> {
        self.0.iter().map(|s| (s.slot, s.epoch)).collect()
    }

    /// Slots per owner (`-` for none) and per state, for failure messages.
    pub fn brief(&self) -> String {
        let mut owners: BTreeMap<&str, usize> = BTreeMap::new();
        let mut states: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &self.0 {
            *owners.entry(s.owner.as_deref().unwrap_or("-")).or_default() += 1;
            *states.entry(s.state.as_str()).or_default() += 1;
        }
        format!(
            "{} slots; owners {owners:?}; states {states:?}",
            self.0.len()
        )
    }
}

/// `(status, JSON body or Null)` of a response.
async fn status_and_json(resp: reqwest::Response) -> Result<(u16, Value), String> {
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

pub struct TestCluster {
    /// Declared first so they are killed before what they depend on goes away.
    nodes: Vec<TestServer>,
    paused: Vec<bool>,
    pg_proxies: Vec<TcpProxy>,
    redis_proxies: Vec<TcpProxy>,
    redis: RedisServer,
    pub db: TestDatabase,
    book: NodeBook,
    /// Admin-key client with [`ADMIN_TIMEOUT`].
    http: reqwest::Client,
    /// Held for the cluster's life (see "One cluster at a time"); declared last, so it is
    /// released only after everything above is gone.
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

/// See "One cluster at a time" in the module docs.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl TestCluster {
    /// Starts `n` nodes (see the module docs). `None` when Postgres or Redis is missing and the
    /// test may skip.
    pub async fn start(n: usize, extra_env: &[(&str, &str)]) -> Option<TestCluster> {
        assert!(n >= 1, "a cluster needs a node");
        let one_at_a_time = ONE_CLUSTER.lock().await;
        let db = TestDatabase::create().await?;
        let redis = blocking(RedisServer::create)?;
        let admin_url = std::env::var(pg::URL_VAR).expect("TestDatabase::create checked it");
        let pg_upstream = postgres_addr(&admin_url);
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            paused: vec![false; n],
            pg_proxies: Vec::new(),
            redis_proxies: Vec::new(),
            redis,
            db,
            book: NodeBook::default(),
            http: reqwest::Client::builder()
                .default_headers(auth_headers())
                .timeout(ADMIN_TIMEOUT)
                .build()
                .expect("admin client"),
            _one_at_a_time: one_at_a_time,
        };
        for i in 1..=n {
            let pg_proxy = TcpProxy::start(pg_upstream);
            let redis_proxy = TcpProxy::start(cluster.redis.addr());
            let mut builder = TestServer::builder()
                .arg("--node-id")
                .arg(&format!("n{i}"))
                .database_url(&with_authority(&cluster.db.url, pg_proxy.addr()))
                .arg("--redis-url")
                .arg(&format!("redis://{}", redis_proxy.addr()))
                .arg("--cluster-secret")
                .arg(SECRET);
            for (key, value) in BASE_ENV.iter().chain(extra_env) {
                builder = builder.env(key, value);
            }
            cluster.pg_proxies.push(pg_proxy);
            cluster.redis_proxies.push(redis_proxy);
            let server = blocking(|| builder.start());
            assert_eq!(server.node, format!("n{i}"), "ready line names the node");
            cluster.nodes.push(server);
        }
        let servers: Vec<&TestServer> = cluster.nodes.iter().collect();
        cluster.book = NodeBook::of(&servers);
        Some(cluster)
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &TestServer {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "no node {i} (nodes are 1..={})",
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    fn node_mut(&mut self, i: usize) -> &mut TestServer {
        self.node(i);
        &mut self.nodes[i - 1]
    }

    pub fn id(i: usize) -> String {
        format!("n{i}")
    }

    /// `n3` → 3.
    pub fn index_of(id: &str) -> Option<usize> {
        id.strip_prefix('n')?.parse().ok()
    }

    /// The shared address book the workloads use.
    pub fn book(&self) -> NodeBook {
        self.book.clone()
    }

    /// Nodes whose process runs and is not paused (they answer requests).
    pub fn up(&self) -> Vec<usize> {
        (1..=self.len())
            .filter(|&i| self.node(i).is_running() && !self.paused[i - 1])
            .collect()
    }

    /// `(label, server)` of every node that is up, for [`check::check`].
    pub fn servers(&self) -> Vec<(String, &TestServer)> {
        self.up()
            .into_iter()
            .map(|i| (TestCluster::id(i), self.node(i)))
            .collect()
    }

    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    // ----- faults -----

    /// SIGKILL node `i` and reap it.
    pub fn kill9(&mut self, i: usize) -> ExitStatus {
        self.book.down(i);
        self.paused[i - 1] = false;
        self.node_mut(i).kill9()
    }

    /// SIGTERM node `i` and wait (bounded) for it to drain and exit; returns the exit status.
    pub fn terminate(&mut self, i: usize) -> ExitStatus {
        assert!(!self.paused[i - 1], "resume n{i} before terminating it");
        let server = self.node_mut(i);
        server.signal(libc::SIGTERM);
        let status = blocking(|| server.wait_exit(TERMINATE_TIMEOUT));
        self.book.down(i);
        status
    }

    /// Starts node `i` again on its data dir with the same id and settings (new ports).
    pub fn restart(&mut self, i: usize) {
        let server = self.node_mut(i);
        blocking(|| server.restart());
        assert_eq!(
            server.node,
            TestCluster::id(i),
            "restarted under its own id"
        );
        let server = &self.nodes[i - 1];
        self.book.up(i, server);
    }

    /// SIGSTOP node `i`: it holds its sockets and locks but does nothing.
    pub fn pause(&mut self, i: usize) {
        self.node(i).signal(libc::SIGSTOP);
        self.paused[i - 1] = true;
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.node(i).signal(libc::SIGCONT);
        self.paused[i - 1] = false;
    }

    /// Drops node `i`'s Postgres connections and refuses new ones.
    pub fn cut_postgres(&self, i: usize) {
        self.pg_proxies[i - 1].cut();
    }

    pub fn heal_postgres(&self, i: usize) {
        self.pg_proxies[i - 1].heal();
    }

    /// Drops node `i`'s Redis connections and refuses new ones.
    pub fn cut_redis(&self, i: usize) {
        self.redis_proxies[i - 1].cut();
    }

    pub fn heal_redis(&self, i: usize) {
        self.redis_proxies[i - 1].heal();
    }

    /// `(forwarded, refused while cut, dropped by a cut)` of node `i`'s Postgres proxy.
    pub fn postgres_proxy_counts(&self, i: usize) -> (u64, u64, u64) {
        self.pg_proxies[i - 1].counts()
    }

    /// `(forwarded, refused while cut, dropped by a cut)` of node `i`'s Redis proxy.
    pub fn redis_proxy_counts(&self, i: usize) -> (u64, u64, u64) {
        self.redis_proxies[i - 1].counts()
    }

    /// Kills the shared Redis (every node loses its connections and what was in flight).
    pub fn stop_redis(&mut self) {
        self.redis.stop();
    }

    /// Starts a fresh Redis on the same port.
    pub fn start_redis(&mut self) {
        let redis = &mut self.redis;
        blocking(|| redis.start());
    }

    // ----- admin API -----

    /// `GET <admin of node i><path>` → JSON (any non-200 is an `Err` with the body).
    pub async fn admin_get(&self, i: usize, path: &str) -> Result<Value, String> {
        let addrs = self.book.get(i).ok_or_else(|| format!("n{i} is down"))?;
        let resp = self
            .http
            .get(format!("http://{}{path}", addrs.admin))
            .send()
            .await
            .map_err(|e| format!("GET n{i} {path}: {e}"))?;
        match status_and_json(resp).await? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("GET n{i} {path}: {status} {body}")),
        }
    }

    /// `POST <admin of node i><path>` → `(status, JSON body)`.
    pub async fn admin_post(&self, i: usize, path: &str) -> Result<(u16, Value), String> {
        let addrs = self.book.get(i).ok_or_else(|| format!("n{i} is down"))?;
        let resp = self
            .http
            .post(format!("http://{}{path}", addrs.admin))
            .send()
            .await
            .map_err(|e| format!("POST n{i} {path}: {e}"))?;
        status_and_json(resp).await
    }

    /// `POST /admin/nodes/{node}/drain` through node `via`; asserts 200.
    pub async fn drain(&self, via: usize, node: usize) -> Value {
        let path = format!("/admin/nodes/n{node}/drain");
        let (status, body) = self
            .admin_post(via, &path)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "POST {path} via n{via}: {body}");
        body
    }

    /// `POST /admin/rebalance` through node `via`; asserts 200 and returns the planned moves.
    pub async fn rebalance(&self, via: usize) -> Vec<Value> {
        let (status, body) = self
            .admin_post(via, "/admin/rebalance")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "POST /admin/rebalance via n{via}: {body}");
        body["moves"]
            .as_array()
            .unwrap_or_else(|| panic!("rebalance answer without moves: {body}"))
            .clone()
    }

    pub async fn try_cluster_view(&self, i: usize) -> Result<ClusterView, String> {
        let body = self.admin_get(i, "/admin/cluster").await?;
        serde_json::from_value(body.clone())
            .map_err(|e| format!("/admin/cluster of n{i} does not parse ({e}): {body}"))
    }

    /// `GET /admin/cluster` through node `i`.
    pub async fn cluster_view(&self, i: usize) -> ClusterView {
        self.try_cluster_view(i)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn try_slots(&self, i: usize) -> Result<SlotMap, String> {
        let body = self.admin_get(i, "/admin/slots").await?;
        let slots = serde_json::from_value(body["slots"].clone())
            .map_err(|e| format!("/admin/slots of n{i} does not parse ({e}): {body}"))?;
        Ok(SlotMap(slots))
    }

    /// `GET /admin/slots` through node `i`.
    pub async fn slots(&self, i: usize) -> SlotMap {
        self.try_slots(i).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Status of node `i`'s public `/readyz`.
    pub async fn readyz(&self, i: usize) -> u16 {
        let addrs = self.book.get(i).unwrap_or_else(|| panic!("n{i} is down"));
        self.http
            .get(format!("http://{}/readyz", addrs.listen))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /readyz of n{i}: {e}"))
            .status()
            .as_u16()
    }

    /// Some node that is up, for questions any node can answer.
    fn observer(&self) -> usize {
        *self.up().first().expect("no node is up")
    }

    // ----- waiting for the cluster -----

    /// Every node that is up is `active` and owns a slot, no slot is moving, unavailable or
    /// unassigned, every node that is up reports the same slot map, and the rebalancer plans no
    /// further move (`POST /admin/rebalance` answers no moves: the placement matches the ring).
    /// Returns the slot map.
    ///
    /// The rebalancer carries out its moves a few at a time, so "no slot moving" alone also
    /// holds between two of them. Asking `/admin/rebalance` wakes the rebalancer, which does
    /// nothing it would not do at its next tick; a test that must show the cluster acts on its
    /// own waits with [`wait_spread`](Self::wait_spread) first.
    pub async fn wait_balanced(&self) -> SlotMap {
        let up = self.up();
        self.wait_balanced_over(&up).await
    }

    /// [`wait_balanced`](Self::wait_balanced) where exactly `nodes` are the active owners.
    pub async fn wait_balanced_over(&self, nodes: &[usize]) -> SlotMap {
        self.wait_placement(nodes, true).await
    }

    /// Like [`wait_balanced`](Self::wait_balanced) but without asking the rebalancer anything:
    /// every node that is up is `active` and owns at least one slot, none is moving, unavailable
    /// or unassigned, and the nodes agree.
    pub async fn wait_spread(&self) -> SlotMap {
        let up = self.up();
        self.wait_placement(&up, false).await
    }

    async fn wait_placement(&self, nodes: &[usize], settled: bool) -> SlotMap {
        let expected: Vec<String> = nodes.iter().map(|&i| TestCluster::id(i)).collect();
        let what = if settled {
            format!("the cluster balanced over {expected:?}")
        } else {
            format!("every one of {expected:?} to own slots")
        };
        let cluster = self;
        wait_for(&what, STATE_TIMEOUT, || {
            let expected = expected.clone();
            async move { cluster.placement(&expected, settled).await }
        })
        .await
    }

    async fn placement(&self, expected: &[String], settled: bool) -> Result<SlotMap, String> {
        let observers = self.up();
        let view = self.try_cluster_view(observers[0]).await?;
        let slots = self.try_slots(observers[0]).await?;
        let problem = |why: String| Err(format!("{why}\n  {}\n  {}", view.brief(), slots.brief()));
        if view.mode != "cluster" {
            return problem(format!("mode is {:?}", view.mode));
        }
        if slots.0.len() != view.slot_count as usize {
            return problem(format!("{} slots listed", slots.0.len()));
        }
        for id in expected {
            match view.state_of(id) {
                Some("active") => {}
                other => return problem(format!("{id} is {other:?}, not active")),
            }
            if slots.owned_by(id).is_empty() {
                return problem(format!("{id} owns no slot"));
            }
        }
        for s in &slots.0 {
            let owner_ok = s.owner.as_ref().is_some_and(|o| expected.contains(o));
            if s.state != "active" || !owner_ok {
                return problem(format!(
                    "slot {} is {:?} owned by {:?}",
                    s.slot, s.state, s.owner
                ));
            }
        }
        for &i in &observers[1..] {
            let other = self.try_slots(i).await?;
            if other != slots {
                return problem(format!(
                    "n{} and n{i} disagree: {} vs {}",
                    observers[0],
                    slots.brief(),
                    other.brief()
                ));
            }
        }
        if settled {
            let (status, body) = self.admin_post(observers[0], "/admin/rebalance").await?;
            let planned = body["moves"].as_array().map(Vec::len);
            if status != 200 || planned != Some(0) {
                return problem(format!("the rebalancer still plans moves: {status} {body}"));
            }
        }
        Ok(slots)
    }

    /// Waits until node `observer` reports node `node` in `state`.
    pub async fn wait_node_state(&self, observer: usize, node: usize, state: &str) -> ClusterView {
        let id = TestCluster::id(node);
        let what = format!("n{observer} to report {id} {state}");
        let cluster = self;
        wait_for(&what, STATE_TIMEOUT, || {
            let id = id.clone();
            async move {
                let view = cluster.try_cluster_view(observer).await?;
                if view.state_of(&id) == Some(state) {
                    Ok(view)
                } else {
                    Err(view.brief())
                }
            }
        })
        .await
    }

    // ----- data -----

    /// Creates `n` conversations (`{prefix}-{k}`, participants alice and bob) through the
    /// nodes in turn, retrying `try_again` (bounded). Returns them with their slots.
    pub async fn create_conversations(&self, prefix: &str, n: usize) -> Vec<Conversation> {
        let up = self.up();
        let mut out = Vec::new();
        for k in 0..n {
            let id = format!("{prefix}-{k:02}");
            let via = up[k % up.len()];
            let cluster = self;
            let body = wait_for(&format!("PUT {id} via n{via}"), STATE_TIMEOUT, || {
                let id = id.clone();
                async move {
                    let addrs = cluster.book.get(via).ok_or("node down")?;
                    let resp = cluster
                        .http
                        .put(format!("http://{}/v1/conversations/{id}", addrs.listen))
                        .json(&json!({ "participants": ["alice", "bob"] }))
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    match status_and_json(resp).await? {
                        (200 | 201, body) => Ok(body),
                        (429 | 503, body) => Err(format!("try again: {body}")),
                        (status, body) => panic!("PUT {id} via n{via}: {status} {body}"),
                    }
                }
            })
            .await;
            let slot = body["slot"]
                .as_u64()
                .unwrap_or_else(|| panic!("PUT answer without slot: {body}"));
            out.push(Conversation {
                id,
                slot: slot as u32,
            });
        }
        out
    }

    /// Creates conversations until every node that is up owns the slots of at least
    /// `per_node` of them (bounded); returns all it created.
    pub async fn create_spread_conversations(
        &self,
        prefix: &str,
        at_least: usize,
        per_node: usize,
    ) -> Vec<Conversation> {
        let slots = self.slots(self.observer()).await;
        let mut conversations = self.create_conversations(prefix, at_least).await;
        for _ in 0..200 {
            let short = self.up().into_iter().any(|i| {
                let id = TestCluster::id(i);
                conversations
                    .iter()
                    .filter(|c| slots.owner_of(c.slot) == Some(id.as_str()))
                    .count()
                    < per_node
            });
            if !short {
                return conversations;
            }
            let more = self
                .create_conversations(&format!("{prefix}-x{}", conversations.len()), 1)
                .await;
            conversations.extend(more);
        }
        panic!(
            "200 extra conversations did not give every node {per_node}: {}",
            slots.brief()
        );
    }

    /// The conversations whose slot `slots` gives to node `i`.
    pub fn conversations_of(
        slots: &SlotMap,
        i: usize,
        conversations: &[Conversation],
    ) -> Vec<Conversation> {
        let id = TestCluster::id(i);
        conversations
            .iter()
            .filter(|c| slots.owner_of(c.slot) == Some(id.as_str()))
            .cloned()
            .collect()
    }

    /// For each conversation, a node that is up and does not own its slot (rotating among
    /// them), or its owner when no other node is up.
    pub async fn subscriber_targets(&self, conversations: &[Conversation]) -> Vec<(String, usize)> {
        let slots = self.slots(self.observer()).await;
        let up = self.up();
        conversations
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let owner = slots.owner_of(c.slot).and_then(TestCluster::index_of);
                let others: Vec<usize> = up.iter().copied().filter(|&i| Some(i) != owner).collect();
                let node = if others.is_empty() {
                    up[k % up.len()]
                } else {
                    others[k % others.len()]
                };
                (c.id.clone(), node)
            })
            .collect()
    }

    /// One append through node `i` with idempotency key `key`, retrying `try_again` and
    /// connection errors with the same key (bounded). Returns the ack body.
    pub async fn append(&self, i: usize, conversation: &str, key: &str, content: &Value) -> Value {
        let cluster = self;
        let what = &format!("append {key} to {conversation} via n{i}");
        wait_for(what, STATE_TIMEOUT, || async move {
            let (status, body) = cluster.try_append(i, conversation, key, content).await?;
            match status {
                201 => Ok(body),
                429 | 503 => Err(format!("{status} {body}")),
                _ => panic!("{what}: {status} {body}"),
            }
        })
        .await
    }

    /// One attempt: `(status, body)`, or `Err` when the request itself failed.
    pub async fn try_append(
        &self,
        i: usize,
        conversation: &str,
        key: &str,
        content: &Value,
    ) -> Result<(u16, Value), String> {
        let addrs = self.book.get(i).ok_or_else(|| format!("n{i} is down"))?;
        let resp = self
            .http
            .post(format!(
                "http://{}/v1/conversations/{conversation}/messages",
                addrs.listen
            ))
            .json(&json!({
                "sender": "probe",
                "content": content,
                "metadata": { "key": key },
                "idempotency_key": key,
            }))
            .send()
            .await
            .map_err(|e| format!("POST via n{i}: {e}"))?;
        status_and_json(resp).await
    }

    /// [`check::check`] through every node that is up.
    pub async fn check(
        &self,
        conversations: &[Conversation],
        log: &WriteLog,
        subscribers: &Subscribers,
    ) -> Result<CheckSummary, String> {
        check::check(&self.servers(), &ids(conversations), log, subscribers).await
    }

    /// [`check::check_allowing_gaps`] through every node that is up: after a failover with
    /// reserved seqs.
    pub async fn check_allowing_gaps(
        &self,
        conversations: &[Conversation],
        log: &WriteLog,
        subscribers: &Subscribers,
    ) -> Result<CheckSummary, String> {
        check::check_allowing_gaps(&self.servers(), &ids(conversations), log, subscribers).await
    }
}

/// `host:port` of the Postgres server in `url` (default port 5432), resolved.
pub fn postgres_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve {host_port} from {url}: {e}"))
        .find(SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("no IPv4 address for {host_port}"))
}

/// `url` with its `host:port` replaced by `addr` (user, database and query kept).
pub fn with_authority(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("database url has a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}
