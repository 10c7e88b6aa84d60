//! What the admin endpoint answers: `GET /status` (JSON), `GET /metrics` (Prometheus text)
//! and `GET /healthz` (200 while at least one worker is in rotation, else 503, for an
//! orchestrator's readiness probe). Only `GET` and `HEAD` are served (`405` otherwise), and
//! no request body is read.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};

use crate::instance::State;

use super::View;

/// The response to `req`.
pub(super) fn answer(view: &View, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut res = route(view, req);
    if !req.body().is_end_stream() {
        // The body is never read: closing after the answer leaves nothing to trickle.
        res.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    res
}

fn route(view: &View, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("method {} not allowed: GET or HEAD\n", req.method()),
        );
        res.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    if !req.body().is_end_stream() {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "the admin endpoint takes no request body\n".into(),
        );
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
                if serving {
                    "ok\n".into()
                } else {
                    "no worker in rotation\n".into()
                },
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /status, /metrics, /healthz\n".into(),
        ),
    };
    reply(status, kind, body)
}

fn reply(status: StatusCode, kind: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    res
}

fn status_json(view: &View) -> String {
    let s = &view.proxy.stats;
    let v = serde_json::json!({
        "listen": view.listen.to_string(),
        "mode": view.config.mode.as_str(),
        "workers_wanted": view.config.workers,
        "in_rotation": view.proxy.backends.len(),
        "workers": view.registry.workers(),
        "spawns_per_slot": view.registry.spawns(),
        "connections": {
            "open": view.conns.tracker.len(),
            "accepted": s.accepted.load(Ordering::Relaxed),
            "completed": s.completed.load(Ordering::Relaxed),
            "handed_off": s.handed_off.load(Ordering::Relaxed),
            "no_backend": s.no_backend.load(Ordering::Relaxed),
            "connect_failed": s.connect_failed.load(Ordering::Relaxed),
            "copy_failed": s.copy_failed.load(Ordering::Relaxed),
            "idle_closed": s.idle_closed.load(Ordering::Relaxed),
            "response_timeouts": s.response_timeouts.load(Ordering::Relaxed),
            "accept_errors": s.accept_errors.load(Ordering::Relaxed),
        },
    });
    format!("{v:#}\n")
}

fn metrics(view: &View) -> String {
    let s = &view.proxy.stats;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "balancer_connections_accepted_total",
        "Client connections accepted.",
        s.accepted.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_completed_total",
        "Proxied connections that finished.",
        s.completed.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_handed_off_total",
        "Connections handed to hand-off workers.",
        s.handed_off.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_no_backend_total",
        "Clients closed with no worker in rotation.",
        s.no_backend.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_connect_failed_total",
        "Clients closed after every worker tried failed.",
        s.connect_failed.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_reset_total",
        "Proxied connections that failed mid-stream.",
        s.copy_failed.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_idle_closed_total",
        "Connections closed by --idle-timeout.",
        s.idle_closed.load(Ordering::Relaxed),
    );
    counter(
        "balancer_connections_response_timeouts_total",
        "Connections closed by --response-timeout (the worker did not answer).",
        s.response_timeouts.load(Ordering::Relaxed),
    );
    counter(
        "balancer_accept_errors_total",
        "accept() errors.",
        s.accept_errors.load(Ordering::Relaxed),
    );
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
    out
}
