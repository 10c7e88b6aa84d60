//! Starting one worker process: its command line, its environment, the IPC socketpair it
//! inherits, and the guarantees set up between `fork` and `exec`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Stdio;

use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::cli::WorkerOutput;
use crate::config::WorkerProgram;
use worker::activation::{ENV_LISTEN_FDNAMES, ENV_LISTEN_FDS, ENV_LISTEN_PID, LISTEN_FDS_START};
use worker::protocol::{Mode, ENV_IPC_FD, ENV_LISTEN, ENV_MODE, ENV_WORKER_ID};

/// Hidden subcommand: set `LISTEN_PID` to this process's pid, then exec the rest.
pub const EXEC_WITH_LISTEN_PID: &str = "exec-with-listen-pid";

/// A freshly started worker.
#[derive(Debug)]
pub struct Spawned {
    /// The process; dropping it kills the worker (`kill_on_drop`), a last safety net.
    pub child: Child,
    /// Its pid, kept apart from `child` because `Child::id` is `None` once it is reaped.
    pub pid: u32,
    /// The master's end of the IPC channel.
    pub ipc: UnixStream,
}

/// Node.js's IPC variables: a Node program started with these treats the fd as the channel
/// of `child_process.fork`, so `process.send` and `process.on('message')` work unchanged.
/// The framing (one JSON value per line) is balancer's own.
const NODE_CHANNEL_FD: &str = "NODE_CHANNEL_FD";
const NODE_CHANNEL_SERIALIZATION_MODE: &str = "NODE_CHANNEL_SERIALIZATION_MODE";

/// What one worker is started with.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The program.
    pub program: &'a WorkerProgram,
    /// Its slot (`BALANCER_WORKER_ID`).
    pub slot: usize,
    /// Where its stdout and stderr go.
    pub output: WorkerOutput,
    /// With `--ready port`: the port it must listen on (`PORT`, and `{port}` in arguments).
    pub port: Option<u16>,
    /// How it serves clients (`BALANCER_MODE`).
    pub mode: Mode,
    /// The client address (`BALANCER_LISTEN`; what a reuseport worker binds).
    pub listen: SocketAddr,
    /// Node cluster worker number (`NODE_UNIQUE_ID`), when balancer is its primary.
    pub node_unique_id: Option<usize>,
    /// Shared mode: the listening socket, also given as fd 3 with systemd's `LISTEN_FDS`
    /// convention for programs that do not read the IPC channel.
    pub listen_fd: Option<RawFd>,
}

/// The child's end of the channel is moved at or above this fd, so it never sits on fd 3.
const IPC_FD_MIN: RawFd = 10;

/// Starts one worker. Must be called from a thread that lives as long as the master (the
/// supervisor's thread): `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
/// exits, not the process.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    // Both ends are close-on-exec; only the child's copy of its end loses that flag, after
    // the fork, so no other worker spawned concurrently can inherit it.
    let (master_end, child_end) = StdUnixStream::pair()?;
    // Keep the child's end off fd 3 (systemd's first socket) and the low numbers.
    let child_end: OwnedFd = {
        let fd = nix::fcntl::fcntl(
            child_end.as_raw_fd(),
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(IPC_FD_MIN),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let child_fd = child_end.as_raw_fd();

    let mut cmd = command(spec, child_fd)?;
    arm_pre_exec(&mut cmd, child_fd, spec.listen_fd);
    let child = cmd.spawn()?;
    // The master must not keep the child's end: only then does the master see EOF on the
    // channel when the worker dies.
    drop(cmd);
    drop(child_end);
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("worker exited before its pid was read"))?;
    master_end.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        pid,
        ipc: UnixStream::from_std(master_end)?,
    })
}

/// A command that runs the master's own image: `/proc/self/exe`, resolved in the child
/// after the fork, is the very file this master runs, even once a deployment has renamed a
/// new binary over its path (`current_exe()` then ends in ` (deleted)` and cannot be run) or
/// put a broken one there. A built-in worker must speak this master's protocol, so it comes
/// from this image; the new binary takes over only through an in-place upgrade. `argv[0]`
/// stays the path the master was started by, so `ps` shows a name, not `/proc/self/exe`.
fn own_image() -> Command {
    let mut c = Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        c.arg0(arg0);
    }
    c
}

