//! What the admin endpoint answers: `GET /status` (JSON), `GET /metrics` (Prometheus text),
//! `GET /healthz` (200 while at least one worker is in rotation, else 503, for an
//! orchestrator's readiness probe), and the changes `POST /reload` (a rolling reload, as
//! SIGHUP), `POST /scale?workers=N` (or `+K`, `-K`: as SIGTTIN/SIGTTOU, by any amount) and
//! `POST /upgrade` (an in-place upgrade, as SIGUSR2). Reads take `GET` or `HEAD`, changes `POST` (`405` otherwise); no request body is
//! read.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};

use proxy::Stats;

use crate::state::State;

use super::{Peer, View};

/// Paths that change something: `POST` only, and authorized (see [`refusal`]).
const CHANGES: [&str; 3] = ["/reload", "/scale", "/upgrade"];
/// How long `POST /scale` waits for the supervisor's answer (it answers at once unless the
/// master is stopping).
const SCALE_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

/// The response to `req`, which came over `peer`.
pub(super) async fn answer(
    view: &View,
    peer: Peer,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let mut res = route(view, peer, req).await;
    if !req.body().is_end_stream() {
        // The body is never read: closing after the answer leaves nothing to trickle.
        res.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    res
}

async fn route(view: &View, peer: Peer, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let change = CHANGES.contains(&path);
    let (allowed, allow) = if change {
        (req.method() == Method::POST, "POST")
    } else {
        (
            req.method() == Method::GET || req.method() == Method::HEAD,
            "GET, HEAD",
        )
    };
    if !allowed {
        let mut res = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("method {} not allowed on {path}: {allow}\n", req.method()),
        );
        res.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        return res;
    }
    if !req.body().is_end_stream() {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "the admin endpoint takes no request body\n".into(),
        );
    }
    if change {
        if let Some(refused) = refusal(view, peer, req) {
            return refused;
        }
        return match path {
            "/reload" => reload(view),
            "/scale" => scale(view, req.uri().query().unwrap_or("")).await,
            "/upgrade" => upgrade(view).await,
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
    }
    let (status, kind, body) = match req.uri().path() {
        "/status" => (StatusCode::OK, "application/json", status_json(view)),
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics(view)),
        "/healthz" => {
            let serving = !view.proxy.backends.is_empty();
            let status = if serving {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                "text/plain",
                match (serving, view.upstreams.any()) {
                    (true, _) => "ok\n".into(),
                    (false, true) => "no backend in rotation\n".into(),
                    (false, false) => "no worker in rotation\n".into(),
                },
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try GET /status, /metrics, /healthz or POST /reload, /scale?workers=N, /upgrade\n"
                .into(),
        ),
    };
    reply(status, kind, body)
}

/// Why a change may not be made, as the answer to give (`None`: it may). Changes over a
/// Unix socket are allowed (its mode is the check); over TCP they need the master's
/// `--admin-token` as a Bearer token.
fn refusal(view: &View, peer: Peer, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if peer == Peer::Unix {
        return None;
    }
    let Some(token) = &view.token else {
        return Some(reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "changes over TCP need a master started with --admin-token (or an --admin Unix socket)\n".into(),
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if presented.is_some_and(|p| token.matches(p)) {
        return None;
    }
    tracing::warn!("admin: change refused: missing or wrong token");
    let mut res = reply(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "missing or wrong admin token (Authorization: Bearer TOKEN)\n".into(),
    );
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(res)
}

/// `POST /reload`: queue a rolling reload, exactly as SIGHUP does.
fn reload(view: &View) -> Response<Full<Bytes>> {
    use tokio::sync::mpsc::error::TrySendError;
    let said = match view.reload.try_send(()) {
        Ok(()) => "rolling reload requested",
        Err(TrySendError::Full(())) => "a reload is already pending; coalesced",
        Err(TrySendError::Closed(())) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "stopping\n".into(),
            )
        }
    };
    tracing::info!("admin: {said}");
    reply(StatusCode::ACCEPTED, "text/plain", format!("{said}\n"))
}

