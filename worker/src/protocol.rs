//! The IPC protocol between the master and a worker: message types and the line parser.
//!
//! One UTF-8 JSON value per `\n`-terminated line, at most [`MAX_LINE`] bytes. This is
//! exactly the framing Node.js uses for `process.send` in its default `json` mode, so a
//! Node worker can speak it with no library. Both sides use these types; the master parses
//! [`WorkerMessage`]s and writes [`MasterMessage`]s, a worker does the opposite.
//!
//! Parsing is lenient where real programs need it (a Node worker that does
//! `process.send("41234 ready")`) and strict everywhere else: anything that is not a known
//! message becomes [`WorkerMessage::Unknown`] rather than an error, so a new message type in a
//! newer worker never breaks an older master.
//!
//! Two master messages carry a file descriptor ([`MasterMessage::handles`]): the fd rides in
//! an `SCM_RIGHTS` control message with the first byte of the line (see [`crate::fdpass`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::node::{self, ClusterMessage};

/// Longest line either side accepts, newline excluded. Bounds the master's memory per worker:
/// a worker that writes without newlines is cut off here instead of growing a buffer forever.
pub const MAX_LINE: usize = 64 * 1024;

/// Environment variable carrying the child's end of the IPC socketpair (a decimal fd number).
pub const ENV_IPC_FD: &str = "BALANCER_IPC_FD";
/// Environment variable carrying the worker's slot number, `0..N`, stable across replacement.
pub const ENV_WORKER_ID: &str = "BALANCER_WORKER_ID";
/// Environment variable naming how the worker gets its connections: one of the [`Mode`]
/// names. Absent or empty means [`Mode::Proxy`].
pub const ENV_MODE: &str = "BALANCER_MODE";
/// Environment variable carrying the address to bind in [`Mode::ReusePort`]: `IP:PORT`,
/// `[v6]:PORT` or `:PORT` (all IPv4 addresses); every worker binds the same address with
/// `SO_REUSEPORT`. The master's own `--listen` reads the same variable, with the same forms and
/// meaning, so workers ignore it in every other mode (they may inherit it).
pub const ENV_LISTEN: &str = "BALANCER_LISTEN";

/// Reads an address in the forms [`ENV_LISTEN`] (and the master's `--listen`) accept:
/// `IP:PORT`, `[v6]:PORT`, or `:PORT` for every IPv4 address. `None` for anything else.
pub fn parse_listen(raw: &str) -> Option<std::net::SocketAddr> {
    match raw.strip_prefix(':') {
        Some(port) => Some(std::net::SocketAddr::from((
            [0, 0, 0, 0],
            port.parse().ok()?,
        ))),
        None => raw.parse().ok(),
    }
}

/// Most file descriptors one message may carry. Every message that carries handles today
/// carries exactly one; the receiver sizes its control buffer for this many and closes the
/// rest, so a peer cannot make it install an unbounded number of descriptors per read.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// How a worker gets its connections, chosen by the master and passed in [`ENV_MODE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The worker binds a loopback port of its own and announces it with `ready`; the master
    /// accepts every client and copies bytes to a worker.
    #[default]
    Proxy,
    /// The master sends its listening socket (`listener` message); every worker accepts on
    /// the same socket and the kernel spreads the connections.
    Shared,
    /// Every worker binds [`ENV_LISTEN`] itself with `SO_REUSEPORT`; the kernel balances
    /// between the sockets by hashing.
    ReusePort,
    /// The master accepts and hands each connection to a worker (`conn` message); the worker
    /// answers `accepted` or `rejected`.
    Handoff,
}

