//! Validated configuration: [`Config::try_from`] turns raw [`Cli`] flags into plain values,
//! so everything after start-up can trust them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{BalanceArg, CheckArg, Cli, ModeArg, NodeClusterArg, ReadyArg, WorkerOutput};
use crate::health::{CheckKind, HealthConfig};
use worker::protocol::Mode;

/// Upper bound for `--cpus`: far more workers than any machine has cores, low enough that a
/// typo (`--cpus 100000`) is caught instead of forking the machine to death.
pub const MAX_WORKERS: usize = 1024;

/// What each worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerProgram {
    /// This executable, with the hidden `worker` subcommand.
    Builtin,
    /// A user command, started directly.
    Command {
        /// The resolved executable.
        program: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
}

/// A `--listen` host name and every address it resolved to at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedName {
    /// The name as given, with its port (`localhost:8080`).
    pub name: String,
    /// Its addresses, in the resolver's order, without duplicates.
    pub addrs: Vec<SocketAddr>,
}

/// Everything the master needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind for clients.
    pub listen: SocketAddr,
    /// When `--listen` named a host: what it resolved to, so the log can say which of its
    /// addresses is bound (see [`pick_address`]).
    pub listen_name: Option<ResolvedName>,
    /// Number of worker slots.
    pub workers: usize,
    /// Graceful-stop deadline for open connections.
    pub grace: Duration,
    /// Deadline for a new worker's `ready`.
    pub ready_timeout: Duration,
    /// What each worker runs.
    pub program: WorkerProgram,
    /// How workers serve clients.
    pub mode: Mode,
    /// How workers announce readiness.
    pub ready: ReadyArg,
    /// Whether workers are started as Node cluster workers (`NODE_UNIQUE_ID`).
    pub node_cluster: bool,
    /// How the next backend is chosen.
    pub policy: proxy::Policy,
    /// Cap on open client connections (`None`: derived from the open-file limit).
    pub max_conns: Option<usize>,
    /// Proxy threads (`--proxy-threads`; `None`: one per CPU this process may use).
    pub proxy_threads: Option<usize>,
    /// Active health checks.
    pub health: HealthConfig,
    /// Connect timeout towards workers.
    pub connect_timeout: Duration,
    /// Idle timeout of proxied connections (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Response timeout of proxied connections (`None`: never).
    pub response_timeout: Option<Duration>,
    /// Whether a worker's half-close is passed on (`--half-close`) or ends the connection.
    pub half_close: bool,
    /// PROXY header to send to workers (`--send-proxy`).
    pub send_proxy: Option<proxy::proxy_header::Version>,
    /// Sources whose connections must start with a PROXY header (`--accept-proxy`).
    pub accept_proxy: Option<proxy::proxy_header::AcceptProxy>,
    /// Where the admin endpoint listens, if anywhere.
    pub admin: Option<crate::endpoint::AdminAddr>,
    /// What changes over a TCP admin endpoint need.
    pub admin_token: Option<crate::endpoint::Token>,
    /// Where worker output goes.
    pub worker_output: WorkerOutput,
    /// Remote backends (`--upstream`, `--resolver`, `--resolve-interval`).
    pub upstream: crate::upstream::Settings,
    /// `--protocol`, the HTTP path and TLS (#12).
    pub data: crate::protocol::DataConfig,
    /// Who the master becomes once bound (`--user`, `--group`).
    pub privilege: Option<crate::privilege::Target>,
}

impl TryFrom<&Cli> for Config {
    type Error = anyhow::Error;

