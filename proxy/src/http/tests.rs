//! The HTTP path end to end with real sockets: hyper backends on loopback, the proxy's
//! `serve` on a port-0 listener, and raw or hyper clients. No master, no processes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Http, HttpConfig};
use crate::backends::{Backends, Policy};
use crate::forward::ForwardConfig;
use crate::server::{Connections, Proxy};

/// Longest any single step of a test may take.
const STEP: Duration = Duration::from_secs(10);

/// A hyper backend named `name`. Paths: `/` answers the name; `/headers` the request
/// headers, one per line; `/slow` answers after 400 ms; `/close` drops the connection
/// without answering; `/echo` returns the body; `/ws` upgrades and echoes bytes.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let hits = Arc::clone(&counted);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    hits.fetch_add(1, Ordering::Relaxed);
                    answer(name, req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Backend { addr, hits, task }
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let text = match req.uri().path() {
        "/headers" => req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
            .collect(),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(400)).await;
            name.to_owned()
        }
        "/close" => return Err(std::io::ErrorKind::ConnectionAborted.into()),
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?;
            return Ok(Response::new(Full::new(body.to_bytes())));
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            return Ok(r);
        }
        _ => name.to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// A running proxy; stopped (and its connections aborted) on drop.
struct Front {
    addr: SocketAddr,
    backends: Arc<Backends>,
    http: Arc<Http>,
    stop: CancellationToken,
    conns: Connections,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.abort.cancel();
    }
}

async fn front(policy: Policy, config: HttpConfig, addrs: &[SocketAddr]) -> Front {
    front_with(policy, config, addrs, None).await
}

async fn front_with(
    policy: Policy,
    config: HttpConfig,
    addrs: &[SocketAddr],
    tls: Option<Arc<crate::tls::Tls>>,
) -> Front {
    let backends = Arc::new(Backends::new(policy));
    for (i, a) in addrs.iter().enumerate() {
        backends.insert(i as u64 + 1, i, *a);
    }
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&backends),
        ForwardConfig::default(),
        1000,
    ));
    let http = Arc::new(Http::new(proxy, config, tls));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let conns = Connections::default();
    tokio::spawn(super::serve(
        listener,
        Arc::clone(&http),
        stop.clone(),
        conns.clone(),
    ));
    Front {
        addr,
        backends,
        http,
        stop,
        conns,
    }
}

/// One keep-alive HTTP/1.1 client connection.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

async fn client(addr: SocketAddr) -> Client {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    Client { send }
}

impl Client {
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &'static str,
    ) -> (StatusCode, hyper::HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "example.test")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let run = async {
            self.send.ready().await.unwrap();
            let resp = self.send.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            )
        };
        tokio::time::timeout(STEP, run)
            .await
            .expect("request timed out")
    }

    async fn get(&mut self, path: &str) -> (StatusCode, String) {
        let (s, _, b) = self.request("GET", path, "").await;
        (s, b)
    }
}

fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn sequential_requests_on_one_connection_reach_different_backends() {
    let (a, b) = (backend("a").await, backend("b").await);
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr, b.addr]).await;
    let mut c = client(f.addr).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, body) = c.get("/").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(body);
    }
    seen.sort();
    assert_eq!(seen, vec!["a", "a", "b", "b"]);
}

#[tokio::test]
async fn forwarded_headers_are_set_and_untrusted_ones_replaced() {
    let a = backend("a").await;
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr]).await;
    let mut c = client(f.addr).await;
    let req = Request::builder()
        .uri("/headers")
        .header("host", "example.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send.ready().await.unwrap();
    let resp = c.send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("host: example.test\n"), "{text}");
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    assert!(text.contains("x-forwarded-proto: http\n"), "{text}");
    assert!(text.contains("x-forwarded-host: example.test\n"), "{text}");
    assert!(
        text.contains("forwarded: for=127.0.0.1;host=example.test;proto=http\n"),
        "{text}"
    );
    assert!(!text.contains("6.6.6.6"), "{text}");
    assert!(!text.contains("x-private"), "{text}");
}

#[tokio::test]
async fn trusted_proxies_are_appended_to() {
    let a = backend("a").await;
    let config = HttpConfig {
        trusted_proxies: "127.0.0.0/8".parse().unwrap(),
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[a.addr]).await;
    let mut c = client(f.addr).await;
    let req = Request::builder()
        .uri("/headers")
        .header("host", "example.test")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send.ready().await.unwrap();
    let body = c
        .send
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_dead_backend_beside_a_live_one_fails_no_get() {
    let a = backend("a").await;
    let f = front(
        Policy::RoundRobin,
        HttpConfig::default(),
        &[closed_port(), a.addr],
    )
    .await;
    let mut c = client(f.addr).await;
    for _ in 0..6 {
        assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
    }
    // POST too: a refused connect sent nothing, so any method is retried.
    let (status, _, body) = c.request("POST", "/echo", "payload").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "payload"));
    let dead = f
        .backends
        .snapshot()
        .iter()
        .find(|b| b.key == 1)
        .cloned()
        .unwrap();
    assert!(dead.connect_failures() >= 1);
}

