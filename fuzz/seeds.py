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


if __name__ == "__main__":
    ipc_lines()
    fd_reader()
    sys.exit(0)