    fn try_from(cli: &Cli) -> anyhow::Result<Self> {
        let (listen, listen_name) = parse_listen(&cli.listen)?;
        let config = Self {
            listen,
            listen_name,
            workers: parse_cpus(&cli.cpus)?,
            grace: parse_duration("--grace", &cli.grace)?,
            ready_timeout: parse_nonzero_duration("--ready-timeout", &cli.ready_timeout)?,
            program: parse_program(&cli.command)?,
            mode: match cli.mode {
                ModeArg::Proxy => Mode::Proxy,
                ModeArg::Shared => Mode::Shared,
                ModeArg::Reuseport => Mode::ReusePort,
                ModeArg::Handoff => Mode::Handoff,
            },
            node_cluster: match cli.node_cluster {
                NodeClusterArg::On => true,
                NodeClusterArg::Off => false,
                NodeClusterArg::Auto => cli.mode != ModeArg::Shared && cli.command.first().is_some_and(|p| is_node(p)),
            },
            ready: match (cli.ready, cli.mode, &cli.command) {
                (ReadyArg::Port, _, c) if c.is_empty() => {
                    bail!("--ready port needs a worker COMMAND (the built-in worker announces itself over IPC)")
                }
                (ReadyArg::Spawn, _, c) if c.is_empty() => {
                    bail!("--ready spawn needs a worker COMMAND (the built-in worker announces itself over IPC)")
                }
                (ReadyArg::Spawn, ModeArg::Proxy | ModeArg::Handoff, _) => bail!(
                    "--ready spawn is for --mode shared or reuseport: in proxy and handoff modes the master must hear from the worker first"
                ),
                (ReadyArg::Port, ModeArg::Shared | ModeArg::Handoff, _) => bail!(
                    "--ready port is for --mode proxy or reuseport (in shared and handoff modes workers have no port of their own); use ipc{}",
                    if cli.mode == ModeArg::Shared { " or spawn" } else { "" }
                ),
                (r, _, _) => r,
            },
            policy: match cli.balance {
                BalanceArg::RoundRobin => proxy::Policy::RoundRobin,
                BalanceArg::LeastConn => proxy::Policy::LeastConn,
            },
            max_conns: match cli.max_conns {
                Some(0) => bail!("--max-conns 0: at least one connection must be allowed"),
                n => n,
            },
            proxy_threads: match cli.proxy_threads {
                Some(0) => bail!("--proxy-threads 0: at least one thread must accept clients"),
                n => n,
            },
            worker_output: cli.worker_output,
            health: parse_health(cli)?,
            admin: parse_admin(cli)?,
            admin_token: cli.admin_token.as_deref().and_then(crate::endpoint::Token::new),
            connect_timeout: parse_nonzero_duration("--connect-timeout", &cli.connect_timeout)?,
            idle_timeout: Some(parse_duration("--idle-timeout", &cli.idle_timeout)?)
                .filter(|d| !d.is_zero()),
            response_timeout: Some(parse_duration("--response-timeout", &cli.response_timeout)?)
                .filter(|d| !d.is_zero()),
            upstream: parse_upstream(cli)?,
            data: crate::protocol::DataConfig::parse(
                &cli.http,
                cli.mode,
                Some(parse_duration("--idle-timeout", &cli.idle_timeout)?).filter(|d| !d.is_zero()),
            )?
            .with_engine(
                cli.engine,
                cli.mode,
                cli.send_proxy.is_some(),
                cli.accept_proxy.is_some(),
            )?,
            half_close: cli.half_close,
            send_proxy: parse_send_proxy(cli)?,
            accept_proxy: parse_accept_proxy(cli)?,
            privilege: parse_privilege(cli)?,
        };
        check_upstreams(&config)?;
        check_reuseport_port(&config)?;
        Ok(config)
    }
}

/// `--send-proxy`: a known version, and only where the master forwards the bytes itself.
fn parse_send_proxy(cli: &Cli) -> anyhow::Result<Option<proxy::proxy_header::Version>> {
    let Some(raw) = &cli.send_proxy else {
        return Ok(None);
    };
    let version = raw
        .parse()
        .map_err(|e| anyhow::anyhow!("--send-proxy: {e}"))?;
    proxy_mode_only("--send-proxy", cli.mode)?;
    // The http path pools its backend connections (one header cannot speak for the many
    // clients one connection carries), and the TLS tcp path has its own copy: neither
    // writes the header yet, so refuse rather than silently send none.
    if cli.http.protocol == crate::cli::ProtocolArg::Http || cli.http.tls_cert.is_some() {
        bail!("--send-proxy works with --protocol tcp without TLS (for now)");
    }
    Ok(Some(version))
}

/// `--accept-proxy`: networks, and only where the master reads the client's first bytes.
fn parse_accept_proxy(cli: &Cli) -> anyhow::Result<Option<proxy::proxy_header::AcceptProxy>> {
    let Some(raw) = &cli.accept_proxy else {
        return Ok(None);
    };
    let accept = proxy::proxy_header::AcceptProxy::parse(raw)
        .map_err(|e| anyhow::anyhow!("--accept-proxy: {e}"))?;
    proxy_mode_only("--accept-proxy", cli.mode)?;
    Ok(Some(accept))
}

fn proxy_mode_only(flag: &str, mode: ModeArg) -> anyhow::Result<()> {
    let name = match mode {
        ModeArg::Proxy => return Ok(()),
        ModeArg::Shared => "shared",
        ModeArg::Reuseport => "reuseport",
        ModeArg::Handoff => "handoff",
    };
    bail!("{flag} needs --mode proxy: in {name} mode the worker holds the client socket itself")
}

