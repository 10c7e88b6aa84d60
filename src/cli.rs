//! Command-line flags, exactly as the user typed them. [`crate::config`] validates them.

use clap::{Parser, Subcommand, ValueEnum};

/// balancer: spawn one worker per CPU, learn their ports over IPC, spread connections over
/// them round-robin, and replace any worker that dies.
#[derive(Debug, Parser)]
#[command(
    name = "balancer",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Where clients connect (IP:PORT, or :PORT for all IPv4 addresses, or HOST:PORT,
    /// resolved once at start: its first IPv4 address is bound, and the log says which; port
    /// 0 picks a free port, and the log shows the real one).
    #[arg(short, long, default_value = "0.0.0.0:80", env = "BALANCER_LISTEN")]
    pub listen: String,

    /// How many workers: `auto` (the CPUs this process may use, cgroup quota and affinity
    /// included) or a number.
    #[arg(short, long, default_value = "auto", env = "BALANCER_CPUS")]
    pub cpus: String,

    /// How long a graceful stop waits for open connections (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s")]
    pub grace: String,

    /// How long a worker may take to announce `ready` before it is killed and replaced.
    #[arg(long, default_value = "10s")]
    pub ready_timeout: String,

    /// How workers serve clients: `proxy` (the master accepts and forwards each connection to
    /// a worker's own loopback port), `shared` (the master hands its listening socket to every
    /// worker, which accept on it directly), `reuseport` (each worker binds --listen itself
    /// with SO_REUSEPORT), `handoff` (the master accepts and passes each connection's socket
    /// to a worker, then is out of the data path).
    #[arg(long, value_enum, default_value_t = ModeArg::Proxy)]
    pub mode: ModeArg,

    /// Be the primary of Node's `cluster` module: start workers with NODE_UNIQUE_ID, so an
    /// unchanged cluster program's `server.listen()` is served by balancer. `auto`: for Node
    /// programs (the command is `node`), except in shared mode, where a Node worker more
    /// likely waits for the listening socket as `process.on('message', (m, server) => …)`.
    #[arg(long, value_enum, default_value_t = NodeClusterArg::Auto)]
    pub node_cluster: NodeClusterArg,

    /// How a worker announces it is ready: `ipc` (it sends `ready` over the channel, or in
    /// shared mode acknowledges the listener), `port` (for programs that know nothing of IPC:
    /// in proxy mode the master picks a free loopback port, passes it as PORT and in place of
    /// `{port}` in the command's arguments, and waits until it accepts connections; in
    /// reuseport mode, ready once the worker listens on --listen), or `spawn` (ready once
    /// started; shared and reuseport modes only, where a worker that is not yet accepting
    /// takes no connections).
    #[arg(long, value_enum, default_value_t = ReadyArg::Ipc)]
    pub ready: ReadyArg,

    /// How the next worker is chosen for a new connection.
    #[arg(long, value_enum, default_value_t = BalanceArg::RoundRobin)]
    pub balance: BalanceArg,

    /// Active health check: `auto` (HTTP /healthz for the built-in worker, IPC ping for
    /// workers that announce it, TCP connect otherwise), `tcp`, `http`, or `ipc`.
    #[arg(long, value_enum, default_value_t = CheckArg::Auto)]
    pub health_check: CheckArg,

    /// Path for the HTTP health check (implies `--health-check http` unless another kind is
    /// given).
    #[arg(long, value_name = "PATH")]
    pub health_http: Option<String>,

    /// Time between health checks of one worker.
    #[arg(long, default_value = "1s")]
    pub health_interval: String,

    /// How long one health check may take.
    #[arg(long, default_value = "1s")]
    pub health_timeout: String,

    /// Successful checks in a row that bring a worker back into rotation.
    #[arg(long, default_value_t = 2)]
    pub health_rise: u32,

    /// Failed checks in a row that take a worker out of rotation (as many more replace it).
    #[arg(long, default_value_t = 3)]
    pub health_fall: u32,

    /// How long a connect to a worker may take before the client is offered to the next.
    #[arg(long, default_value = "1s")]
    pub connect_timeout: String,

    /// Close a proxied connection after this long with no bytes either way (0 = never).
    /// Accurate to 1/16 of the shorter of the two timeouts.
    #[arg(long, default_value = "60s")]
    pub idle_timeout: String,

    /// Close a proxied connection once the worker has sent nothing back for this long after
    /// the client's last bytes, and count it as a passive failure of the worker (as many
    /// in a row as --health-fall take it out of rotation). HAProxy's `timeout server`.
    /// 0 = never; raise it for protocols where the client talks and the server stays quiet.
    #[arg(long, default_value = "30s")]
    pub response_timeout: String,

    /// Pass a worker's half-close on to the client and go on copying the client's bytes
    /// until it closes too, for protocols whose server shuts its write side first and keeps
    /// reading. Without it (as nginx's `proxy_half_close off`), a worker's EOF ends the
    /// connection once its bytes are delivered: one close, no shutdown and no wait for the
    /// client's FIN. A client's half-close is always passed on.
    #[arg(long)]
    pub half_close: bool,

    /// How the master's proxy threads run the tcp data path: `tokio` (the default: every
    /// feature) or `epoll` (one edge-triggered epoll loop per thread that owns its sockets:
    /// no `epoll_ctl(DEL)` per socket and no self-wake, see bench/NOTES.md). `epoll` is for
    /// --mode proxy with --protocol tcp, without TLS, --send-proxy or --accept-proxy; other
    /// combinations are refused at start.
    #[arg(long, value_enum, default_value_t = EngineArg::Tokio)]
    pub engine: EngineArg,

    // PROXY protocol (#11): the client's address across load balancers.
    /// Start every connection to a worker with a PROXY protocol header (`v1` text or `v2`
    /// binary) carrying the real client address and port. Proxy mode only: in the other
    /// modes the worker holds the client socket itself and sees the address.
    #[arg(long, value_name = "VERSION")]
    pub send_proxy: Option<String>,

    /// balancer sits behind other load balancers: a connection from one of these sources
    /// (`CIDR[,CIDR…]`, or addresses) must start with a valid PROXY v1 or v2 header, whose
    /// source becomes the client address; one that does not is closed (and counted).
    /// Connections from elsewhere are taken as they are. Proxy mode only.
    #[arg(long, value_name = "CIDRS")]
    pub accept_proxy: Option<String>,

    /// At most this many client connections are open at once; more wait in the kernel's
    /// listen backlog until one closes. Default: as many as the open-file limit allows
    /// (two fds each), at most 100000.
    #[arg(long)]
    pub max_conns: Option<usize>,

    /// How many proxy threads accept and serve clients (proxy and handoff modes), each with
    /// its own `SO_REUSEPORT` listener and runtime. Default: one per CPU this process may
    /// use. Where the workers (or the clients) share those CPUs, fewer threads spend less
    /// CPU per request (bench/NOTES.md).
    #[arg(long, value_name = "N")]
    pub proxy_threads: Option<usize>,

    /// What happens to the workers' stdout and stderr: `prefix` writes each line to the
    /// master's stderr tagged with slot and pid; `inherit` shares the master's; `ignore`
    /// discards them.
    #[arg(long, value_enum, default_value_t = WorkerOutput::Prefix)]
    pub worker_output: WorkerOutput,

    /// Serve `/status` (JSON), `/metrics` (Prometheus), `/healthz`, and the changes `POST
    /// /reload` on this address: IP:PORT (e.g. 127.0.0.1:9000), or a Unix socket path with a /
    /// in it (created mode 0600, removed at exit). Off by default. Over TCP, changes need
    /// --admin-token; a non-loopback TCP address without one is refused.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// The Bearer token that changes over a TCP --admin need (`Authorization: Bearer TOKEN`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BALANCER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    // --- Upstreams (#11): backends balancer did not spawn. ---
    /// A backend balancer did not spawn, in the same rotation as the workers: HOST:PORT,
    /// with HOST an IP address ([v6] in brackets) or a DNS name whose every A/AAAA record is
    /// a backend. Repeatable; with `--cpus 0`, balancer is a pure reverse proxy.
    #[arg(
        long = "upstream",
        value_name = "HOST:PORT",
        env = "BALANCER_UPSTREAMS",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,

    /// A DNS server for upstream names (IP:PORT, or IP for port 53). Repeatable. Default: the
    /// nameservers of /etc/resolv.conf (Docker's embedded DNS, Kubernetes cluster DNS).
    #[arg(long = "resolver", value_name = "IP:PORT")]
    pub resolvers: Vec<String>,

    /// How often upstream names are looked up again (sooner when their records' TTL is
    /// shorter, never more than once a second).
    #[arg(long, default_value = "5s")]
    pub resolve_interval: String,

    // Operations (#14): the privilege drop, in src/privilege.rs.
    /// Run as this user (a name, or a uid): the master binds --listen and --admin as root,
    /// then drops to the user for good before it spawns any worker, so the workers and the
    /// master run unprivileged. Supplementary groups are reduced to the one group.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// With --user: the group to run as (a name, or a gid), instead of the user's primary
    /// group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    // Operations (ops): config file and its check.
    /// Read settings from this TOML file: every long flag is a key (`listen = ":8080"`, `cpus
    /// = 4`, `command = ["node", "app.js"]`); flags and BALANCER_* variables override it.
    /// SIGHUP reads it again.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Check the flags and --config file, print `configuration ok` and exit 0 (or print the
    /// error and exit 1); binds nothing, starts nothing.
    #[arg(short = 't', long)]
    pub check: bool,

    /// Log lines as `text` (human-readable) or `json` (one object per line, the same fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub quiet: u8,

    /// The worker program and its arguments (started directly, no shell). Without it, each
    /// worker is balancer's built-in HTTP worker.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// `--protocol`, the HTTP path's flags and TLS termination (#12).
    #[command(flatten)]
    pub http: HttpArgs,

    #[command(subcommand)]
    pub subcommand: Option<Sub>,
}

