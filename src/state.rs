//! The vocabulary of a worker's life: [`State`] (the rows of `docs/LIFECYCLE.md`, also the
//! registry's and `/status`'s words) and [`Reason`] (why a worker moved, left rotation or
//! stopped). Both print through `Display`; nothing anywhere chooses a state by comparing
//! text.

use std::fmt;
use std::time::Duration;

/// Where one worker is in its life. Only [`State::Ready`] receives connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Spawned; it has not announced `ready`, or its announced port is being admitted.
    Starting,
    /// Admitted and in rotation.
    Ready,
    /// Admitted, then out of rotation on failing checks; still checked.
    Down,
    /// Retired by a rolling reload: out of rotation, its connections finishing.
    Draining,
    /// Out of rotation and being stopped (`shutdown`, SIGTERM, SIGKILL).
    Stopping,
    /// Reaped.
    Exited,
}

impl State {
    /// The states a live (unreaped) worker can be in, in the order of its life: what the
    /// registry lists and metrics count.
    pub const LIVE: [State; 5] = [
        State::Starting,
        State::Ready,
        State::Down,
        State::Draining,
        State::Stopping,
    ];

    /// The lower-case word for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Down => "down",
            State::Draining => "draining",
            State::Stopping => "stopping",
            State::Exited => "exited",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a worker changed state: entered or left rotation, or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Just spawned.
    Spawned,
    /// Passed admission.
    Admitted,
    /// Carried across an in-place upgrade of the master, admitted before it.
    Adopted,
    /// `--health-rise` checks in a row passed after it was down.
    ChecksPassing,
    /// `--health-fall` checks in a row failed.
    ChecksFailing,
    /// `--health-fall` connects in a row through the proxy failed.
    ConnectsFailing,
    /// Passive health: connections it accepted and left unanswered (`--response-timeout`).
    ResponsesTimingOut,
    /// A Node cluster worker closed the server balancer balances.
    ClosedServer,
    /// Retired by a rolling reload.
    Retired,
    /// The process exited.
    Exited,
    /// Its IPC channel reached EOF.
    ChannelClosed,
    /// The master is stopping.
    MasterStopping,
    /// Too many protocol strikes: out of rotation first…
    Misbehaving,
    /// …then replaced for them.
    ProtocolViolations,
    /// Still failing checks `--health-fall` times after it went down.
    Unresponsive,
    /// No `ready` within `--ready-timeout`.
    ReadyTimeout(Duration),
    /// Its instance ended (the last exit from rotation, if still in it).
    Ended,
    /// The process could not be spawned.
    SpawnFailed(String),
    /// The instance's task failed (a bug).
    TaskFailed(String),
}

impl Reason {
    /// The state of a worker that leaves rotation for this reason.
    pub fn state_out_of_rotation(&self) -> State {
        match self {
            Reason::ChecksFailing | Reason::ConnectsFailing | Reason::ResponsesTimingOut => {
                State::Down
            }
            Reason::Retired => State::Draining,
            _ => State::Stopping,
        }
    }

    /// Whether the worker was asked to stop (and was sent `shutdown`), as opposed to
    /// replaced for a fault.
    pub fn is_requested_stop(&self) -> bool {
        matches!(self, Reason::Retired | Reason::MasterStopping)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Spawned => f.write_str("spawned"),
            Reason::Admitted => f.write_str("admitted"),
            Reason::Adopted => f.write_str("adopted after an upgrade"),
            Reason::ChecksPassing => f.write_str("health checks passing"),
            Reason::ChecksFailing => f.write_str("health checks failing"),
            Reason::ConnectsFailing => f.write_str("connects failing"),
            Reason::ResponsesTimingOut => f.write_str("responses timing out"),
            Reason::ClosedServer => f.write_str("closed its server"),
            Reason::Retired => f.write_str("retired"),
            Reason::Exited => f.write_str("exited"),
            Reason::ChannelClosed => f.write_str("ipc channel closed"),
            Reason::MasterStopping => f.write_str("master stopping"),
            Reason::Misbehaving => f.write_str("misbehaving"),
            Reason::ProtocolViolations => f.write_str("ipc protocol violations"),
            Reason::Unresponsive => f.write_str("unresponsive"),
            Reason::ReadyTimeout(t) => write!(f, "no ready within {t:?}"),
            Reason::Ended => f.write_str("ended"),
            Reason::SpawnFailed(e) => write!(f, "spawn failed: {e}"),
            Reason::TaskFailed(e) => write!(f, "instance task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_rotation_names_the_state() {
        assert_eq!(Reason::ChecksFailing.state_out_of_rotation(), State::Down);
        assert_eq!(Reason::ConnectsFailing.state_out_of_rotation(), State::Down);
        assert_eq!(Reason::Retired.state_out_of_rotation(), State::Draining);
        assert_eq!(Reason::Exited.state_out_of_rotation(), State::Stopping);
        assert_eq!(State::Draining.to_string(), "draining");
        assert_eq!(
            Reason::ReadyTimeout(Duration::from_secs(10)).to_string(),
            "no ready within 10s"
        );
    }
}
