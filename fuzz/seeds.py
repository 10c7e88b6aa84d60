#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/NAME/ (checked in; re-run after changing a format).

Each seed is a real message stream in the input format of its target (see each target's
`//!` header): the first byte picks the target's mode, the rest is the stream.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# What workers really send: balancer's messages, Node's handle acks, the lenient string forms,
# Node's cluster protocol (shapes from Node's lib/internal/cluster/child.js), and damage.
WORKER_LINES = [
    {"type": "ready", "port": 40123},
    {"type": "ready", "port": 1, "features": ["ping"]},
    {"type": "ready"},
    {"type": "pong", "seq": 7},
    {"type": "accepted", "id": 3},
    {"type": "rejected", "id": 18446744073709551615},
    {"cmd": "NODE_HANDLE_ACK"},
    {"cmd": "NODE_HANDLE_NACK"},
    "ready 8080",
    " 8080   READY ",
    "ready 99999",
    {"cmd": "NODE_CLUSTER", "act": "online", "seq": 0},
    {"cmd": "NODE_CLUSTER", "act": "queryServer", "seq": 1, "port": 0,
     "address": None, "addressType": 4, "fd": None, "index": 0, "backlog": 511},
    {"cmd": "NODE_CLUSTER", "act": "listening", "seq": 2, "port": 8000,
     "address": "127.0.0.1", "addressType": 4, "index": 0},
    {"cmd": "NODE_CLUSTER", "ack": 5, "accepted": True, "seq": 3},
    {"cmd": "NODE_CLUSTER", "act": "close", "key": "null:0:4:0", "seq": 4},
    {"cmd": "NODE_CLUSTER", "act": "exitedAfterDisconnect", "seq": 5},
]
MASTER_LINES = [
    {"type": "shutdown"},
    {"type": "ping", "seq": 1},
    {"type": "listener"},
    {"type": "conn", "id": 12},
    {"cmd": "NODE_HANDLE", "type": "net.Server", "msg": "server"},
    {"cmd": "NODE_HANDLE", "type": "net.Native",
     "msg": {"cmd": "NODE_CLUSTER", "act": "newconn", "key": "null:0:4:0", "seq": 9}},
]
DAMAGE = [b"{not json\n", b"\xff\xfe\n", b"x" * 70 + b"\n", b"ab\r\n", b"\n", b"no newline"]


def line(v):
    return (json.dumps(v, separators=(",", ":")) + "\n").encode()


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def ipc_lines():
    for i, v in enumerate(WORKER_LINES + MASTER_LINES):
        write("ipc_lines", "line-%02d" % i, bytes([1]) + line(v))
    for i, d in enumerate(DAMAGE):
        write("ipc_lines", "damage-%02d" % i, bytes([0]) + d)
    stream = b"".join(line(v) for v in WORKER_LINES) + b"".join(DAMAGE)
    write("ipc_lines", "stream-small-limit", bytes([2]) + stream)
    write("ipc_lines", "stream-real-limit", bytes([3]) + stream)


def record(fds, data, split=False, yield_first=False):
    h = fds | (8 if split else 0) | (16 if yield_first else 0)
    return bytes([h, len(data)]) + data