#[tokio::test]
async fn early_close_retries_idempotent_requests_only() {
    // Both backends close /close without answering: GET is tried on each, then 502.
    let (a, b) = (backend("a").await, backend("b").await);
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr, b.addr]).await;
    let mut c = client(f.addr).await;
    let (status, body) = c.get("/close").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed),
        2
    );
    assert!(f.http.stats.retries.load(Ordering::Relaxed) >= 1);
    // POST is not idempotent: one backend sees it, once.
    let before = a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed);
    let (status, _, _) = c.request("POST", "/close", "x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed),
        before + 1
    );
}

#[tokio::test]
async fn put_body_is_replayed_to_the_next_backend() {
    // The first backend takes the request and closes; the body must reach the second one.
    let dying = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dying_addr = dying.local_addr().unwrap();
    let _dying = tokio::spawn(async move {
        while let Ok((mut s, _)) = dying.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
        }
    });
    let a = backend("a").await;
    let f = front(
        Policy::RoundRobin,
        HttpConfig::default(),
        &[dying_addr, a.addr],
    )
    .await;
    let mut c = client(f.addr).await;
    for _ in 0..2 {
        let (status, _, body) = c.request("PUT", "/echo", "same bytes").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "same bytes"));
    }
}

#[tokio::test]
async fn no_backend_is_503_with_retry_after() {
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[]).await;
    let mut c = client(f.addr).await;
    let (status, headers, body) = c.request("GET", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert!(body.starts_with("503 Service Unavailable"), "{body}");
    // The connection stays usable once a backend is there.
    let a = backend("a").await;
    f.backends.insert(9, 0, a.addr);
    assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
}

