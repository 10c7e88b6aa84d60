//! balancer's data path.
//!
//! The accept loop ([`server`]), the set of workers in rotation and how one is chosen
//! ([`backends`]), forwarding one connection ([`forward`]), and health probes ([`health`]).
//! It takes an already-bound listener and a cancellation token; it never spawns processes,
//! reads the environment or installs signal handlers, so it can be tested with plain sockets.

pub mod activity;
pub mod backends;
pub mod client_addr;
mod connect;
pub mod copy;
pub mod engine;
pub mod forward;
pub mod health;
pub mod http;
pub mod proxy_header;
pub mod quiesce;
pub mod server;
pub mod tls;

pub use backends::{Backend, Backends, Policy};
pub use client_addr::ClientAddr;
pub use copy::BackendEof;
pub use forward::{forward, ForwardConfig, ForwardError, Forwarded, Transfer};
pub use server::{serve, Connections, Proxy, Stats};

/// Whether `e` means this process ran out of its own resources (no free file descriptor,
/// system-wide or its own, no socket buffer, no memory): it says nothing about the peer,
/// and retrying at once would spin while nothing can change.
pub fn is_out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