/// `POST /upgrade`: an in-place upgrade, exactly as SIGUSR2 does. Answered `202` once the
/// pre-flight passed (the exec follows; this connection is cut by it), or `409` with why it
/// was refused. `balancer upgrade` then waits for `/status`'s `upgrades` to move.
async fn upgrade(view: &View) -> Response<Full<Bytes>> {
    let text = |status, body: String| reply(status, "text/plain", body);
    let (tx, rx) = tokio::sync::oneshot::channel();
    if view.upgrade.try_send(tx).is_err() {
        return text(
            StatusCode::CONFLICT,
            "an upgrade is already under way\n".into(),
        );
    }
    match rx.await {
        Ok(Ok(())) => {
            tracing::info!("admin: upgrade requested");
            let mut res = text(StatusCode::ACCEPTED, "upgrade started\n".into());
            res.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            res
        }
        Ok(Err(why)) => text(StatusCode::CONFLICT, format!("upgrade refused: {why}\n")),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the master did not answer (stopping?)\n".into(),
        ),
    }
}

/// `POST /scale?workers=N` (or `+K`, `-K`, with `+` sent as `%2B`): asks the supervisor
/// and says what it did (`200 workers 2 -> 3`) or why not (`409`).
async fn scale(view: &View, query: &str) -> Response<Full<Bytes>> {
    use crate::control::{ScaleRequest, ScaleTo, Scaled};
    let text = |status, body: String| reply(status, "text/plain", body);
    let Some(raw) = query_param(query, "workers") else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected POST /scale?workers=N (or +K, -K; + as %2B)\n".into(),
        );
    };
    let to = match ScaleTo::parse(&raw) {
        Ok(to) => to,
        Err(why) => return text(StatusCode::BAD_REQUEST, format!("workers={why}\n")),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let request = ScaleRequest {
        to,
        from: "admin",
        reply: Some(tx),
    };
    if view.scale.try_send(request).is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many scale requests pending\n".into(),
        );
    }
    match tokio::time::timeout(SCALE_ANSWER, rx).await {
        Ok(Ok(Ok(Scaled { from, to }))) => {
            text(StatusCode::OK, format!("workers {from} -> {to}\n"))
        }
        Ok(Ok(Err(why))) => text(StatusCode::CONFLICT, format!("{why}\n")),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor did not answer (stopping?)\n".into(),
        ),
    }
}

/// The percent-decoded value of `name` in a query string (`+` stays `+`: these are not
/// form submissions, and `workers=+1` is what a person types).
fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn reply(status: StatusCode, kind: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    res
}

/// The data path's counters, listed once for `/status` and `/metrics`: the name under
/// `connections` in `/status`, the metric's name and help, and the value now.
fn counters(s: &Stats) -> [(&'static str, &'static str, &'static str, u64); 11] {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    [
        (
            "accepted",
            "balancer_connections_accepted_total",
            "Client connections accepted.",
            n(&s.accepted),
        ),
        (
            "completed",
            "balancer_connections_completed_total",
            "Proxied connections that finished.",
            n(&s.completed),
        ),
        (
            "handed_off",
            "balancer_connections_handed_off_total",
            "Connections handed to hand-off workers.",
            n(&s.handed_off),
        ),
        (
            "abandoned",
            "balancer_connections_abandoned_total",
            "Clients that closed before sending anything, with no backend connected yet.",
            n(&s.abandoned),
        ),
        (
            "proxy_header_rejected",
            "balancer_connections_proxy_header_rejected_total",
            "Connections from --accept-proxy sources closed for a missing or bad PROXY header.",
            n(&s.proxy_header_rejected),
        ),
        (
            "no_backend",
            "balancer_connections_no_backend_total",
            "Clients closed with no worker in rotation.",
            n(&s.no_backend),
        ),
        (
            "connect_failed",
            "balancer_connections_connect_failed_total",
            "Clients closed after every worker tried failed.",
            n(&s.connect_failed),
        ),
        (
            "copy_failed",
            "balancer_connections_reset_total",
            "Proxied connections that failed mid-stream.",
            n(&s.copy_failed),
        ),
        (
            "idle_closed",
            "balancer_connections_idle_closed_total",
            "Connections closed by --idle-timeout.",
            n(&s.idle_closed),
        ),
        (
            "response_timeouts",
            "balancer_connections_response_timeouts_total",
            "Connections closed by --response-timeout (the worker did not answer).",
            n(&s.response_timeouts),
        ),
        (
            "accept_errors",
            "balancer_accept_errors_total",
            "accept() errors.",
            n(&s.accept_errors),
        ),
    ]
}

