//! The admin endpoint (`--admin ADDR`): `GET /status` (JSON), `GET /metrics` (Prometheus
//! text) and `GET /healthz` (200 while at least one worker is in rotation, else 503, for an
//! orchestrator's readiness probe). Served on the supervisor's runtime; bind it to loopback
//! or a private network, it has no authentication.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use proxy::{Connections, Proxy};

use crate::config::Config;
use crate::status::Registry;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct View {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The real client address.
    pub listen: std::net::SocketAddr,
    /// The data path's counters and backend set.
    pub proxy: Arc<Proxy>,
    /// Open client connections.
    pub conns: Connections,
    /// Worker states.
    pub registry: Arc<Registry>,
}

/// Serves the admin endpoint on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, view: View, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let view = view.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let view = view.clone();
                async move { Ok::<_, Infallible>(answer(&view, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

fn answer(view: &View, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
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
    for state in ["starting", "ready", "down", "draining", "stopping"] {
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