def fd_reader():
    conn = line({"type": "conn", "id": 1})
    listener = line({"cmd": "NODE_HANDLE", "type": "net.Server", "msg": "server"})
    ping = line({"type": "ping", "seq": 1})
    # Conforming (mode bit 0 clear): whole lines, descriptors with the first byte.
    write("fd_reader", "conforming-listener", bytes([2]) + record(1, listener))
    write("fd_reader", "conforming-mixed", bytes([2]) + record(1, conn) + record(0, ping)
          + record(1, conn, split=True) + record(2, conn, yield_first=True))
    write("fd_reader", "conforming-too-long", bytes([0]) + record(1, b"y" * 60 + b"\n")
          + record(1, conn))
    write("fd_reader", "conforming-not-utf8", bytes([2]) + record(1, b"\xff\n") + record(1, conn))
    # Hostile (mode bit 0 set): descriptors mid-line, many lines in one send, too many fds.
    write("fd_reader", "hostile-mid-line", bytes([3]) + record(0, b'{"type":') + record(1, b'"conn"')
          + record(1, b',"id":1}\n'))
    write("fd_reader", "hostile-two-lines", bytes([3]) + record(2, ping + conn) + record(0, conn))
    write("fd_reader", "hostile-too-many", bytes([3]) + record(7, listener) + record(5, conn))
    write("fd_reader", "hostile-no-newline", bytes([1]) + record(3, b"a" * 50) + record(1, b"b"))


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"


def v2(cmd, fam, body):
    return V2_SIG + bytes([0x20 | cmd, fam]) + len(body).to_bytes(2, "big") + body


