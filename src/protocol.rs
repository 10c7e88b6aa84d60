//! What the data path speaks (`--protocol tcp|http`) and whether it terminates TLS: the
//! flags of [`HttpArgs`] validated into a [`DataConfig`], and the [`DataPath`] that each
//! proxy thread serves its listener with (tcp, tcp over TLS, or http with or without
//! TLS). SIGHUP reloads the certificate here, beside the rolling reload of the workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use proxy::http::{Http, HttpConfig, TrustedProxies};
use proxy::tls::{Alpn, Tls};
use proxy::{Connections, Proxy};
use tokio_util::sync::CancellationToken;

use crate::cli::{EngineArg, HttpArgs, ModeArg, ProtocolArg};

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Per-connection forwarding.
    Tcp,
    /// Per-request balancing.
    Http,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        })
    }
}

/// `--engine`: what runs the tcp data path on each proxy thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// A tokio current-thread runtime (every feature).
    #[default]
    Tokio,
    /// [`proxy::engine`]: plain tcp proxying on an epoll loop of our own.
    Epoll,
}

/// The validated protocol and TLS settings.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// `--engine`.
    pub engine: Engine,
    /// `--protocol`.
    pub protocol: Protocol,
    /// The HTTP path's knobs (used in http mode).
    pub http: HttpConfig,
    /// `--tls-cert` and `--tls-key`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--tls-handshake-timeout` (tcp mode; http's handshake is under its header timeout).
    pub tls_handshake_timeout: Duration,
}

impl DataConfig {
    /// `--engine`, checked against what the epoll engine supports: the plain tcp proxy.
    /// `send_proxy`/`accept_proxy`: whether those flags are given.
    pub fn with_engine(
        mut self,
        engine: EngineArg,
        mode: ModeArg,
        send_proxy: bool,
        accept_proxy: bool,
    ) -> anyhow::Result<Self> {
        self.engine = match engine {
            EngineArg::Tokio => Engine::Tokio,
            EngineArg::Epoll => {
                let refused = [
                    (
                        "--mode shared, reuseport or handoff",
                        mode != ModeArg::Proxy,
                    ),
                    ("--protocol http", self.protocol == Protocol::Http),
                    ("--tls-cert", self.tls.is_some()),
                    ("--send-proxy", send_proxy),
                    ("--accept-proxy", accept_proxy),
                ];
                if let Some((flag, _)) = refused.iter().find(|(_, given)| *given) {
                    bail!("--engine epoll does not support {flag} (plain tcp proxying only); use --engine tokio");
                }
                Engine::Epoll
            }
        };
        Ok(self)
    }

    /// Validates `args` for `mode`; `idle_timeout` is `--idle-timeout` (in http mode, for
    /// idle keep-alive clients).
    pub fn parse(
        args: &HttpArgs,
        mode: ModeArg,
        idle_timeout: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let protocol = match args.protocol {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Http => Protocol::Http,
        };
        let tls = args.tls_cert.clone().zip(args.tls_key.clone());
        if mode != ModeArg::Proxy && (protocol == Protocol::Http || tls.is_some()) {
            let mode = clap::ValueEnum::to_possible_value(&mode)
                .map_or_else(String::new, |v| v.get_name().to_owned());
            bail!("--protocol http and --tls-cert need --mode proxy (in {mode} mode the master does not see the bytes)");
        }
        let http_only = [
            ("--request-timeout", args.request_timeout.is_some()),
            ("--header-timeout", args.header_timeout.is_some()),
            ("--max-body", args.max_body.is_some()),
            ("--trusted-proxies", args.trusted_proxies.is_some()),
            ("--access-log", args.access_log),
        ];
        if protocol == Protocol::Tcp {
            if let Some((flag, _)) = http_only.iter().find(|(_, given)| *given) {
                bail!("{flag} needs --protocol http");
            }
        }
        if protocol == Protocol::Http && args.tls_handshake_timeout.is_some() {
            bail!("--tls-handshake-timeout is for --protocol tcp (in http mode the handshake counts toward --header-timeout)");
        }
        let tls_handshake_timeout = match &args.tls_handshake_timeout {
            Some(raw) => nonzero_duration("--tls-handshake-timeout", raw)?,
            None => proxy::tls::HANDSHAKE_TIMEOUT,
        };
        let mut http = HttpConfig {
            idle_timeout,
            access_log: args.access_log,
            ..HttpConfig::default()
        };
        if let Some(raw) = &args.request_timeout {
            http.request_timeout = nonzero_duration("--request-timeout", raw)?;
        }
        if let Some(raw) = &args.header_timeout {
            http.header_timeout = nonzero_duration("--header-timeout", raw)?;
        }
        if let Some(raw) = &args.max_body {
            http.max_body = Some(parse_size(raw).with_context(|| format!("--max-body {raw:?}"))?);
        }
        if let Some(raw) = &args.trusted_proxies {
            http.trusted_proxies = raw
                .parse::<TrustedProxies>()
                .with_context(|| format!("--trusted-proxies {raw:?}"))?;
        }
        Ok(Self {
            // Set by `Config` from `--engine` (see `DataConfig::with_engine`).
            engine: Engine::Tokio,
            protocol,
            http,
            tls,
            tls_handshake_timeout,
        })
    }
}

