//! The worker side of balancer.
//!
//! Everything a worker process needs and nothing else: the IPC message types and their line
//! framing ([`protocol`], [`codec`]), the client for the channel ([`Channel`]), and the
//! built-in demo worker ([`builtin`]). The master uses the same types from the other side.

pub mod builtin;
pub mod channel;
pub mod codec;
pub mod fdpass;
pub mod protocol;

pub use channel::{Channel, ChannelError, Event, StopReason};
pub use protocol::{MasterMessage, ParseError, WorkerMessage};
