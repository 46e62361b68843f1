//! A TCP proxy in front of a service one node depends on (its Postgres, its Redis), so a test
//! can cut that one node off while the others keep their connections.
//!
//! The proxy listens on `127.0.0.1:0` for its whole life (the node's URL never changes) and
//! forwards each accepted connection to the upstream with `copy_bidirectional`. [`TcpProxy::cut`]
//! drops every open connection and closes new ones as soon as they are accepted (the client sees
//! a connection that ends before any byte, as when a network path is gone and the peer resets);
//! [`TcpProxy::heal`] lets new connections through again. Connections dropped by a cut stay
//! dropped: the client has to reconnect, exactly as after a real network fault.
//!
//! The proxy runs on a runtime of its own (one thread), not on the test's: a test that blocks
//! its thread while a node starts (waiting for the ready line) must not starve the proxy the node
//! needs to reach Postgres. Dropping the proxy shuts that runtime down, which closes the listener
//! and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long the proxy tries to reach the upstream for one accepted connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy did, for assertions and failure messages.
#[derive(Debug, Default)]
struct Counters {
    /// Connections forwarded to the upstream.
    forwarded: AtomicU64,
    /// Connections closed on accept because the proxy was cut.
    refused: AtomicU64,
    /// Open connections dropped by a cut.
    dropped: AtomicU64,
}

pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// `true` while cut. Connection tasks watch it to drop themselves; the accept loop reads it.
    cut: watch::Sender<bool>,
    counters: Arc<Counters>,
    /// Runs the accept loop and every connection; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tcp-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let (cut, cut_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        runtime.spawn(accept_loop(listener, upstream, cut_rx, counters.clone()));
        TcpProxy {
            addr,
            upstream,
            cut,
            counters,
            runtime: Some(runtime),
        }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Drops every open connection and closes new ones on accept until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets new connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// `(forwarded, refused while cut, dropped by a cut)` so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.counters.forwarded.load(Ordering::Relaxed),
            self.counters.refused.load(Ordering::Relaxed),
            self.counters.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    cut: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let listener = TcpListener::from_std(listener).expect("register proxy listener");
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: the next accept may work.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if *cut.borrow() {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(inbound);
            continue;
        }
        tokio::spawn(forward(inbound, upstream, cut.clone(), counters.clone()));
    }
}

async fn forward(
    mut inbound: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let _ = inbound.set_nodelay(true);
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut outbound = match connect.await {
        Ok(Ok(stream)) => stream,
        // The upstream is down (e.g. Redis restarting): the client sees its connection end.
        _ => return,
    };
    let _ = outbound.set_nodelay(true);
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        // `wait_for` looks at the current value first, so a cut that raced this connection's
        // start still drops it.
        _ = cut.wait_for(|cut| *cut) => {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
