//! `balancer top`: a live view of a running master, refreshed every `--interval`, like
//! `pm2 monit` or `htop`. A thread polls the admin endpoint ([`poll`]); the main thread
//! folds the answers into the [`model`], draws it ([`view`]) and reads keys. A master
//! unreachable at the start is an error (one line, exit 1, like `balancer status`); one
//! that goes away later is shown in the view and asked again until it answers or the
//! operator quits: with q, Esc or Ctrl-C, or by a SIGTERM, SIGHUP (the terminal closed) or
//! SIGINT from outside, after which the terminal is restored and the exit code is 0.

mod model;
mod poll;
mod terminal;
mod view;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use super::Endpoint;
use crate::cli::TopArgs;

/// How long the main thread waits for a key before it looks for a new answer: short enough
/// that an answer is on screen within a tenth of a second of arriving.
const KEY_WAIT: Duration = Duration::from_millis(100);

/// Signals that end `top` the way `q` does. Their default action kills the process on the
/// spot, leaving the shell in raw mode on the alternate screen; a handler only sets a flag
/// (nothing else is async-signal-safe), and the loop below sees it within [`KEY_WAIT`].
const STOP_SIGNALS: [libc::c_int; 3] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGINT,
];

/// Runs the view until `q`, Esc or Ctrl-C, or one of [`STOP_SIGNALS`].
pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_args(&args.client)?;
    let interval = humantime::parse_duration(args.interval.trim())
        .ok()
        .filter(|d| *d >= Duration::from_millis(100))
        .with_context(|| {
            format!(
                "--interval {:?}: expected a duration of at least 100ms, e.g. 1s",
                args.interval
            )
        })?;
    let admin = endpoint.addr.to_string();
    let every = humantime::format_duration(interval).to_string();
    let mut model = model::Model::default();
    model.observe(poll::fetch(&endpoint)?);
    // Checked after the master answered, so that a wrong --admin is reported first, as by
    // the other subcommands. Without it, crossterm would take /dev/tty behind a redirected
    // stdout and draw escape codes into the file.
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("balancer top draws on a terminal, and stdout is not one (balancer status prints a table)");
    }
    let answers = poll::spawn(endpoint, interval)?;
    // Before the terminal changes: a signal from here on finds it restored.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in STOP_SIGNALS {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("handling signal {sig}"))?;
    }
    let mut screen = terminal::Screen::enter()?;
    let labels = view::Labels {
        admin: &admin,
        every: &every,
    };
    let mut dirty = true;
    loop {
        if stop.load(Ordering::Relaxed) {
            // `screen` restores the terminal as it is dropped.
            return Ok(());
        }
        if dirty {
            let drawn = screen
                .terminal
                .draw(|frame| view::draw(frame, &model, &labels));
            match drawn {
                Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
                r => r.context("drawing")?,
            };
            dirty = false;
        }
        // A signal can interrupt the wait (EINTR), and after a SIGHUP the terminal may be
        // gone (EIO): either is the way out the signal asked for, not an error.
        let ready = match event::poll(KEY_WAIT) {
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            r => r.context("reading the terminal")?,
        };
        if ready {
            let read = match event::read() {
                Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
                r => r.context("reading the terminal")?,
            };
            match read {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        loop {
            match answers.try_recv() {
                Ok(Ok(sample)) => model.observe(sample),
                Ok(Err(e)) => model.unreachable(e),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => anyhow::bail!("the polling thread stopped"),
            }
            dirty = true;
        }
    }
}
