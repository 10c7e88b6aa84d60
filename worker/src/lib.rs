//! The worker side of balancer.
//!
//! Everything a worker process needs and nothing else: the IPC message types and their line
//! framing ([`protocol`], [`codec`]), Node's own messages ([`node`]), descriptor passing
//! over the channel ([`fdpass`]), the client for the channel ([`Channel`]), systemd socket
//! activation ([`activation`]), and the built-in demo worker (`builtin`, behind the
//! `builtin` feature, so a program that only uses [`Channel`] does not compile hyper). The
//! master uses the same types, and [`fdpass`] to send sockets, from the other side.

pub mod activation;
#[cfg(feature = "builtin")]
pub mod builtin;
pub mod channel;
pub mod codec;
pub mod fdpass;
pub mod node;
pub mod protocol;

pub use activation::listen_fds;
pub use channel::{Channel, ChannelError, Event, StopReason};
pub use protocol::{MasterMessage, Mode, ParseError, WorkerMessage};