/// `--user` and `--group`, looked up now: an unknown name fails `--check` and the start,
/// before anything is bound.
fn parse_privilege(cli: &Cli) -> anyhow::Result<Option<crate::privilege::Target>> {
    match (&cli.user, &cli.group) {
        (None, None) => Ok(None),
        (None, Some(g)) => bail!("--group {g:?} needs --user (the group alone is never changed)"),
        (Some(u), g) => crate::privilege::Target::resolve(u, g.as_deref()).map(Some),
    }
}

/// `--mode reuseport --user`: the workers bind `--listen` themselves, as the user, which a
/// privileged port refuses them; said once here rather than by every respawned worker.
fn check_reuseport_port(config: &Config) -> anyhow::Result<()> {
    let Some(target) = &config.privilege else {
        return Ok(());
    };
    let first_free: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let port = config.listen.port();
    if config.mode == Mode::ReusePort && port != 0 && port < first_free {
        bail!(
            "--mode reuseport --user {}: the workers bind port {port} themselves, and as that user they may not (below {first_free}); use --mode proxy, shared or handoff",
            target.user
        );
    }
    Ok(())
}

/// `--admin`, refused where anyone on the network could change things: a TCP address that
/// is not loopback needs `--admin-token`.
fn parse_admin(cli: &Cli) -> anyhow::Result<Option<crate::endpoint::AdminAddr>> {
    let Some(raw) = &cli.admin else {
        return Ok(None);
    };
    let addr = crate::endpoint::AdminAddr::parse(raw)?;
    let has_token = cli.admin_token.as_deref().is_some_and(|t| !t.is_empty());
    if !addr.is_local() && !has_token {
        bail!("--admin {addr} is reachable from other machines: set --admin-token (or bind 127.0.0.1, or a Unix socket path)");
    }
    Ok(Some(addr))
}

// --- Upstreams (#11). ---