/// Hidden subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Run as a built-in worker (the master starts its own executable this way).
    #[command(hide = true)]
    Worker,
    /// Set `LISTEN_PID` to this process's pid and exec the command (shared mode, for
    /// programs that take the listener from fd 3 the systemd way).
    #[command(name = "exec-with-listen-pid", hide = true)]
    ExecWithListenPid {
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },

    // Operator subcommands: clients of a running master's admin endpoint (src/client/).
    /// Exit 0 if the master's /healthz answers 200 (a worker is in rotation), else print why
    /// and exit 1: a container health check for an image without curl.
    Health(ClientArgs),
    /// Show the master's workers: slot, pid, state, address, uptime, restarts, connections
    /// and last exit.
    Status(StatusArgs),
    /// Replace every worker, one at a time, as SIGHUP does.
    Reload(ClientArgs),
    /// Change the number of workers: N, +K or -K (as SIGTTIN/SIGTTOU by one). A removed
    /// worker leaves rotation and drains before it stops.
    Scale(ScaleArgs),
    /// A live view of the master, refreshed every --interval: workers (pid, state,
    /// connections, restarts, uptime), remote upstreams, and connections (or requests) per
    /// second as sparklines, total and per worker. q, Esc or Ctrl-C quits.
    Top(TopArgs),
    /// Re-execute the master's binary in the same pid (as SIGUSR2), keeping its listeners
    /// and workers; waits until the new image serves.
    Upgrade(ClientArgs),
}