def tlv(kind, value):
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def proxy_header():
    ip4 = bytes([203, 0, 113, 7, 198, 51, 100, 1]) + (4242).to_bytes(2, "big") + (443).to_bytes(2, "big")
    ip6 = (bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("20010db8000000000000000000000002")
           + (4242).to_bytes(2, "big") + (443).to_bytes(2, "big"))
    unix = b"/run/lb.sock".ljust(108, b"\0") + b"/run/app.sock".ljust(108, b"\0")
    seeds = {
        # What HAProxy, AWS NLB and nginx send, and what they send to health-check us.
        "v1-tcp4": b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n" + PAYLOAD,
        "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 443\r\n" + PAYLOAD,
        "v1-tcp6-mapped": b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:198.51.100.1 1 65535\r\n" + PAYLOAD,
        "v1-unknown": b"PROXY UNKNOWN\r\n" + PAYLOAD,
        "v1-unknown-addresses": b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        "v1-worst-case": b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                         b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        "v1-twice": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nPROXY TCP4 9.9.9.9 8.8.8.8 3 4\r\n",
        "v2-tcp4": v2(1, 0x11, ip4) + PAYLOAD,
        "v2-tcp4-tlvs": v2(1, 0x11, ip4 + tlv(0x01, b"h2") + tlv(0x02, b"example.test")
                           + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))) + PAYLOAD,
        "v2-tcp6": v2(1, 0x21, ip6) + PAYLOAD,
        "v2-local": v2(0, 0x00, b"") + PAYLOAD,
        "v2-local-with-addresses": v2(0, 0x11, ip4),
        "v2-unix": v2(1, 0x31, unix) + PAYLOAD,
        "v2-udp4": v2(1, 0x12, ip4),
        "v2-unspec": v2(1, 0x00, b"\x00" * 4),
        # Near misses.
        "v1-truncated": b"PROXY TCP4 203.0.113.7 198.51",
        "v1-no-lf": b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r",
        "v1-bad-address": b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
        "v1-port-too-large": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        "v1-family-mismatch": b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
        "v1-lowercase": b"proxy tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        "v1-two-spaces": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        "v1-too-long": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
        "v2-declares-too-much": V2_SIG + b"\x21\x11\xea\x60",
        "v2-short-addresses": v2(1, 0x11, b"\x01\x02\x03\x04"),
        "v2-bad-version": V2_SIG + b"\x11\x11\x00\x0c" + ip4,
        "v2-bad-command": V2_SIG + b"\x22\x11\x00\x0c" + ip4,
        "v2-truncated": v2(1, 0x21, ip6)[:40],
        "v2-signature-only": V2_SIG,
        "no-header": PAYLOAD,
    }
    for i, (name, data) in enumerate(sorted(seeds.items())):
        # Byte 0: the size of the small writes (here 1, 2, 7, 16, … bytes).
        write("proxy_header", name, bytes([[0, 1, 6, 15, 63][i % 5]]) + data)
    # A finding, kept: the first write ends right after the source port's space.
    write("proxy_header", "found-v1-split-after-port", bytes([28]) + b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nxyz")


def config_file():
    seeds = {
        "minimal": 'listen = "127.0.0.1:8080"\ncommand = ["node", "app.js"]\n',
        "everything": """# every kind of key
listen = "0.0.0.0:8080"
cpus = 4
grace = "30s"
ready_timeout = "10s"
mode = "proxy"
node-cluster = "auto"
ready = "ipc"
balance = "least-conn"
health-check = "http"
health-http = "/healthz"
health-interval = "1s"
health-timeout = "500ms"
health-rise = 2
health-fall = 3
connect-timeout = "1s"
idle-timeout = "60s"
response-timeout = "0s"
max-conns = 10000
worker-output = "prefix"
admin = "127.0.0.1:9000"
admin-token = "s3cret"
upstream = ["127.0.0.1:9001", "localhost:9002"]
resolver = ["127.0.0.1:53"]
resolve-interval = "5s"
log-format = "json"
verbose = 2
protocol = "http"
request-timeout = "60s"
header-timeout = "10s"
max-body = "10MB"
trusted-proxies = "10.0.0.0/8,127.0.0.1"
access-log = true
command = ["node", "server.js", "--port", "0"]
""",
        "proxy-protocol": 'mode = "proxy"\nsend-proxy = "v2"\naccept-proxy = "10.0.0.0/8, ::1"\n',
        "upstreams-only": 'cpus = 0\nupstream = ["127.0.0.1:8001", "[::1]:8002"]\n',
        "shared": 'mode = "shared"\nready = "spawn"\ncommand = ["python3", "-m", "http.server", "0"]\n',
        "tls": 'protocol = "http"\ntls-cert = "/nonexistent/cert.pem"\ntls-key = "/nonexistent/key.pem"\n',
        "booleans": 'access-log = false\nverbose = true\nquiet = 0\n',
        # Near misses: each is one error, naming its line.
        "unknown-key": 'listen = ":80"\n\nlisten_addr = "x"\n',
        "wrong-type": 'cpus = 2\nhealth-rise = "many"\n',
        "list-for-one": 'listen = ["a", "b"]\n',
        "bool-for-value": 'mode = true\n',
        "bad-enum": 'balance = "fastest"\n',
        "command-string": 'command = "node app.js"\n',
        "twice": 'cpus = 2\ncpus = 3\n',
        "twice-spellings": 'ready_timeout = "1s"\nready-timeout = "2s"\n',
        "section": '[server]\nlisten = ":80"\n',
        "inline-table": 'listen = { host = "a" }\n',
        "nested-list": 'command = [["a"]]\n',
        "date": 'grace = 1979-05-27T07:32:00Z\n',
        "float": 'cpus = 1.5\n',
        "hex-int": 'health-rise = 0x10\nhealth-fall = -1\n',
        "big-int": 'max-conns = 99999999999999999999\n',
        "bad-duration": '\ngrace = 30\n',
        "conflict": 'verbose = 1\nquiet = 1\n',
        "config-key": 'config = "other.toml"\n',
        "quoted-key": '"listen" = ":80"\n\'cpus\' = "auto"\n',
        "bad-toml": 'listen = "unterminated\n',
        "empty": '',
        "ready-port-no-command": 'ready = "port"\n',
        "admin-public": 'admin = "0.0.0.0:9000"\n',
        # A finding, kept: a quoted key holding a newline made a two-line error.
        "found-key-newline": '"a\\nb" = 1\n',
    }
    for name, text in seeds.items():
        write("config_file", name, text.encode())


def http_request():
    seeds = {
        # (flags, head): flags bit 0 trusted, bits 1-2 client, bit 3 https, bit 4 a 101.
        "plain": (0, "GET /index.html?q=1 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\nUser-Agent: curl/8.5\r\n"),
        "keep-alive": (0, "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
                          "X-Secret: 1\r\nTE: trailers\r\nTrailer: x\r\nProxy-Connection: close\r\n"),
        "websocket": (16, "GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"),
        "upgrade-unasked": (16, "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n"),
        "upgrade-and-more": (0, "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-hop, upgrade\r\nconnection: close\r\n"
                                "Upgrade: websocket\r\nUpgrade: other\r\nx-hop: 1\r\n"),
        "spoofed": (0, "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
                       "X-Forwarded-Host: evil\r\nForwarded: for=6.6.6.6\r\n"),
        "trusted-chain": (1, "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2, 3.3.3.3\r\n"
                             "X-Forwarded-Proto: https\r\nForwarded: for=1.1.1.1;proto=https\r\n"),
        "trusted-v6": (1 | 2, "POST /api HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\nContent-Length: 5\r\nForwarded: for=\"[2001:db8::9]\"\r\n"),
        "mapped-https": (4 | 8, "PUT /x HTTP/1.1\r\nHost: example.test:8443\r\nTransfer-Encoding: chunked\r\n"),
        "h2-authority": (8, "GET https://example.test/h2?x=%20 HTTP/2\r\nAccept: */*\r\n"),
        "absolute-form": (0, "GET http://other.test:81/p HTTP/1.1\r\nHost: example.test\r\n"),
        "connect": (0, "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n"),
        "options-star": (0, "OPTIONS * HTTP/1.1\r\nHost: a\r\n"),
        # RFC 9112 section 3.2.4: no path after the authority is `OPTIONS *`, a slash is `/`.
        "options-absolute-empty": (0, "OPTIONS http://a.test:80 HTTP/1.1\r\nHost: other.test\r\n"),
        "options-absolute-slash": (0, "OPTIONS http://a.test:80/ HTTP/1.1\r\nHost: other.test\r\n"),
        "options-absolute-query": (0, "OPTIONS http://a.test?q HTTP/1.0\r\n"),
        "get-star": (0, "GET * HTTP/1.1\r\nHost: a\r\n"),
        "quoted-host": (0, "GET / HTTP/1.1\r\nHost: a\"b\\c;d=e\r\n"),
        "no-host": (0, "GET / HTTP/1.0\r\n"),
        # Refused with 400 (RFC 9112 section 3.2): no Host in HTTP/1.1, userinfo, a bad port.
        "no-host-1-1": (0, "GET / HTTP/1.1\r\nAccept: */*\r\n"),
        "userinfo-host": (0, "GET / HTTP/1.1\r\nHost: user@a.test\r\n"),
        "userinfo-target": (0, "GET http://user:pw@a.test/ HTTP/1.1\r\nHost: a.test\r\n"),
        "bad-port-host": (0, "GET / HTTP/1.1\r\nHost: a.test:80:81\r\n"),
        "connection-names-ours": (1, "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for, forwarded, x-forwarded-proto\r\n"
                                     "X-Forwarded-For: 1.1.1.1\r\nForwarded: for=1.1.1.1\r\nX-Forwarded-Proto: https\r\n"),
        "connection-names-host": (0, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n"),
        "obs-text": (1, "GET / HTTP/1.1\r\nHost: caf\xe9\r\nX-Forwarded-For: 1.1.1.1 \xff\r\nConnection: x-a, \xe9\r\nx-a: 1\r\n"),
        "custom-method": (0, "PURGE /cache HTTP/1.1\r\nHost: a\r\n"),
        "many-connection": (0, "GET / HTTP/1.1\r\nHost: a\r\n" + "".join("Connection: x-%d\r\nx-%d: v\r\n" % (i, i) for i in range(20))),
    }
    for name, (flags, head) in seeds.items():
        write("http_request", name, bytes([flags]) + head.encode("latin-1"))


if __name__ == "__main__":
    ipc_lines()
    fd_reader()
    proxy_header()
    config_file()
    http_request()
    sys.exit(0)