fn status_json(view: &View) -> String {
    let mut connections = serde_json::Map::new();
    connections.insert("open".into(), view.conns.tracker.len().into());
    for (name, _, _, value) in counters(&view.proxy.stats) {
        connections.insert(name.into(), value.into());
    }
    let v = serde_json::json!({
        "listen": view.listen.to_string(),
        "mode": view.config.mode.as_str(),
        // `balancer top` labels its rates by it: connections (tcp) or requests (http).
        "protocol": view.config.data.protocol.to_string(),
        "tls": view.config.data.tls.is_some(),
        "pid": std::process::id(),
        "upgrades": view.registry.upgrades(),
        "workers_wanted": view.ctx.desired(),
        "workers_running": view.registry.workers().len(),
        "in_rotation": view.proxy.backends.len(),
        "down_alive": view.proxy.backends.down(),
        "panic": view.proxy.backends.panicking(),
        "workers": workers_json(view),
        "spawns_per_slot": view.registry.spawns(),
        "upstreams": view.upstreams.status_json(),
        "connections": connections,
    });
    format!("{v:#}\n")
}

/// Every live worker as the registry has it, with what the rows of `balancer status` need
/// besides: its uptime, its slot's restarts and last exit, and its connections (while it is
/// in rotation; `null` otherwise).
fn workers_json(view: &View) -> Vec<serde_json::Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let slots = view.registry.slots();
    let backends = view.proxy.backends.snapshot();
    view.registry
        .workers()
        .into_iter()
        .map(|w| {
            let slot = slots.get(w.slot).cloned().unwrap_or_default();
            let backend = backends.iter().find(|b| b.key == w.instance);
            let mut v = serde_json::to_value(&w).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("uptime_secs".into(), now.saturating_sub(w.started).into());
                o.insert("restarts".into(), slot.spawns.saturating_sub(1).into());
                o.insert("last_exit".into(), slot.last_exit.into());
                o.insert(
                    "connections".into(),
                    match backend {
                        Some(b) => serde_json::json!({"active": b.active(), "total": b.served()}),
                        None => serde_json::Value::Null,
                    },
                );
            }
            v
        })
        .collect()
}

fn metrics(view: &View) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    for (_, name, help, value) in counters(&view.proxy.stats) {
        counter(name, help, value);
    }
    let spawns: u64 = view.registry.spawns().iter().sum();
    counter(
        "balancer_worker_spawns_total",
        "Workers spawned, first starts included.",
        spawns,
    );
    let _ = writeln!(out, "# HELP balancer_connections_open Client connections open now.\n# TYPE balancer_connections_open gauge\nbalancer_connections_open {}", view.conns.tracker.len());
    let _ = writeln!(out, "# HELP balancer_workers_in_rotation Workers receiving new connections.\n# TYPE balancer_workers_in_rotation gauge\nbalancer_workers_in_rotation {}", view.proxy.backends.len());
    let _ = writeln!(
        out,
        "# HELP balancer_workers Live worker processes by state.\n# TYPE balancer_workers gauge"
    );
    for state in State::LIVE {
        let n = view
            .registry
            .workers()
            .iter()
            .filter(|w| w.state == state)
            .count();
        let _ = writeln!(out, "balancer_workers{{state=\"{state}\"}} {n}");
    }
    view.upstreams.write_metrics(&mut out);
    if let Some(http) = &view.http {
        // --protocol http: requests by status class, the latency histogram, and requests
        // in flight per backend.
        http.stats.render(&mut out);
        let _ = writeln!(out, "# HELP balancer_backend_requests_in_flight Requests in flight per backend.\n# TYPE balancer_backend_requests_in_flight gauge");
        for b in view.proxy.backends.snapshot().iter() {
            let _ = writeln!(
                out,
                "balancer_backend_requests_in_flight{{slot=\"{}\",addr=\"{}\"}} {}",
                b.slot,
                b.addr,
                b.active()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params() {
        assert_eq!(query_param("workers=3", "workers").as_deref(), Some("3"));
        assert_eq!(
            query_param("a=1&workers=%2B2", "workers").as_deref(),
            Some("+2")
        );
        assert_eq!(query_param("workers=+1", "workers").as_deref(), Some("+1"));
        assert_eq!(query_param("workers=-1", "workers").as_deref(), Some("-1"));
        assert_eq!(query_param("workersx=1", "workers"), None);
        assert_eq!(query_param("", "workers"), None);
        assert_eq!(
            query_param("workers=%zz", "workers").as_deref(),
            Some("%zz")
        );
    }
}