fn parse_upstream(cli: &Cli) -> anyhow::Result<crate::upstream::Settings> {
    let upstreams = cli
        .upstreams
        .iter()
        .map(|raw| crate::upstream::spec::parse(raw.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let resolvers = cli
        .resolvers
        .iter()
        .map(|raw| parse_resolver(raw.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(crate::upstream::Settings {
        upstreams,
        resolvers,
        resolve_interval: parse_nonzero_duration("--resolve-interval", &cli.resolve_interval)?,
    })
}

/// `IP:PORT`, `[v6]:PORT`, or a bare IP for port 53.
fn parse_resolver(raw: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    match raw.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => bail!("--resolver {raw:?}: expected IP:PORT (e.g. 127.0.0.11:53, [::1]:53) or IP"),
    }
}

/// What remote backends need of the rest: a mode where the master accepts clients, and
/// workers or upstreams to send them to.
fn check_upstreams(config: &Config) -> anyhow::Result<()> {
    let upstreams = &config.upstream.upstreams;
    if config.workers == 0 && upstreams.is_empty() {
        // Not "--cpus 0: …": a config file would blame its `cpus` key alone for what is
        // about two flags.
        bail!("nothing to balance: --cpus 0 spawns no worker, so at least one --upstream is needed (a pure reverse proxy)");
    }
    if !upstreams.is_empty() && matches!(config.mode, Mode::Shared | Mode::ReusePort) {
        bail!(
            "--upstream needs --mode proxy or handoff: in {} mode the workers accept clients themselves",
            config.mode
        );
    }
    if let Some(fixed) = upstreams.iter().find_map(|u| u.fixed()) {
        if fixed == config.listen {
            bail!("--upstream {fixed}: that is balancer's own --listen address");
        }
    }
    Ok(())
}

fn parse_health(cli: &Cli) -> anyhow::Result<HealthConfig> {
    let path = cli.health_http.clone();
    if let Some(p) = &path {
        if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("--health-http {p:?}: expected a path starting with / and without spaces");
        }
    }
    let kind = match (cli.health_check, path) {
        (CheckArg::Auto, None) => CheckKind::Auto,
        (CheckArg::Auto | CheckArg::Http, Some(p)) => CheckKind::Http(p),
        (CheckArg::Http, None) => CheckKind::Http("/healthz".to_owned()),
        (CheckArg::Tcp, None) => CheckKind::Tcp,
        (CheckArg::Ipc, None) => CheckKind::Ipc,
        (_, Some(_)) => bail!("--health-http goes with --health-check http or auto"),
    };
    let interval = parse_nonzero_duration("--health-interval", &cli.health_interval)?;
    let timeout = parse_nonzero_duration("--health-timeout", &cli.health_timeout)?;
    if cli.health_rise == 0 || cli.health_fall == 0 {
        bail!("--health-rise and --health-fall must be at least 1");
    }
    Ok(HealthConfig {
        kind,
        interval,
        timeout,
        rise: cli.health_rise,
        fall: cli.health_fall,
    })
}

/// `IP:PORT`, `[v6]:PORT`, `:PORT` (all IPv4 addresses), or `HOST:PORT`. A host name is
/// resolved once, here, at start-up (the system resolver: `/etc/hosts`, then DNS); the
/// address bound is [`pick_address`]'s choice, and the name comes back with all its
/// addresses so the log can say which one that is.
fn parse_listen(raw: &str) -> anyhow::Result<(SocketAddr, Option<ResolvedName>)> {
    let expected = "expected IP:PORT (e.g. 0.0.0.0:8080, [::1]:8080), HOST:PORT (e.g. localhost:8080) or :PORT";
    if let Some(addr) = worker::protocol::parse_listen(raw) {
        return Ok((addr, None));
    }
    if raw.starts_with(':') {
        bail!("--listen {raw:?}: not a port number");
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        bail!("--listen {raw:?}: {expected}");
    };
    let port: u16 = port.parse().map_err(|_| {
        anyhow::anyhow!("--listen {raw:?}: {port:?} is not a port number; {expected}")
    })?;
    if host.is_empty() || host.contains([':', '[', ']', ' ', '/']) {
        bail!("--listen {raw:?}: {expected}");
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let found = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("--listen {raw:?}: resolving {host:?}"))?;
    for addr in found {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    let addr = pick_address(&addrs)
        .with_context(|| format!("--listen {raw:?}: {host:?} has no address"))?;
    Ok((
        addr,
        Some(ResolvedName {
            name: raw.to_owned(),
            addrs,
        }),
    ))
}

/// The one address of a resolved `--listen` name that is bound: the first IPv4 one (what
/// `:PORT` and most clients' first try agree on), else the first. One address, not all: the
/// shared and reuseport modes hand workers one socket or one address, and every mode should
/// serve the same set of addresses.
pub fn pick_address(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

/// `auto` or a whole number from 1 to [`MAX_WORKERS`].
fn parse_cpus(raw: &str) -> anyhow::Result<usize> {
    if raw.eq_ignore_ascii_case("auto") {
        // Honours sched affinity and cgroup v1/v2 CPU quotas (rounded down, at least 1).
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    match raw.parse::<usize>() {
        // 0 is valid with an --upstream (see `check_upstreams`).
        Ok(n) if n <= MAX_WORKERS => Ok(n),
        _ => bail!("--cpus {raw:?}: expected `auto` or a whole number from 1 to {MAX_WORKERS}"),
    }
}

fn parse_duration(flag: &str, raw: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(raw.trim())
        .map_err(|e| anyhow::anyhow!("{flag} {raw:?}: {e} (expected e.g. 30s, 500ms, 2m)"))
}

fn parse_nonzero_duration(flag: &str, raw: &str) -> anyhow::Result<Duration> {
    let d = parse_duration(flag, raw)?;
    if d.is_zero() {
        bail!("{flag} {raw:?}: must be more than zero");
    }
    Ok(d)
}

/// Whether `program` is Node.js (`node`, `nodejs`, `node20`, a path to one of them).
fn is_node(program: &str) -> bool {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let rest = name
        .strip_prefix("nodejs")
        .or_else(|| name.strip_prefix("node"));
    rest.is_some_and(|r| r.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// Resolves the worker command now, so a typo fails at start-up with one clear line instead
/// of a crash loop of workers that cannot exec.
fn parse_program(command: &[String]) -> anyhow::Result<WorkerProgram> {
    let Some((program, args)) = command.split_first() else {
        return Ok(WorkerProgram::Builtin);
    };
    if program.is_empty() {
        bail!("worker command is empty");
    }
    let resolved = resolve_executable(program)?;
    Ok(WorkerProgram::Command {
        program: resolved,
        args: args.to_vec(),
    })
}

fn resolve_executable(program: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        let meta = path
            .metadata()
            .with_context(|| format!("worker command {program:?}"))?;
        if !meta.is_file() {
            bail!("worker command {program:?} is not a file");
        }
        if !is_executable(&path) {
            bail!("worker command {program:?} is not executable");
        }
        return Ok(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .with_context(|| format!("worker command {program:?} not found in PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        let addr = |raw: &str| parse_listen(raw).map(|(a, _)| a);
        assert_eq!(addr(":8080").unwrap(), "0.0.0.0:8080".parse().unwrap());
        assert_eq!(addr("127.0.0.1:0").unwrap().port(), 0);
        assert!(addr("[::1]:80").unwrap().is_ipv6());
        assert!(parse_listen("[::1]:80").unwrap().1.is_none());
        assert!(addr("localhost").is_err());
        assert!(addr(":99999").is_err());
        assert!(addr("1.2.3.4").is_err());
        assert!(addr("localhost:http").is_err());
        assert!(addr(":8080:").is_err());
        let (local, name) = parse_listen("localhost:8080").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8080, "{local}");
        let name = name.expect("a resolved name");
        assert_eq!(name.name, "localhost:8080");
        assert!(name.addrs.contains(&local));
    }

    #[test]
    fn first_ipv4_address_is_bound() {
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(pick_address(&[v6, v4]), Some(v4));
        assert_eq!(pick_address(&[v6]), Some(v6));
        assert_eq!(pick_address(&[]), None);
    }

    #[test]
    fn cpus_forms() {
        assert!(parse_cpus("auto").unwrap() >= 1);
        assert_eq!(parse_cpus("3").unwrap(), 3);
        assert_eq!(parse_cpus("0").unwrap(), 0);
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("two").is_err());
        assert!(parse_cpus("100000").is_err());
        assert!(parse_cpus("99999999999999999999999").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("--grace", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_duration("--grace", "soon").is_err());
        assert!(parse_nonzero_duration("--ready-timeout", "0s").is_err());
    }

    #[test]
    fn resolver_forms() {
        assert_eq!(
            parse_resolver("127.0.0.11").unwrap(),
            "127.0.0.11:53".parse().unwrap()
        );
        assert_eq!(parse_resolver("[::1]:5353").unwrap().port(), 5353);
        assert!(parse_resolver("1.2.3.4:0").is_err());
        assert!(parse_resolver("dns.example:53").is_err());
    }

    #[test]
    fn cpus_zero_needs_an_upstream() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("balancer").chain(args.iter().copied()))
                .unwrap();
            Config::try_from(&cli)
        };
        let err = parse(&["--cpus", "0"]).unwrap_err().to_string();
        assert!(err.contains("--cpus 0"), "{err}");
        let pure = parse(&["--cpus", "0", "--upstream", "127.0.0.2:8080"]).unwrap();
        assert_eq!((pure.workers, pure.upstream.upstreams.len()), (0, 1));
        let mixed = parse(&[
            "--cpus",
            "2",
            "--upstream",
            "app:80",
            "--upstream",
            "[::1]:81",
        ])
        .unwrap();
        assert_eq!(mixed.upstream.upstreams.len(), 2);
        assert!(parse(&["--cpus", "0", "--upstream", "app"]).is_err());
        assert!(parse(&["--cpus", "0", "--upstream", "app:0"]).is_err());
        assert!(parse(&["--cpus", "0", "--upstream", "app:65536"]).is_err());
        assert!(parse(&["--mode", "shared", "--upstream", "app:80"]).is_err());
        assert!(parse(&["--upstream", "app:80", "--resolve-interval", "0s"]).is_err());
    }

    #[test]
    fn node_programs() {
        assert!(is_node("node") && is_node("/usr/bin/nodejs") && is_node("node20"));
        assert!(!is_node("nodemon") && !is_node("python3") && !is_node("./my-node-app"));
    }

    #[test]
    fn programs() {
        assert_eq!(parse_program(&[]).unwrap(), WorkerProgram::Builtin);
        assert!(matches!(
            parse_program(&["sh".into()]).unwrap(),
            WorkerProgram::Command { .. }
        ));
        assert!(parse_program(&["definitely-not-a-command-xyz".into()]).is_err());
        let not_executable =
            std::env::temp_dir().join(format!("balancer-noexec-{}", std::process::id()));
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        let plain = parse_program(&[not_executable.display().to_string()]);
        let _ = std::fs::remove_file(&not_executable);
        assert!(plain.is_err());
        assert!(parse_program(&["/nonexistent/x".into()]).is_err());
        assert!(parse_program(&["/tmp".into()]).is_err());
    }
}