/// `balancer top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// How often to ask the master (at least 100ms).
    #[arg(long, default_value = "1s")]
    pub interval: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// `balancer scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// N (exactly), +K (more) or -K (fewer).
    #[arg(allow_hyphen_values = true, value_name = "N|+K|-K")]
    pub workers: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// `balancer status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the master's /status document as it is, instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags every operator subcommand takes: where the master's admin endpoint is.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The master's admin endpoint: IP:PORT, or a Unix socket path (with a / in it).
    #[arg(long, value_name = "ADDR", env = "BALANCER_ADMIN")]
    pub admin: Option<String>,

    /// Bearer token, for changes (reload, scale) over a TCP admin endpoint.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BALANCER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// How long to wait for the master's answer.
    #[arg(long, default_value = "5s")]
    pub timeout: String,
}

/// See [`Cli::log_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-12-01T10:00:00.000000Z  INFO listening addr=…`.
    Text,
    /// `{"timestamp":"…","level":"INFO","message":"listening","addr":"…"}`.
    Json,
}

/// See [`Cli::ready`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadyArg {
    /// `{"type":"ready","port":P}` over the IPC channel (or the listener's acknowledgement).
    Ipc,
    /// The master assigns the port and probes it (reuseport: watches for the listener).
    Port,
    /// Ready once started.
    Spawn,
}

