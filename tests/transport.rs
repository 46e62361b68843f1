//! Connection limits on the listeners (PROTOCOL.md "Limits"): slow-header and idle connections
//! are closed after `limits.header_timeout` and `limits.http_idle_timeout` while a normal client
//! is still served; past `limits.max_connections` new connections are closed at once and
//! counted; a WebSocket outlives the HTTP idle timeout.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::TestServer;

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn server(max_connections: usize) -> TestServer {
    TestServer::builder()
        .env("FERRY_LIMITS__HEADER_TIMEOUT", "1s")
        .env("FERRY_LIMITS__HTTP_IDLE_TIMEOUT", "3s")
        .env(
            "FERRY_LIMITS__MAX_CONNECTIONS",
            &max_connections.to_string(),
        )
        .start()
}

/// Reads until the peer closes; `Err` with what arrived if `within` passes first.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Err(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

/// True if the peer has not closed `stream` (nothing to read, no EOF) right now.
async fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf))
        .await
        .is_err()
}

async fn connect_many(server: &TestServer, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(server.listen).await.expect("connect"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed_while_a_normal_client_is_served() {
    let server = server(10_000);
    // 2,000 connections that send half a request head, and 2,000 that finished a request and
    // keep the connection open, idle.
    let mut partial = connect_many(&server, 2_000).await;
    for s in &mut partial {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("partial head");
    }
    let started = Instant::now();
    let mut idle = connect_many(&server, 2_000).await;
    for s in &mut idle {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
    }
    for s in &mut idle {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("response");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    // A normal client is served at once.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let resp = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("a normal client is served within a second");
    assert_eq!(resp.status().as_u16(), 200);

    // The partial heads are closed once the header timeout has run, not before.
    let waited = started.elapsed();
    if waited < HEADER_TIMEOUT / 2 {
        assert!(
            still_open(&mut partial[0]).await,
            "closed before header_timeout"
        );
    }
    for (i, s) in partial.iter_mut().enumerate() {
        if let Err(got) = closed_within(s, HEADER_TIMEOUT + Duration::from_secs(5)).await {
            panic!(
                "partial head #{i} still open after {:?}: {got:?}",
                started.elapsed()
            );
        }
    }
    // The idle keep-alive connections outlive the header timeout and close after the idle one.
    assert!(
        started.elapsed() < IDLE_TIMEOUT,
        "the test ran too slowly to tell the two timeouts apart"
    );
    assert!(
        still_open(&mut idle[0]).await,
        "an idle connection closed at header_timeout"
    );
    for (i, s) in idle.iter_mut().enumerate() {
        if let Err(got) = closed_within(s, IDLE_TIMEOUT + Duration::from_secs(5)).await {
            panic!(
                "idle connection #{i} still open after {:?}: {got:?}",
                started.elapsed()
            );
        }
    }
    assert!(started.elapsed() >= IDLE_TIMEOUT);
    // The normal client's pooled connection goes idle too, a little later than the others.
    drop(client);
    let s = &server;
    common::cluster::wait_for(
        "every connection to be closed",
        IDLE_TIMEOUT * 2,
        || async move {
            let metrics = s.metrics().await;
            let open = common::metric_sum(
                &metrics,
                "ferry_connections_open",
                &[("listener", "public")],
            );
            match open {
                Some(0.0) => Ok(()),
                other => Err(format!("{other:?} open")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_are_closed_and_the_open_ones_served() {
    let server = server(20);
    let mut held = connect_many(&server, 20).await;
    // Each held connection is accepted and served.
    for s in held.iter_mut().take(1) {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let mut extra = connect_many(&server, 5).await;
    for (i, s) in extra.iter_mut().enumerate() {
        closed_within(s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|got| panic!("connection #{} over the limit served: {got:?}", 20 + i));
    }
    let metrics = server.metrics().await;
    assert_eq!(
        common::metric_sum(
            &metrics,
            "ferry_connections_refused_total",
            &[("listener", "public")]
        ),
        Some(5.0)
    );
    // A held one is still served; closing some makes room again.
    held[1]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = held[1].read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    held.truncate(10);
    let client = reqwest::Client::new();
    common::cluster::wait_for(
        "room for a new connection",
        Duration::from_secs(5),
        || async {
            match client.get(server.url("/healthz")).send().await {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_outlives_the_http_idle_timeout() {
    let server = server(10_000);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/socket/websocket?vsn=2.0.0&token={}",
        server.listen,
        common::API_KEY
    ))
    .await
    .expect("websocket");
    tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(1)).await;
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"[null,"1","phoenix","heartbeat",{}]"#.into(),
    ))
    .await
    .expect("send a heartbeat past the HTTP idle timeout");
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a reply")
        .expect("open")
        .expect("frame");
    assert!(reply.to_string().contains("\"ok\""), "{reply}");
}

/// `limits.write_timeout`: a WebSocket and an SSE stream whose clients stopped reading are
/// closed once the server could write nothing to them for that long (the client resumes from
/// its cursor); a reader that keeps up is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_closed_after_the_write_timeout() {
    let server = TestServer::builder()
        .env("FERRY_LIMITS__WRITE_TIMEOUT", "2s")
        .env(
            "FERRY_LOG",
            "info,ferry::http::transport=debug,ferry::ws=debug,ferry::http=debug",
        )
        .start();
    server.create_conversation("flood", &["alice"]).await;
    let open = || async {
        let metrics = server.metrics().await;
        common::metric_sum(
            &metrics,
            "ferry_connections_open",
            &[("listener", "public")],
        )
        .unwrap_or(0.0)
    };

    // A WebSocket joined to the conversation, and an SSE stream of it, over sockets with small
    // receive buffers; neither is read again after the join.
    let small_socket = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(server.listen).await.expect("connect")
    };
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!(
            "ws://{}/socket/websocket?vsn=2.0.0&token={}",
            server.listen,
            common::API_KEY
        ),
        small_socket().await,
    )
    .await
    .expect("websocket");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"["1","1","conversation:flood","phx_join",{}]"#.into(),
    ))
    .await
    .unwrap();
    let joined = ws.next().await.expect("join reply").expect("frame");
    assert!(joined.to_string().contains("\"ok\""), "{joined}");
    let mut sse = small_socket().await;
    sse.write_all(
        format!(
            "GET /v1/conversations/flood/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            common::API_KEY
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // A reader that keeps up, for contrast.
    // (A client without the test clients' 20 s request timeout: this stream outlives it.)
    let mut follower = reqwest::Client::new()
        .get(server.url("/v1/conversations/flood/stream"))
        .header("accept", "text/event-stream")
        .bearer_auth(common::API_KEY)
        .send()
        .await
        .expect("sse");
    let reading = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok(Some(chunk)) = follower.chunk().await {
            n += chunk.len();
        }
        n
    });

    // ~8 MB of messages: far more than the two sockets' buffers hold.
    let text = "z".repeat(60_000);
    for i in 0..140 {
        server
            .append("flood", "alice", json!({ "i": i, "text": text }))
            .await;
    }
    let started = Instant::now();
    let stalled_at = open().await;
    let open_ref = &open;
    common::cluster::wait_for(
        "two connections to be closed by the server",
        Duration::from_secs(20),
        || async move {
            let now = open_ref().await;
            if now <= stalled_at - 2.0 {
                Ok(())
            } else {
                Err(format!("{now} open, {stalled_at} when the appends ended"))
            }
        },
    )
    .await;
    eprintln!(
        "stalled connections closed {:?} after the last append",
        started.elapsed()
    );
    // They were the two that stopped reading: each now drains what was in flight and ends.
    let drained = closed_within(&mut sse, Duration::from_secs(20))
        .await
        .unwrap_or_else(|_| panic!("the stalled SSE stream was not closed"));
    assert!(
        drained.len() < 8_000_000,
        "the SSE stream got everything: it was never stalled"
    );
    let ws_end = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ws_end.is_ok(), "the stalled WebSocket was not closed");
    assert!(!reading.is_finished(), "the reader that kept up was closed");
    reading.abort();
}
