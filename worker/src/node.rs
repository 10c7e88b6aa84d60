//! Node.js's wire protocol, as far as balancer speaks it, in one place: the `NODE_HANDLE`
//! messages that carry a descriptor (the shared listener, a handle's acknowledgement) and
//! the `NODE_CLUSTER` messages of the `cluster` module, so that an unchanged cluster program
//! (`if (cluster.isPrimary) { fork… } else { server.listen(…) }`) runs with balancer as its
//! primary. The master's *policy* as a primary (which server it balances, how each
//! `listen()` is served) is the master's; this module only reads and writes the messages.
//!
//! A Node process started with `NODE_UNIQUE_ID` in its environment takes the worker path:
//! it sends `online`, and every `server.listen()` becomes a `queryServer` request answered by
//! the primary, either with a listening handle (the worker accepts itself) or with only a key
//! (the primary accepts and hands each connection over as `newconn`). All messages are
//! internal ones, `{"cmd":"NODE_CLUSTER",…,"seq":N}`; replies carry `"ack"` = the request's
//! `seq`. Messages that carry a handle are wrapped as
//! `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{…}}` with the fd attached. Shapes follow
//! Node's `lib/internal/cluster/{child,primary,utils}.js`.

use serde_json::{json, Map, Value};

/// The line that carries the listening socket in shared mode: exactly what a Node primary
/// sends for `worker.send('server', server)`, so a Node worker receives it as
/// `process.on('message', (msg, server) => ...)` with `msg === 'server'`.
pub const LISTENER_LINE: &str =
    "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Server\",\"msg\":\"server\"}\n";
/// The acknowledgement a receiver of a handle sends.
pub const ACK_LINE: &str = "{\"cmd\":\"NODE_HANDLE_ACK\"}\n";

/// The environment variable that turns a Node program into a cluster worker.
pub const ENV_NODE_UNIQUE_ID: &str = "NODE_UNIQUE_ID";

/// Node's `UV_EADDRINUSE`, the errno a worker reports when its `listen()` cannot be served.
pub const UV_EADDRINUSE: i64 = -98;

/// A cluster message from a worker, as far as the primary acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMessage {
    /// The worker process is up.
    Online,
    /// `server.listen()` in the worker: which address it wants.
    QueryServer {
        /// The request's sequence number, to acknowledge.
        seq: u64,
        /// Requested port (0: any; negative: a pipe or a handle/fd rather than a TCP port).
        port: i64,
        /// Requested address, if any.
        address: Option<String>,
        /// 4, 6, or -1 for pipes and handles.
        address_type: i64,
        /// Node's per-worker index for servers with the same address.
        index: i64,
    },
    /// A server of the worker is listening.
    Listening {
        /// The server's key (see [`server_key`]): Node resends the `queryServer` fields.
        key: String,
    },
    /// Answer to a `newconn`: whether the worker took the connection.
    Accepted {
        /// The `seq` of the `newconn`.
        ack: u64,
        /// False when the server is gone or at its `maxConnections`.
        accepted: bool,
    },
    /// The worker closed the server with this key.
    Close {
        /// The key from the `queryServer` reply.
        key: String,
    },
    /// The worker calls `worker.disconnect()` itself and waits for this to be acknowledged.
    ExitedAfterDisconnect {
        /// The request's sequence number, to acknowledge.
        seq: u64,
    },
    /// Anything else (ignored).
    Other(String),
}

/// Reads a `NODE_CLUSTER` message; `None` if `map` is not one. [`WorkerMessage::parse`]
/// calls it, so each line is parsed once.
///
/// [`WorkerMessage::parse`]: crate::protocol::WorkerMessage::parse
pub fn parse_cluster(map: &Map<String, Value>) -> Option<ClusterMessage> {
    if map.get("cmd").and_then(Value::as_str) != Some("NODE_CLUSTER") {
        return None;
    }
    let int = |k: &str| map.get(k).and_then(Value::as_i64);
    let seq = map.get("seq").and_then(Value::as_u64).unwrap_or(0);
    if let Some(ack) = map.get("ack").and_then(Value::as_u64) {
        if let Some(accepted) = map.get("accepted").and_then(Value::as_bool) {
            return Some(ClusterMessage::Accepted { ack, accepted });
        }
    }
    Some(match map.get("act").and_then(Value::as_str).unwrap_or("") {
        "online" => ClusterMessage::Online,
        "queryServer" => ClusterMessage::QueryServer {
            seq,
            port: int("port").unwrap_or(-1),
            address: map
                .get("address")
                .and_then(Value::as_str)
                .map(str::to_owned),
            address_type: int("addressType").unwrap_or(-1),
            index: int("index").unwrap_or(0),
        },
        "listening" => ClusterMessage::Listening {
            key: server_key(
                map.get("address").and_then(Value::as_str),
                int("port").unwrap_or(-1),
                int("addressType").unwrap_or(-1),
                int("index").unwrap_or(0),
            ),
        },
        "close" => ClusterMessage::Close {
            key: map
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        },
        "exitedAfterDisconnect" => ClusterMessage::ExitedAfterDisconnect { seq },
        other => ClusterMessage::Other(other.to_owned()),
    })
}