/// See [`Cli::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The master forwards every connection.
    Proxy,
    /// Workers accept on the master's listening socket.
    Shared,
    /// Workers bind the address themselves with SO_REUSEPORT.
    Reuseport,
    /// The master accepts and hands each connection's socket to a worker.
    Handoff,
}

/// See [`Cli::engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// tokio's runtime per proxy thread.
    Tokio,
    /// An epoll loop of balancer's own per proxy thread (plain tcp proxying only).
    Epoll,
}

/// See [`Cli::node_cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeClusterArg {
    /// On for Node programs, except in shared mode.
    Auto,
    /// Always set NODE_UNIQUE_ID.
    On,
    /// Never.
    Off,
}

/// See [`Cli::balance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BalanceArg {
    /// Each new connection to the next worker in turn.
    RoundRobin,
    /// The worker with the fewest open connections (ties round-robin).
    LeastConn,
}

/// See [`Cli::health_check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckArg {
    /// Chosen per worker.
    Auto,
    /// TCP connect.
    Tcp,
    /// HTTP GET expecting 2xx.
    Http,
    /// IPC ping/pong.
    Ipc,
}

/// See [`Cli::worker_output`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerOutput {
    /// Each line to the master's stderr, prefixed with the worker's slot and pid.
    Prefix,
    /// The worker writes straight to the master's stdout and stderr.
    Inherit,
    /// Discarded.
    Ignore,
}

// ---- `--protocol`, HTTP and TLS flags (#12); validated in src/protocol.rs ----

/// `--protocol` and the flags of the HTTP path and of TLS termination.
#[derive(Debug, clap::Args)]
pub struct HttpArgs {
    /// What the master speaks to clients (--mode proxy): `tcp` forwards each connection's
    /// bytes to one worker; `http` balances each request (--balance per request, least-conn
    /// counting requests in flight) over pooled keep-alive connections to the workers.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    pub protocol: ProtocolArg,

    /// http: a worker that takes longer than this to answer gets the client a 504
    /// (default 60s).
    #[arg(long, value_name = "DURATION")]
    pub request_timeout: Option<String>,

    /// http: a client must send a whole request head within this, or gets a 408 and is
    /// closed (default 10s). --idle-timeout closes idle keep-alive clients.
    #[arg(long, value_name = "DURATION")]
    pub header_timeout: Option<String>,

    /// http: largest request body, in bytes (K, M, G suffixes: powers of 1024); larger is
    /// a 413. Default: no limit.
    #[arg(long, value_name = "SIZE")]
    pub max_body: Option<String>,

    /// http: peers whose X-Forwarded-For/-Proto/-Host and Forwarded headers are kept and
    /// appended to (IP or CIDR, comma-separated). From anyone else they are replaced.
    #[arg(long, value_name = "CIDR,...")]
    pub trusted_proxies: Option<String>,

    /// http: log one line per request (client, method, path, status, bytes, duration,
    /// backend) at info level, target `balancer::access`.
    #[arg(long)]
    pub access_log: bool,

    /// Terminate TLS on the listener with this certificate chain (PEM, leaf first). In
    /// http mode ALPN offers h2 and http/1.1. SIGHUP reloads it (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// tcp with --tls-cert: a client must finish its TLS handshake within this, or is
    /// closed (default 10s). In http mode the handshake counts toward --header-timeout.
    #[arg(long, value_name = "DURATION", requires = "tls_cert")]
    pub tls_handshake_timeout: Option<String>,
}

/// See [`HttpArgs::protocol`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// Per-connection byte forwarding.
    Tcp,
    /// Per-request HTTP balancing.
    Http,
}
