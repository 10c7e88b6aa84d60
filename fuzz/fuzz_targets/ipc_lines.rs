//! Fuzz target: the master's read path for one worker's channel, minus the socket. Arbitrary
//! bytes go through the bounded line decoder ([`worker::codec::LineDecoder`]) in chunks, and
//! every line through each parser a line can meet: the master's one entry point for a
//! worker's line, [`WorkerMessage::parse`] (balancer's own messages, Node's
//! `NODE_HANDLE_ACK`/`NACK`, Node's `NODE_CLUSTER` messages and the lenient `"ready 8080"`
//! string forms), and the master messages a worker parses.
//!
//! Besides "no panic", it checks what the callers rely on:
//! - chunking changes nothing: the items from arbitrary chunk boundaries equal those of the
//!   whole input decoded at once;
//! - a line handed out is never longer than the limit and holds no `\n`;
//! - every known message parsed re-serialises to a line that parses back to itself, and the
//!   master's Node cluster replies built from parsed fields are one line of valid JSON.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use worker::codec::{LineDecoder, LineError};
use worker::protocol::{MasterMessage, WorkerMessage, MAX_LINE};
use worker::node::{self, ClusterMessage};

type Item = Result<String, LineError>;

/// Decodes `chunks` fed one after the other, as reads from a socket would come.
fn decode<'a>(max: usize, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Item> {
    let mut dec = LineDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(item) = dec.decode(&mut buf).expect("the decoder does no I/O") {
            if let Ok(line) = &item {
                assert!(line.len() <= max, "a line of {} > {max}", line.len());
                assert!(!line.contains('\n'));
                let wire = dec.last_line_len();
                assert!(wire == line.len() + 1 || wire == line.len() + 2, "wire {wire}");
            }
            out.push(item);
        }
    }
    out
}

/// Chunk lengths 1..=64 from a small xorshift seeded by the input itself.
fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x9e37_0000;
    let mut rest = data;
    let mut out = Vec::new();
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 64 + 1) as usize;
        let (head, tail) = rest.split_at(n.min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

fn check_worker_message(line: &str) {
    let Ok(msg) = WorkerMessage::parse(line) else {
        return;
    };
    match msg {
        WorkerMessage::Unknown | WorkerMessage::HandleAck | WorkerMessage::HandleNack => {}
        // Node's own messages: the master never writes them, it answers them.
        WorkerMessage::Cluster(cluster) => check_cluster_replies(&cluster),
        known => {
            let again = known.to_line();
            assert!(again.ends_with('\n') && again.matches('\n').count() == 1);
            assert_eq!(
                WorkerMessage::parse(again.trim_end()),
                Ok(known),
                "{line:?}"
            );
        }
    }
}

fn check_master_message(line: &str) {
    let Ok(msg) = MasterMessage::parse(line) else {
        return;
    };
    if msg != MasterMessage::Unknown {
        let again = msg.to_line();
        assert_eq!(MasterMessage::parse(again.trim_end()), Ok(msg), "{line:?}");
    }
}

/// The primary's answers to a parsed cluster message, built from its fields (which a worker
/// controls), must each be one line of valid JSON.
fn check_cluster_replies(msg: &ClusterMessage) {
    let mut primary = node::Primary::default();
    let replies = match msg {
        ClusterMessage::QueryServer {
            seq,
            port,
            address,
            address_type,
            index,
        } => {
            let key = node::server_key(address.as_deref(), *port, *address_type, *index);
            vec![
                primary.reply_key(*seq, &key),
                primary.reply_handle(*seq, &key),
                primary.reply_error(*seq, node::UV_EADDRINUSE),
                primary.newconn(&key).0,
            ]
        }
        ClusterMessage::Listening { key } | ClusterMessage::Close { key } => {
            vec![primary.newconn(key).0]
        }
        ClusterMessage::ExitedAfterDisconnect { seq } => vec![primary.ack(*seq)],
        ClusterMessage::Accepted { ack, .. } => vec![primary.ack(*ack)],
        ClusterMessage::Online | ClusterMessage::Other(_) => vec![primary.disconnect()],
    };
    for reply in replies {
        let body = reply.strip_suffix('\n').expect("a reply ends its line");
        assert!(!body.contains('\n'), "a reply is one line: {reply:?}");
        serde_json::from_str::<serde_json::Value>(body).expect("a reply is valid JSON");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    // A small limit makes over-long lines common; the real one is tried too.
    let max = if seed & 1 == 0 { 48 } else { MAX_LINE };
    let whole = decode(max, std::iter::once(stream));
    let pieces = decode(max, chunks(stream, seed).into_iter());
    assert_eq!(whole, pieces, "chunk boundaries changed the lines");
    for line in whole.iter().flatten() {
        check_worker_message(line);
        check_master_message(line);
    }
});