/// The worker's command line, environment and stdio; `child_fd` is its end of the channel.
fn command(spec: &SpawnSpec<'_>, child_fd: RawFd) -> io::Result<Command> {
    let SpawnSpec {
        program,
        slot,
        output,
        port,
        mode,
        listen,
        node_unique_id,
        listen_fd,
    } = *spec;
    let mut cmd = match program {
        WorkerProgram::Builtin => {
            let mut c = own_image();
            c.arg("worker");
            c
        }
        WorkerProgram::Command { program, args } if listen_fd.is_some() => {
            // systemd's LISTEN_PID must be the worker's own pid, known only after fork: let
            // this executable set it and exec the program (same pid, same fds).
            let mut c = own_image();
            c.arg(EXEC_WITH_LISTEN_PID)
                .arg("--")
                .arg(program)
                .args(args);
            c
        }
        WorkerProgram::Command { program, args } => {
            let mut c = Command::new(program);
            match port {
                Some(port) => c.args(args.iter().map(|a| a.replace("{port}", &port.to_string()))),
                None => c.args(args),
            };
            c
        }
    };
    cmd.env(ENV_IPC_FD, child_fd.to_string())
        .env(NODE_CHANNEL_FD, child_fd.to_string())
        .env(NODE_CHANNEL_SERIALIZATION_MODE, "json")
        .env(ENV_WORKER_ID, slot.to_string())
        // systemd's notifications are the master's: a worker that speaks sd_notify itself
        // must not tell the service manager it is ready (or stopping) for the master.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        // Its own process group: a terminal's Ctrl-C reaches only the master, which then
        // stops the workers in order; and the master can signal a worker's whole group.
        .process_group(0);
    if let Some(port) = port {
        cmd.env("PORT", port.to_string());
    }
    cmd.env(ENV_MODE, mode.as_str())
        .env(ENV_LISTEN, listen.to_string());
    if let Some(id) = node_unique_id {
        cmd.env(worker::node::ENV_NODE_UNIQUE_ID, id.to_string());
    }
    if port.is_none() && mode != Mode::Proxy {
        // Workers that listen themselves (or through balancer as their cluster primary) are
        // told the client port, so `listen(process.env.PORT)` agrees with balancer's.
        cmd.env("PORT", listen.port().to_string());
    }
    if listen_fd.is_some() {
        cmd.env(ENV_LISTEN_FDS, "1")
            .env(ENV_LISTEN_FDNAMES, "balancer");
    }
    let (stdout, stderr) = match output {
        WorkerOutput::Prefix => (Stdio::piped(), Stdio::piped()),
        WorkerOutput::Inherit => (Stdio::inherit(), Stdio::inherit()),
        WorkerOutput::Ignore => (Stdio::null(), Stdio::null()),
    };
    cmd.stdout(stdout).stderr(stderr);
    Ok(cmd)
}

/// What runs in the child between fork and exec: `PR_SET_PDEATHSIG` (checked against a race
/// with `getppid`), the channel's end kept open across exec, the shared listener as fd 3.
fn arm_pre_exec(cmd: &mut Command, child_fd: RawFd, listen_fd: Option<RawFd>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
    // are allowed. prctl, getppid and fcntl are system calls: no allocation, no locks. The
    // closure captures only two integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The master may have died between fork and prctl: then the signal was never
            // armed, so do not start an orphan.
            if libc::getppid() != parent {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            // Clear close-on-exec on the child's end (dup2 onto itself would not).
            if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = listen_fd {
                // dup2 leaves the new fd without close-on-exec; if the listener already is
                // fd 3, clear the flag instead.
                let r = if fd == LISTEN_FDS_START {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, LISTEN_FDS_START)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A free loopback port for a `--ready port` worker: bound and released at once, so another
/// program could take it in between; the worker's admission then fails and it is replaced.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Sends `signal` to the worker's process group (falling back to the process alone if it
/// left the group). Only call while the worker is unreaped, so the pid cannot have been
/// reused by a process balancer did not start.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    use nix::sys::signal::{kill, killpg};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(pid as i32);
    if killpg(pid, signal).is_err() {
        let _ = kill(pid, signal);
    }
}

/// The body of the hidden `exec-with-listen-pid -- PROGRAM ARGS...` subcommand: completes
/// systemd's socket-activation environment (`LISTEN_PID` = own pid) and execs the program.
/// Returns only on failure.
pub fn exec_with_listen_pid(command: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = command.split_first() else {
        return io::Error::other("exec-with-listen-pid: no program given");
    };
    std::process::Command::new(program)
        .args(args)
        .env(ENV_LISTEN_PID, std::process::id().to_string())
        .exec()
}