impl Mode {
    /// The name used in [`ENV_MODE`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Shared => "shared",
            Self::ReusePort => "reuseport",
            Self::Handoff => "handoff",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`ENV_MODE`] value that names no [`Mode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: expected proxy, shared, reuseport or handoff")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    /// Case-insensitive; surrounding whitespace is ignored and an empty string is
    /// [`Mode::Proxy`], so `BALANCER_MODE=` behaves like an absent variable.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "proxy" => Ok(Self::Proxy),
            "shared" => Ok(Self::Shared),
            "reuseport" => Ok(Self::ReusePort),
            "handoff" => Ok(Self::Handoff),
            _ => Err(UnknownMode(s.to_owned())),
        }
    }
}

/// A message from a worker to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// The worker is ready for connections.
    Ready {
        /// The TCP port the worker accepts on: its own loopback port in [`Mode::Proxy`], the
        /// shared or reuseport port in [`Mode::Shared`] and [`Mode::ReusePort`]. Absent in
        /// [`Mode::Handoff`], where the worker listens on nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// Optional capabilities the worker announces (for example `"ping"`), so the master
        /// only uses features the worker understands.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Answer to [`MasterMessage::Ping`] with the same sequence number.
    Pong {
        /// Sequence number copied from the ping.
        seq: u64,
    },
    /// The worker owns the connection handed over in [`MasterMessage::Conn`] with this `id`;
    /// the master may close its own copy of the descriptor.
    Accepted {
        /// The id from the `conn` message.
        id: u64,
    },
    /// The worker will not serve the connection with this `id` (it arrived without a usable
    /// descriptor, or the worker is draining); the master still holds the client and may
    /// hand it to another worker.
    Rejected {
        /// The id from the `conn` message.
        id: u64,
    },
    /// Node's `{"cmd":"NODE_HANDLE_ACK"}`: the worker took the handle sent with the last
    /// `listener` message (a Node worker sends this and never `ready` in shared mode).
    #[serde(skip)]
    HandleAck,
    /// Node's `{"cmd":"NODE_HANDLE_NACK"}`: the handle did not arrive; send it again.
    #[serde(skip)]
    HandleNack,
    /// A Node `cluster` message (`{"cmd":"NODE_CLUSTER",…}`, see [`crate::node`]).
    #[serde(skip)]
    Cluster(ClusterMessage),
    /// A message this version does not know. Kept (not an error) so protocols can grow.
    #[serde(skip)]
    Unknown,
}

/// A message from the master to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// Stop accepting, finish open connections, exit 0. The master escalates to SIGTERM and
    /// SIGKILL after its own timeouts, so a worker may ignore this and still be stopped.
    Shutdown,
    /// Liveness probe over the channel; answer with [`WorkerMessage::Pong`] carrying `seq`.
    Ping {
        /// Sequence number to echo back.
        seq: u64,
    },
    /// The master's listening TCP socket is attached ([`Mode::Shared`]): accept on it.
    Listener,
    /// One accepted TCP connection is attached ([`Mode::Handoff`]): serve it and answer
    /// [`WorkerMessage::Accepted`] (or [`WorkerMessage::Rejected`]) with the same `id`. The
    /// master keeps its own copy of the descriptor until then, so a worker that dies before
    /// answering does not lose the client.
    Conn {
        /// Chosen by the master, unique among its outstanding handoffs.
        id: u64,
    },
    /// A message this version does not know.
    #[serde(skip)]
    Unknown,
}

/// Why a line could not be read as a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The line is not valid JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// The line is JSON of a known type whose fields are wrong (for example `port: -1`).
    #[error("bad {kind} message: {reason}")]
    Fields {
        /// The `type` the message claimed.
        kind: String,
        /// What was wrong with its fields.
        reason: String,
    },
}

impl WorkerMessage {
    /// Parses one line (without its newline) sent by a worker.
    ///
    /// Accepts the canonical object form, plus the string forms `"ready 41234"` and
    /// `"41234 ready"` that Node programs naturally send with `process.send(string)`.
    /// Unknown object types and other strings are [`WorkerMessage::Unknown`].
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| ParseError::Json(e.to_string()))?;
        match value {
            serde_json::Value::String(s) => Ok(parse_ready_string(&s).unwrap_or(Self::Unknown)),
            serde_json::Value::Object(ref map) => {
                match map.get("cmd").and_then(|c| c.as_str()) {
                    Some("NODE_HANDLE_ACK") => return Ok(Self::HandleAck),
                    Some("NODE_HANDLE_NACK") => return Ok(Self::HandleNack),
                    Some("NODE_CLUSTER") => {
                        return Ok(node::parse_cluster(map).map_or(Self::Unknown, Self::Cluster))
                    }
                    _ => {}
                }
                let kind = match map.get("type").and_then(|t| t.as_str()) {
                    Some(k) => k,
                    None => return Ok(Self::Unknown),
                };
                if !matches!(kind, "ready" | "pong" | "accepted" | "rejected") {
                    return Ok(Self::Unknown);
                }
                serde_json::from_value(value.clone()).map_err(|e| ParseError::Fields {
                    kind: kind.to_owned(),
                    reason: e.to_string(),
                })
            }
            _ => Ok(Self::Unknown),
        }
    }

    /// The canonical line for this message, newline included.
    pub fn to_line(&self) -> String {
        to_line(self)
    }
}

impl MasterMessage {
    /// Parses one line (without its newline) sent by the master. Unknown types, and lines
    /// that are not objects, are [`MasterMessage::Unknown`].
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| ParseError::Json(e.to_string()))?;
        if value.get("cmd").and_then(|c| c.as_str()) == Some("NODE_HANDLE")
            && value.get("type").and_then(|t| t.as_str()) == Some("net.Server")
        {
            return Ok(Self::Listener);
        }
        let kind = match value.get("type").and_then(|t| t.as_str()) {
            Some(k @ ("shutdown" | "ping" | "listener" | "conn")) => k.to_owned(),
            _ => return Ok(Self::Unknown),
        };
        serde_json::from_value(value).map_err(|e| ParseError::Fields {
            kind,
            reason: e.to_string(),
        })
    }

    /// The line for this message, newline included. `Listener` goes out in Node's handle
    /// form (see [`crate::node::LISTENER_LINE`]), which the `worker` crate understands too.
    pub fn to_line(&self) -> String {
        match self {
            Self::Listener => node::LISTENER_LINE.to_owned(),
            other => to_line(other),
        }
    }

    /// How many file descriptors travel with this message: the sender attaches exactly this
    /// many, the receiver takes this many from its queue.
    pub fn handles(&self) -> usize {
        match self {
            Self::Listener | Self::Conn { .. } => 1,
            Self::Shutdown | Self::Ping { .. } | Self::Unknown => 0,
        }
    }
}

fn to_line<T: Serialize>(msg: &T) -> String {
    // Serializing these enums cannot fail: every field is a plain number, string or list.
    let mut line = serde_json::to_string(msg).unwrap_or_else(|_| String::from("{}"));
    line.push('\n');
    line
}

/// `"ready 41234"` or `"41234 ready"` (any surrounding or inner whitespace).
fn parse_ready_string(s: &str) -> Option<WorkerMessage> {
    let mut words = s.split_whitespace();
    let (a, b) = (words.next()?, words.next()?);
    if words.next().is_some() {
        return None;
    }
    let port = if a.eq_ignore_ascii_case("ready") {
        b
    } else if b.eq_ignore_ascii_case("ready") {
        a
    } else {
        return None;
    };
    let port: u16 = port.parse().ok()?;
    Some(WorkerMessage::Ready {
        port: Some(port),
        features: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(port: u16) -> WorkerMessage {
        WorkerMessage::Ready {
            port: Some(port),
            features: vec![],
        }
    }

    #[test]
    fn canonical_ready_round_trips() {
        let line = ready(40123).to_line();
        assert_eq!(line, "{\"type\":\"ready\",\"port\":40123}\n");
        assert_eq!(WorkerMessage::parse(line.trim_end()), Ok(ready(40123)));
    }

    #[test]
    fn ready_with_features() {
        let msg = WorkerMessage::parse(r#"{"type":"ready","port":1,"features":["ping"]}"#);
        assert_eq!(
            msg,
            Ok(WorkerMessage::Ready {
                port: Some(1),
                features: vec!["ping".into()]
            })
        );
    }

    #[test]
    fn node_string_forms() {
        assert_eq!(WorkerMessage::parse(r#""ready 8080""#), Ok(ready(8080)));
        assert_eq!(WorkerMessage::parse(r#""8080 ready""#), Ok(ready(8080)));
        assert_eq!(WorkerMessage::parse(r#"" 8080   READY ""#), Ok(ready(8080)));
        assert_eq!(
            WorkerMessage::parse(r#""ready 99999""#),
            Ok(WorkerMessage::Unknown)
        );
        assert_eq!(
            WorkerMessage::parse(r#""hello world""#),
            Ok(WorkerMessage::Unknown)
        );
        assert_eq!(
            WorkerMessage::parse(r#""ready 1 2""#),
            Ok(WorkerMessage::Unknown)
        );
    }

    #[test]
    fn unknown_types_are_not_errors() {
        assert_eq!(
            WorkerMessage::parse(r#"{"type":"metrics","x":1}"#),
            Ok(WorkerMessage::Unknown)
        );
        assert_eq!(
            WorkerMessage::parse(r#"{"cmd":"NODE_SOMETHING_ELSE"}"#),
            Ok(WorkerMessage::Unknown)
        );
        assert_eq!(WorkerMessage::parse("42"), Ok(WorkerMessage::Unknown));
        assert_eq!(WorkerMessage::parse("null"), Ok(WorkerMessage::Unknown));
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(matches!(
            WorkerMessage::parse("{not json"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            WorkerMessage::parse(r#"{"type":"ready","port":-1}"#),
            Err(ParseError::Fields { .. })
        ));
        assert!(matches!(
            WorkerMessage::parse(r#"{"type":"ready","port":70000}"#),
            Err(ParseError::Fields { .. })
        ));
        assert!(matches!(
            WorkerMessage::parse(r#"{"type":"ready","port":"80"}"#),
            Err(ParseError::Fields { .. })
        ));
        assert!(matches!(
            WorkerMessage::parse(r#"{"type":"accepted"}"#),
            Err(ParseError::Fields { .. })
        ));
        assert!(matches!(
            WorkerMessage::parse(r#"{"type":"rejected","id":-3}"#),
            Err(ParseError::Fields { .. })
        ));
    }

    #[test]
    fn ready_without_port() {
        let bare = WorkerMessage::Ready {
            port: None,
            features: vec![],
        };
        assert_eq!(
            WorkerMessage::parse(r#"{"type":"ready"}"#),
            Ok(bare.clone())
        );
        assert_eq!(
            WorkerMessage::parse(r#"{"type":"ready","port":null}"#),
            Ok(bare.clone())
        );
        assert_eq!(bare.to_line(), "{\"type\":\"ready\"}\n");
    }

    #[test]
    fn handoff_answers() {
        for msg in [
            WorkerMessage::Accepted { id: 7 },
            WorkerMessage::Rejected { id: u64::MAX },
        ] {
            assert_eq!(WorkerMessage::parse(msg.to_line().trim_end()), Ok(msg));
        }
        assert_eq!(
            WorkerMessage::Accepted { id: 3 }.to_line(),
            "{\"type\":\"accepted\",\"id\":3}\n"
        );
    }

    #[test]
    fn handle_messages() {
        assert_eq!(
            MasterMessage::Listener.to_line(),
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Server\",\"msg\":\"server\"}\n"
        );
        assert_eq!(
            MasterMessage::parse(node::LISTENER_LINE.trim_end()),
            Ok(MasterMessage::Listener)
        );
        assert_eq!(
            MasterMessage::parse(r#"{"type":"listener"}"#),
            Ok(MasterMessage::Listener)
        );
        assert_eq!(
            WorkerMessage::parse(node::ACK_LINE.trim_end()),
            Ok(WorkerMessage::HandleAck)
        );
        assert_eq!(
            WorkerMessage::parse(r#"{"cmd":"NODE_HANDLE_NACK"}"#),
            Ok(WorkerMessage::HandleNack)
        );
        assert_eq!(
            WorkerMessage::parse(r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            Ok(WorkerMessage::Cluster(ClusterMessage::Online))
        );
        assert_eq!(
            WorkerMessage::parse(r#"{"cmd":"NODE_CLUSTER","ack":4,"accepted":false,"seq":2}"#),
            Ok(WorkerMessage::Cluster(ClusterMessage::Accepted {
                ack: 4,
                accepted: false
            }))
        );
        assert_eq!(
            MasterMessage::Conn { id: 12 }.to_line(),
            "{\"type\":\"conn\",\"id\":12}\n"
        );
        assert_eq!(
            MasterMessage::parse(r#"{"type":"conn","id":12}"#),
            Ok(MasterMessage::Conn { id: 12 })
        );
        assert_eq!(
            MasterMessage::parse(r#"{"type":"listener"}"#),
            Ok(MasterMessage::Listener)
        );
        assert!(matches!(
            MasterMessage::parse(r#"{"type":"conn"}"#),
            Err(ParseError::Fields { .. })
        ));
        assert_eq!(MasterMessage::Listener.handles(), 1);
        assert_eq!(MasterMessage::Conn { id: 1 }.handles(), 1);
        assert_eq!(MasterMessage::Shutdown.handles(), 0);
        assert_eq!(MasterMessage::Ping { seq: 1 }.handles(), 0);
    }

    #[test]
    fn modes() {
        for mode in [Mode::Proxy, Mode::Shared, Mode::ReusePort, Mode::Handoff] {
            assert_eq!(mode.as_str().parse(), Ok(mode));
        }
        assert_eq!("".parse(), Ok(Mode::Proxy));
        assert_eq!(" ReusePort ".parse(), Ok(Mode::ReusePort));
        assert_eq!(
            "cluster".parse::<Mode>(),
            Err(UnknownMode("cluster".into()))
        );
        assert_eq!(Mode::default(), Mode::Proxy);
    }

    #[test]
    fn master_messages() {
        assert_eq!(
            MasterMessage::Shutdown.to_line(),
            "{\"type\":\"shutdown\"}\n"
        );
        assert_eq!(
            MasterMessage::parse(r#"{"type":"ping","seq":7}"#),
            Ok(MasterMessage::Ping { seq: 7 })
        );
        assert_eq!(
            MasterMessage::parse(r#"{"type":"later"}"#),
            Ok(MasterMessage::Unknown)
        );
        assert_eq!(
            MasterMessage::parse(r#""server""#),
            Ok(MasterMessage::Unknown)
        );
    }
}
