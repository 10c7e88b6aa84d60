//! Python worker programs for the fault scenarios, speaking the IPC protocol by hand so that
//! each one can misbehave in its own way. They use only the standard library; most run with
//! `python3 -S` (no `site` import), which halves the start-up time of a worker that is
//! respawned hundreds of times.

use crate::helper::python3;

/// The python interpreter as a `&str` argument.
pub fn python() -> &'static str {
    python3().to_str().expect("UTF-8 python path")
}

/// A worker that serves exactly one HTTP request, then exits 0.
///
/// Connections that send no request (the master's admission probe and TCP health checks
/// connect and close) are skipped. On the first real request it closes its listening socket
/// *before* answering, as a worker going away should: from then on a connect to its port
/// is refused and the proxy offers the client to the next worker, instead of the connection
/// waiting in an accept queue that the exit would reset.
pub const ONE_SHOT: &str = r#"
import os, socket
ipc = int(os.environ["BALANCER_IPC_FD"])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
os.write(ipc, b'{"type":"ready","port":%d}\n' % srv.getsockname()[1])
while True:
    c, _ = srv.accept()
    c.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    if b"\r\n\r\n" not in data:
        c.close()
        continue
    srv.close()
    body = b"one-shot %d\n" % os.getpid()
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
    os._exit(0)
"#;
