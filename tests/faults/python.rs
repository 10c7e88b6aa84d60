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

/// The base of the misbehaving workers: a small threaded HTTP server on its own loopback
/// port (each answer names the worker's pid), `raw(bytes)`, `send(obj)` and `ready(port)` on
/// the IPC channel (a socket object over `BALANCER_IPC_FD`, also for `socket.send_fds`), and a
/// thread that exits at once on `shutdown` or when the channel closes.
///
/// A request for `/abuse` is answered first, then runs the case's `abuse()` in the handler's
/// thread: the test decides when the worker misbehaves (after it has measured the master),
/// without a second channel. `/abused` answers `yes` once `abuse()` has returned (every
/// byte of it written to the channel), else `no`. Each case appends its own `abuse()` (and may announce `ready`
/// itself, or call `ready()`), then [`ABUSE_TAIL`].
pub const ABUSE_BASE: &str = r#"
import json, os, socket, sys, threading, time
IPC = int(os.environ["BALANCER_IPC_FD"])
ipc = socket.socket(fileno=IPC)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(128)
PORT = srv.getsockname()[1]
lock = threading.Lock()

def raw(data):
    with lock:
        ipc.sendall(data)

def send(obj):
    raw((json.dumps(obj) + "\n").encode())

def ready(port=PORT):
    send({"type": "ready", "port": port})

def abuse():
    pass

done = threading.Event()

def handle(c):
    wanted = False
    try:
        c.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        wanted = data.startswith(b"GET /abuse ")
        if data.startswith(b"GET /abused "):
            body = b"yes\n" if done.is_set() else b"no\n"
        else:
            body = b"abuse worker pid %d\n" % os.getpid()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()
    if wanted:
        abuse()
        done.set()

def serve():
    while True:
        try:
            c, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def obey():
    for line in os.fdopen(os.dup(IPC), "rb"):
        if b'"shutdown"' in line:
            break
    os._exit(0)

threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=obey, daemon=True).start()
"#;

/// The end of every misbehaving worker: the main thread idles; the others serve.
pub const ABUSE_TAIL: &str = "\nwhile True:\n    time.sleep(3600)\n";

/// A misbehaving worker: [`ABUSE_BASE`], the case, [`ABUSE_TAIL`].
pub fn abuser(case: &str) -> String {
    format!("{ABUSE_BASE}\n{case}\n{ABUSE_TAIL}")
}

/// Malformed lines (8 strikes: not JSON ×2, not UTF-8, bad fields ×3, over the 64 KiB cap
/// ×2), then lines that are valid but not for the master (no strike: unknown types, JSON
/// that is not an object, a line of exactly 64 KiB), then the marker `abuse-done`.
pub const MALFORMED: &str = r#"
ready()

def abuse():
    for line in [b"not json", b"{", b"\xff\xfe\xfd",
                 b'{"type":"ready","port":"abc"}', b'{"type":"pong"}',
                 b'{"type":"ready","port":70000}',
                 b"x" * (64 * 1024 + 1), b'{"type":"big","x":"' + b"y" * (1024 * 1024) + b'"}']:
        raw(line + b"\n")
    exact = b'{"type":"exactly-64k","x":"'
    exact += b"z" * (64 * 1024 - len(exact) - 2) + b'"}'
    assert len(exact) == 64 * 1024
    for line in [b"[1,2]", b'{"type":5}', b"{}", b'"hello"', b'{"type":"bogus"}', exact]:
        raw(line + b"\n")
    send({"type": "abuse-done"})
"#;

/// 100 000 `pong` lines (valid, unasked for) in one write, then `abuse-done`.
pub const FLOOD: &str = r#"
ready()

def abuse():
    raw(b'{"type":"pong","seq":0}\n' * 100000)
    send({"type": "abuse-done"})
"#;

/// `ready` for a port another process listens on (`sys.argv[1]`: the test's own listener);
/// then, once the file `sys.argv[2]` exists (the test saw that port refused, and wrote the
/// master's port into it), `ready` for the master's own port, for port 0, and for the
/// worker's real port. Once
/// admitted, on `/abuse`: `ready` again (the same port, then the foreign one), then
/// `abuse-done`.
pub const READY_ABUSE: &str = r#"
FOREIGN, GO = int(sys.argv[1]), sys.argv[2]
ready(FOREIGN)
deadline = time.time() + 20
while not os.path.exists(GO) and time.time() < deadline:
    time.sleep(0.01)