/// The key Node uses for a server: address, port, type and index.
pub fn server_key(address: Option<&str>, port: i64, address_type: i64, index: i64) -> String {
    format!(
        "{}:{port}:{address_type}:{index}",
        address.unwrap_or("null")
    )
}

/// Produces the primary's messages, numbering them as Node's `sendHelper` does.
#[derive(Debug, Default)]
pub struct Primary {
    seq: u64,
}

impl Primary {
    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    fn line(&mut self, mut body: Map<String, Value>) -> (u64, Value) {
        let seq = self.next_seq();
        body.insert("cmd".into(), json!("NODE_CLUSTER"));
        body.insert("seq".into(), json!(seq));
        (seq, Value::Object(body))
    }

    /// Reply to `queryServer` without a handle: the primary accepts, connections come as
    /// `newconn`. `sockname` is left out on purpose, so Node skips its port check.
    pub fn reply_key(&mut self, ack: u64, key: &str) -> String {
        let (_, v) = self.line(obj(
            json!({"ack": ack, "key": key, "errno": 0, "data": null}),
        ));
        format!("{v}\n")
    }

    /// Reply to `queryServer` refusing it with `errno`.
    pub fn reply_error(&mut self, ack: u64, errno: i64) -> String {
        let (_, v) = self.line(obj(json!({"ack": ack, "errno": errno, "data": null})));
        format!("{v}\n")
    }

    /// Reply to `queryServer` with a listening handle attached (send the fd with it).
    pub fn reply_handle(&mut self, ack: u64, key: &str) -> String {
        let (_, v) = self.line(obj(
            json!({"ack": ack, "key": key, "errno": 0, "data": null}),
        ));
        handle_line(v)
    }

    /// A connection for server `key` (send the accepted socket's fd with it). Returns the
    /// line and its `seq`, which the worker's answer acknowledges.
    pub fn newconn(&mut self, key: &str) -> (String, u64) {
        let (seq, v) = self.line(obj(json!({"act": "newconn", "key": key})));
        (handle_line(v), seq)
    }

    /// Asks the worker to close its servers and disconnect (a graceful stop).
    pub fn disconnect(&mut self) -> String {
        let (_, v) = self.line(obj(json!({"act": "disconnect"})));
        format!("{v}\n")
    }

    /// Acknowledges a worker's request that waits for it.
    pub fn ack(&mut self, ack: u64) -> String {
        let (_, v) = self.line(obj(json!({"ack": ack})));
        format!("{v}\n")
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Node's wrapper for a message that carries a handle.
fn handle_line(msg: Value) -> String {
    format!(
        "{}\n",
        json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": msg})
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &str) -> Map<String, Value> {
        obj(serde_json::from_str(s).unwrap())
    }

    #[test]
    fn parses_what_node_20_sends() {
        assert_eq!(
            parse_cluster(&map(r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#)),
            Some(ClusterMessage::Online)
        );
        let q = r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":0,"addressType":4,"flags":0,"backlog":false,"seq":1}"#;
        assert_eq!(
            parse_cluster(&map(q)),
            Some(ClusterMessage::QueryServer {
                seq: 1,
                port: 0,
                address: Some("127.0.0.1".into()),
                address_type: 4,
                index: 0
            })
        );
        assert_eq!(
            parse_cluster(&map(
                r#"{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":3}"#
            )),
            Some(ClusterMessage::Accepted {
                ack: 5,
                accepted: true
            })
        );
        assert_eq!(parse_cluster(&map(r#"{"type":"ready","port":1}"#)), None);
    }

    #[test]
    fn replies_have_node_shapes() {
        let mut p = Primary::default();
        let r: Value = serde_json::from_str(&p.reply_key(1, "k")).unwrap();
        assert_eq!(r["cmd"], "NODE_CLUSTER");
        assert_eq!(r["ack"], 1);
        assert_eq!(r["seq"], 0);
        assert!(r.get("sockname").is_none());
        let (line, seq) = p.newconn("k");
        let n: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (n["cmd"].as_str(), n["type"].as_str()),
            (Some("NODE_HANDLE"), Some("net.Native"))
        );
        assert_eq!(n["msg"]["act"], "newconn");
        assert_eq!(n["msg"]["seq"], seq);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
    }
}
