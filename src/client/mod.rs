//! The operator subcommands (`balancer health`, `status`, `reload`, `scale`, `top`,
//! `upgrade`): thin clients of a running master's admin endpoint. Each parses its flags (in [`crate::cli`]), makes one
//! request over TCP or a Unix socket, and renders the answer; none of them knows anything
//! the master does not say. Errors are one line for `main` to print, and a non-zero exit.

mod status;
mod top;
mod transport;
mod upgrade;

use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{ClientArgs, ScaleArgs, StatusArgs, TopArgs};
use crate::endpoint::AdminAddr;
pub use transport::Reply;

/// A master's admin endpoint, as the subcommands reach it.
#[derive(Debug)]
pub struct Endpoint {
    addr: AdminAddr,
    token: Option<String>,
    timeout: Duration,
}

impl Endpoint {
    /// From the common client flags.
    pub fn from_args(args: &ClientArgs) -> anyhow::Result<Self> {
        let Some(raw) = args.admin.as_deref() else {
            bail!("no admin endpoint: pass --admin ADDR (IP:PORT or a socket path) or set BALANCER_ADMIN");
        };
        let timeout = humantime::parse_duration(args.timeout.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--timeout {:?}: expected e.g. 5s, 500ms", args.timeout))?;
        Ok(Self {
            addr: AdminAddr::parse(raw)?,
            token: args.admin_token.clone().filter(|t| !t.is_empty()),
            timeout,
        })
    }

    /// One request; any answer the master gives is `Ok`, whatever its status.
    pub fn call(&self, method: hyper::Method, path: &str) -> anyhow::Result<Reply> {
        transport::call(
            &self.addr,
            self.token.as_deref(),
            method,
            path,
            self.timeout,
        )
    }

    /// `GET path`, which must answer 200.
    pub fn get_ok(&self, path: &str) -> anyhow::Result<String> {
        let reply = self.call(hyper::Method::GET, path)?;
        self.expect_ok(path, reply)
    }

    /// The body of a 2xx `reply`, or the one-line error that names what the master said.
    pub fn expect_ok(&self, path: &str, reply: Reply) -> anyhow::Result<String> {
        if reply.status.is_success() {
            return Ok(reply.body);
        }
        let said = reply.body.lines().next().unwrap_or("").trim();
        bail!("{path} at {}: {} {said}", self.addr, reply.status)
    }
}

/// `balancer health`: exit 0 when `/healthz` answers 200, for a container health check in
/// an image with no curl.
pub fn health(args: &ClientArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_args(args)?;
    endpoint.get_ok("/healthz").map(|_| ())
}

/// `balancer status`: the workers as a table, or `/status` as it came with `--json`.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_args(&args.client)?;
    let body = endpoint.get_ok("/status")?;
    let text = if args.json {
        body
    } else {
        status::Status::parse(&body)?.render()
    };
    print(&text)
}

/// `balancer reload`: a rolling reload of every worker, as SIGHUP; prints what the master
/// said (requested, or coalesced with one already pending).
pub fn reload(args: &ClientArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_args(args)?;
    let reply = endpoint.call(hyper::Method::POST, "/reload")?;
    let said = endpoint.expect_ok("/reload", reply)?;
    print(&said)
}

/// `balancer scale N|+K|-K`: prints what the master did (`workers 2 -> 3`).
pub fn scale(args: &ScaleArgs) -> anyhow::Result<()> {
    // Checked here too, so a typo fails without a round trip; the master judges the count.
    crate::control::ScaleTo::parse(&args.workers).map_err(|e| anyhow::anyhow!("scale {e}"))?;
    let endpoint = Endpoint::from_args(&args.client)?;
    let value = args.workers.trim().replace('+', "%2B");
    let path = format!("/scale?workers={value}");
    let reply = endpoint.call(hyper::Method::POST, &path)?;
    let said = endpoint.expect_ok("/scale", reply)?;
    print(&said)
}

/// `balancer top`: the live view, until `q`.
pub fn top(args: &TopArgs) -> anyhow::Result<()> {
    top::run(args)
}

/// `balancer upgrade`: an in-place upgrade of the master, as SIGUSR2; returns once the new
/// image serves, or with the one line that says why it was refused.
pub fn upgrade(args: &ClientArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_args(args)?;
    let said = upgrade::upgrade(&endpoint)?;
    print(&said)
}

/// Writes `text` to stdout; a closed stdout (`| head`) is not an error worth a panic.
fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