#[tokio::test]
async fn slow_backend_is_504_after_the_request_timeout() {
    let a = backend("a").await;
    let config = HttpConfig {
        request_timeout: Duration::from_millis(100),
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[a.addr]).await;
    let mut c = client(f.addr).await;
    assert_eq!(c.get("/slow").await.0, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
}

#[tokio::test]
async fn least_conn_counts_requests_in_flight() {
    let (a, b) = (backend("a").await, backend("b").await);
    let f = front(Policy::LeastConn, HttpConfig::default(), &[a.addr, b.addr]).await;
    let mut slow = client(f.addr).await;
    let slow_req = tokio::spawn(async move { slow.get("/slow").await });
    // Wait until the slow request is in flight on one backend.
    let deadline = tokio::time::Instant::now() + STEP;
    let busy = loop {
        if let Some(b) = f.backends.snapshot().iter().find(|b| b.active() == 1) {
            break b.addr;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow request never in flight"
        );
        tokio::task::yield_now().await;
    };
    let idle_name = if busy == a.addr { "b" } else { "a" };
    let mut c = client(f.addr).await;
    for _ in 0..5 {
        assert_eq!(c.get("/").await.1, idle_name);
    }
    assert_eq!(slow_req.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn slowloris_gets_408_while_others_are_served() {
    let a = backend("a").await;
    let config = HttpConfig {
        header_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[a.addr]).await;
    let mut slow = TcpStream::connect(f.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Meanwhile a normal client is served at once.
    let mut c = client(f.addr).await;
    assert_eq!(c.get("/").await.1, "a");
    // Trickling bytes does not extend the deadline.
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"X-A: b\r\n").await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    tokio::time::timeout(STEP, slow.read_to_end(&mut got))
        .await
        .unwrap()
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(f.http.stats.header_timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn idle_keep_alive_clients_are_closed() {
    let a = backend("a").await;
    let config = HttpConfig {
        idle_timeout: Some(Duration::from_millis(200)),
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[a.addr]).await;
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // The response, then EOF when the idle timeout closes the connection; no 408.
    tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(!text.contains("408"), "{text}");
}

#[tokio::test]
async fn oversized_heads_are_431_and_bodies_413() {
    let a = backend("a").await;
    let config = HttpConfig {
        max_body: Some(4),
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[a.addr]).await;
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");

    let mut c = client(f.addr).await;
    let (status, _, _) = c.request("POST", "/echo", "too long").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        a.hits.load(Ordering::Relaxed),
        0,
        "refused from its Content-Length"
    );
    // Chunked (no Content-Length): caught while streaming.
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\ntoo long\r\n0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
}

#[tokio::test]
async fn upgrade_echoes_bytes_both_ways() {
    let a = backend("a").await;
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr]).await;
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(STEP, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"second message"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(STEP, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(f.http.stats.upgrades.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn graceful_stop_finishes_in_flight_with_connection_close() {
    let a = backend("a").await;
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr]).await;
    let mut idle = TcpStream::connect(f.addr).await.unwrap();
    let mut busy = TcpStream::connect(f.addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    while f.backends.snapshot()[0].active() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    f.stop.cancel();
    let mut got = Vec::new();
    tokio::time::timeout(STEP, busy.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with("\r\n\r\na"), "{text}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(STEP, idle.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the idle connection is closed without an answer");
    f.conns.tracker.close();
    tokio::time::timeout(STEP, f.conns.tracker.wait())
        .await
        .unwrap();
}

/// A connection accepted just before a stop (an upgrade's drain) whose request arrives
/// after it is answered, not closed unread: hyper takes a connection with nothing read for
/// idle, and closed then the client's request is lost (a reset or a broken pipe on a fresh
/// connection, which no client retries). One that stays silent is closed after
/// [`super::server::FIRST_REQUEST_WAIT`], so it cannot hold the drain.
#[tokio::test]
async fn a_stop_answers_the_first_request_of_a_connection_accepted_before_it() {
    let a = backend("a").await;
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr]).await;
    let mut late = TcpStream::connect(f.addr).await.unwrap();
    let mut silent = TcpStream::connect(f.addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    while f.conns.tracker.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never accepted");
        tokio::task::yield_now().await;
    }
    f.stop.cancel();
    // The client's first bytes come a moment after the stop: the connection's task (on
    // this runtime) has seen the stop long before, which is what used to close it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    late.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(STEP, late.read_to_end(&mut got))
        .await
        .unwrap()
        .expect("the request is answered, not reset");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with("\r\n\r\na"), "{text}");
    assert_eq!(a.hits.load(Ordering::Relaxed), 1);
    // The silent one is closed without an answer, and the drain ends.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(STEP, silent.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the silent connection is closed without an answer");
    f.conns.tracker.close();
    tokio::time::timeout(STEP, f.conns.tracker.wait())
        .await
        .unwrap();
}

#[tokio::test]
async fn empty_get_bodies_stay_empty() {
    let a = backend("a").await;
    let f = front(Policy::RoundRobin, HttpConfig::default(), &[a.addr]).await;
    let tcp = TcpStream::connect(f.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/headers")
        .header("host", "h")
        .body(Empty::new())
        .unwrap();
    let body = send
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("transfer-encoding"), "{text}");
}

#[tokio::test]
async fn https_serves_http2_and_http1_to_http1_backends() {
    use rustls::pki_types::{CertificateDer, ServerName};
    let dir = std::env::temp_dir().join(format!("balancer-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("c.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), ck.signing_key.serialize_pem()).unwrap();
    let root: CertificateDer<'static> = ck.cert.der().clone();
    let tls = crate::tls::Tls::load(
        &dir.join("c.pem"),
        &dir.join("k.pem"),
        crate::tls::Alpn::Http,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let a = backend("a").await;
    let f = front_with(
        Policy::RoundRobin,
        HttpConfig::default(),
        &[a.addr],
        Some(Arc::new(tls)),
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(f.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let io = TokioIo::new(stream);
        let text = if alpn == b"h2" {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get("https://localhost:8443/headers")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            resp.into_body().collect().await.unwrap().to_bytes()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::get("/headers")
                .header("host", "localhost:8443")
                .body(Empty::<Bytes>::new())
                .unwrap();
            send.send_request(req)
                .await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
        };
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("host: localhost:8443\n"), "{text}");
        assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    }
}

/// A remote backend whose address left DNS keeps no idle pooled connection once it is
/// out of rotation and its `--grace` is over (the cut): the pool's sweep closes them, where
/// they used to stay open until the pool's idle timeout (30 s by default). And the address
/// back in DNS (a new backend instance at the same address) gets connections of its own,
/// never one pooled for the retired instance.
#[tokio::test(start_paused = true)]
async fn a_retired_backends_pooled_connections_are_closed_and_not_reused() {
    use crate::Backend as Remote;
    // A backend that counts the connections it accepted and those that ended.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (a, e) = (Arc::clone(&accepted), Arc::clone(&ended));
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let e = Arc::clone(&e);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| answer("a", req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                e.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let _backend = AbortOnDrop(task);
    // The pool's idle timeout is far off: only the retirement can close the connection.
    let config = HttpConfig {
        pool_idle_timeout: Duration::from_secs(600),
        idle_timeout: None,
        ..HttpConfig::default()
    };
    let f = front(Policy::RoundRobin, config, &[]).await;
    let old = Arc::new(Remote::remote(1, 0, "app:80".into(), addr));
    f.backends.put(Arc::clone(&old));
    let mut c = client(f.addr).await;
    assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Retired as `upstream::remote::drain` does: out of rotation, grace over, cut, gone.
    f.backends.remove(old.key);
    old.close_connections();
    drop(old);
    // Back in DNS at once: a new instance, a new connection.
    f.backends
        .put(Arc::new(Remote::remote(2, 0, "app:80".into(), addr)));
    assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the retired instance's pooled connection was reused"
    );
    // The retired instance's connection is closed by the pool's next sweep (a quarter of
    // its idle timeout), the new instance's is kept.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600 / 4 + 10);
    while ended.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retired backend's idle pooled connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ended.load(Ordering::SeqCst), 1);
    assert_eq!(c.get("/").await, (StatusCode::OK, "a".to_owned()));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