fn nonzero_duration(flag: &str, raw: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(raw)
        .with_context(|| format!("{flag} {raw:?}: not a duration (e.g. 10s, 500ms)"))?;
    if d.is_zero() {
        bail!("{flag} must be more than 0");
    }
    Ok(d)
}

/// Bytes, with an optional K, M or G suffix (powers of 1024; `KiB`, `MB`… accepted alike).
fn parse_size(raw: &str) -> anyhow::Result<u64> {
    let t = raw.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().context("not a size (e.g. 1048576, 512K, 10M)")?;
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        other => bail!("unknown size unit {other:?} (K, M or G)"),
    };
    n.checked_mul(1 << shift).context("too large")
}

/// What each proxy thread serves its listener with.
#[derive(Debug)]
pub struct DataPath {
    engine: Engine,
    proxy: Arc<Proxy>,
    http: Option<Arc<Http>>,
    tls: Option<Arc<Tls>>,
}

impl DataPath {
    /// Loads the TLS pair if configured (a missing or unparsable file is an error here, at
    /// start) and sets up the protocol's path over `proxy`'s backends.
    pub fn new(config: &DataConfig, proxy: Arc<Proxy>) -> anyhow::Result<Self> {
        let alpn = match config.protocol {
            Protocol::Http => Alpn::Http,
            Protocol::Tcp => Alpn::None,
        };
        let tls = match &config.tls {
            Some((cert, key)) => Some(Arc::new(
                Tls::load(cert, key, alpn).context("loading --tls-cert/--tls-key")?,
            )),
            None => None,
        };
        let http = (config.protocol == Protocol::Http).then(|| {
            Arc::new(Http::new(
                Arc::clone(&proxy),
                config.http.clone(),
                tls.clone(),
            ))
        });
        Ok(Self {
            engine: config.engine,
            proxy,
            http,
            tls,
        })
    }

    /// What runs the data path on each proxy thread.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The tcp path's shared state (for the epoll engine, which serves it directly).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The HTTP path's state (for `/metrics`), in http mode.
    pub fn http(&self) -> Option<&Arc<Http>> {
        self.http.as_ref()
    }

    /// Serves `listener` until `stop`, as the protocol says.
    pub async fn serve(
        &self,
        listener: std::net::TcpListener,
        stop: CancellationToken,
        conns: Connections,
    ) {
        match (&self.http, &self.tls) {
            (Some(http), _) => proxy::http::serve(listener, Arc::clone(http), stop, conns).await,
            (None, Some(tls)) => {
                proxy::tls::serve(
                    listener,
                    Arc::clone(&self.proxy),
                    Arc::clone(tls),
                    stop,
                    conns,
                )
                .await
            }
            (None, None) => proxy::serve(listener, Arc::clone(&self.proxy), stop, conns).await,
        }
    }

    /// SIGHUP: reads the certificate and key again; a pair that does not load leaves the
    /// old one serving, with one log line.
    pub fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the old one stays")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512K").unwrap(), 512 * 1024);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
    }
}
