//! The proxy threads: one per client listener, each with its own current-thread runtime,
//! so a connection's accept, connect and copies all happen on one thread, with no work
//! stealing and no cross-thread wake-ups. They can stop accepting and start again on the
//! same sockets after a pause: a duplicate of every listener is kept here, so the sockets (and the
//! connections waiting in their backlog) outlive the accept loops. An in-place upgrade
//! stops them, passes these duplicates to the next image, and starts them again if the exec
//! fails.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use proxy::Connections;

use crate::protocol::{DataPath, Engine};

/// The running proxy threads and the listeners they accept on.
pub struct ProxyThreads {
    data: Arc<DataPath>,
    conns: Connections,
    /// Cancelled to stop accepting; replaced when accepting resumes.
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// One duplicate of each listener the threads accept on.
    listeners: Vec<std::net::TcpListener>,
    /// Each accept loop holds a clone of this sender until it returns: once the receiver
    /// sees every one dropped, no accepted connection is still on its way into the tracker.
    accepting: Option<mpsc::Sender<()>>,
    accept_loops: mpsc::Receiver<()>,
}

impl ProxyThreads {
    /// No threads yet.
    pub fn new(data: Arc<DataPath>, conns: Connections) -> Self {
        let (accepting, accept_loops) = mpsc::channel(1);
        Self {
            data,
            conns,
            stop: CancellationToken::new(),
            threads: Vec::new(),
            listeners: Vec::new(),
            accepting: Some(accepting),
            accept_loops,
        }
    }

    /// Starts one thread per listener. Each returns once it has stopped accepting and
    /// every connection (of all threads) is done.
    pub fn start(&mut self, listeners: Vec<std::net::TcpListener>) -> std::io::Result<()> {
        for listener in listeners {
            self.listeners.push(listener.try_clone()?);
            self.spawn(listener)?;
        }
        Ok(())
    }

    /// Stops accepting for good (the master's stop): the sockets close once the accept
    /// loops have dropped theirs, so new connects are refused rather than queued for no one.
    pub fn stop_accepting(&mut self) {
        self.stop.cancel();
        self.listeners.clear();
    }

    /// Stops accepting on every listener for a moment (an upgrade's exec) and returns once
    /// every accept loop has returned, so every connection accepted so far is in the
    /// connection tracker. The sockets stay open and keep queueing connections in their
    /// backlog.
    pub async fn pause(&mut self) {
        self.stop.cancel();
        self.accepting = None;
        while self.accept_loops.recv().await.is_some() {}
    }

    /// Accepts again on the same sockets, after [`pause`](Self::pause).
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.stop = CancellationToken::new();
        let (accepting, accept_loops) = mpsc::channel(1);
        (self.accepting, self.accept_loops) = (Some(accepting), accept_loops);
        self.conns.tracker.reopen();
        let again: Vec<_> = (self.listeners.iter())
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<_>>()?;
        for listener in again {
            self.spawn(listener)?;
        }
        Ok(())
    }

    /// The listeners' descriptor numbers (the kept duplicates), in thread order.
    pub fn listener_fds(&self) -> Vec<RawFd> {
        self.listeners.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Waits for every thread to end (after the drain).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    fn spawn(&mut self, listener: std::net::TcpListener) -> std::io::Result<()> {
        if self.data.engine() == Engine::Epoll {
            return self.spawn_epoll(listener);
        }
        let i = self.threads.len();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (data, stop, conns) = (
            Arc::clone(&self.data),
            self.stop.clone(),
            self.conns.clone(),
        );
        let accepting = self.accepting.clone();
        let thread = std::thread::Builder::new()
            .name(format!("balancer-proxy-{i}"))
            .spawn(move || {
                // The master's signals go to the main thread (see `signals::block`).
                crate::signals::block();
                runtime.block_on(async move {
                    data.serve(listener, stop, conns.clone()).await;
                    drop(accepting);
                    conns.tracker.wait().await;
                });
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// A thread running [`proxy::engine`] on `listener`. The engine's loop sees the stop,
    /// the abort and the upgrade's quiesce through its bell, rung by a relay task on the
    /// runtime this is called from (the supervisor's): not per connection.
    fn spawn_epoll(&mut self, listener: std::net::TcpListener) -> std::io::Result<()> {
        let i = self.threads.len();
        let engine = proxy::engine::Engine::new()?;
        let done = CancellationToken::new();
        let proxy = Arc::clone(self.data.proxy());
        tokio::runtime::Handle::try_current()
            .map_err(std::io::Error::other)?
            .spawn(proxy::engine::relay(
                engine.bell(),
                self.stop.clone(),
                self.conns.abort.clone(),
                Arc::clone(&proxy.forward.quiesce),
                done.clone(),
            ));
        let (stop, conns) = (self.stop.clone(), self.conns.clone());
        let accepting = self.accepting.clone();
        let thread = std::thread::Builder::new()
            .name(format!("balancer-proxy-{i}"))
            .spawn(move || {
                crate::signals::block();
                // Ends the relay however the loop ends.
                let _done = done.drop_guard();
                engine.run(listener, proxy, stop, conns, move || drop(accepting));
            })?;
        self.threads.push(thread);
        Ok(())
    }
}