ready(int(open(GO).read()))
ready(0)
ready()

def abuse():
    ready()
    ready(FOREIGN)
    send({"type": "abuse-done"})
"#;

/// On `/abuse`: forks a grandchild that keeps only the IPC channel (stdio to /dev/null,
/// listener closed), then the worker exits 0. The master is a child subreaper and stops what
/// a dead worker left behind, SIGTERM first; the grandchild blocks SIGTERM (in the forking
/// thread, before the fork: no window where it could die of it) and waits for it (at most
/// 10 s). That SIGTERM is the master's own word that it has reaped the worker, so the
/// grandchild's `ready` and malformed line on the inherited channel are written strictly
/// after the death and before the master's cleanup is over. It records the outcome in the
/// file `sys.argv[1]` (`sent <pid>`, or why not), then holds the channel for at most
/// `sys.argv[2]` seconds, SIGTERM still blocked: the master's SIGKILL ends it first.
pub const AFTER_DEATH: &str = r#"
import signal
ready()

def abuse():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        srv.close()
        if signal.sigtimedwait({signal.SIGTERM}, 10) is None:
            outcome = "no SIGTERM from the master within 10 s"
        else:
            try:
                os.write(IPC, b'{"type":"ready","port":%d}\n' % PORT)
                os.write(IPC, b"not json, from beyond the grave\n")
                outcome = "sent %d" % os.getpid()
            except OSError as e:
                outcome = "error: %s" % e
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(outcome)
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    os._exit(0)
"#;

/// On `/abuse`: 200 `pong` lines each carrying 4 descriptors, descriptors in the middle of
/// a line, and a `ready` carrying its own listening socket; then `abuse-done`.
pub const UNINVITED_FDS: &str = r#"
ready()

def abuse():
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
    with lock:
        for _ in range(200):
            socket.send_fds(ipc, [b'{"type":"pong","seq":0}\n'], fds)
        socket.send_fds(ipc, [b'{"type":"po'], fds[:2])
        ipc.sendall(b'ng","seq":0}\n')
        socket.send_fds(ipc, [b'{"type":"ready","port":%d}\n' % PORT], [srv.fileno()])
    send({"type": "abuse-done"})
"#;

/// On `/abuse`: 25 malformed lines, more than the 20 strikes a worker may commit.
pub const REPEAT_OFFENDER: &str = r#"
ready()

def abuse():
    for i in range(25):
        raw(b"garbage %d\n" % i)
"#;

/// An HTTP worker whose `GET /sleep?s=N` prints `sleeping N` on stdout (the master relays it
/// to its log: the request has reached the worker), sleeps N seconds, then answers. With
/// `sys.argv[1] == "polite"` it exits on `shutdown` (or when the channel closes); with
/// `"stubborn"` it ignores `shutdown`, SIGTERM and the channel closing, so only SIGKILL
/// stops it.
pub const SLEEPY: &str = r#"
import http.server, json, os, signal, sys, threading, time
STUBBORN = sys.argv[1] == "stubborn"
if STUBBORN:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        secs = float(self.path.split("s=", 1)[1]) if "s=" in self.path else 0.0
        print("sleeping %g" % secs, flush=True)
        time.sleep(secs)
        body = b"slept %g\n" % secs
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
IPC = int(os.environ["BALANCER_IPC_FD"])
os.write(IPC, (json.dumps({"type": "ready", "port": server.server_address[1]}) + "\n").encode())

def obey():
    for line in os.fdopen(os.dup(IPC), "r"):
        if '"shutdown"' in line and not STUBBORN:
            os._exit(0)
    if not STUBBORN:
        os._exit(0)

threading.Thread(target=obey, daemon=True).start()
server.serve_forever()
"#;

/// On `/abuse` (sent straight to the worker's own port, not through the master): stops
/// listening (`shutdown` wakes the accepting thread; connects are refused from then on) but
/// stays alive, its IPC channel open: a worker whose server broke.
pub const STOPS_LISTENING: &str = r#"
ready()

def abuse():
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()
"#;
