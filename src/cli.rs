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
    /// Where clients connect (IP:PORT, or :PORT for all IPv4 addresses; port 0 picks a free
    /// port, and the log shows the real one).
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

    /// At most this many client connections are open at once; more wait in the kernel's
    /// listen backlog until one closes.
    #[arg(long, default_value_t = 10_000)]
    pub max_conns: usize,

    /// What happens to the workers' stdout and stderr: `prefix` writes each line to the
    /// master's stderr tagged with slot and pid; `inherit` shares the master's; `ignore`
    /// discards them.
    #[arg(long, value_enum, default_value_t = WorkerOutput::Prefix)]
    pub worker_output: WorkerOutput,

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

    #[command(subcommand)]
    pub subcommand: Option<Sub>,
}

/// Hidden subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Run as a built-in worker (the master starts its own executable this way).
    #[command(hide = true)]
    Worker,
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
