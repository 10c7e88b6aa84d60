//! Property tests (a fuzz target run on every `cargo test`): the IPC parsers never panic,
//! whatever a worker or master sends, and the line decoder never loses framing.

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use worker::codec::LineDecoder;
use worker::{MasterMessage, WorkerMessage};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn worker_parser_never_panics(line in ".{0,300}") {
        let _ = WorkerMessage::parse(&line);
        let _ = MasterMessage::parse(&line);
    }

    #[test]
    fn json_shaped_lines_never_panic(port in any::<i64>(), kind in "[a-z]{0,8}", extra in ".{0,40}") {
        let line = format!(r#"{{"type":"{kind}","port":{port},"seq":{port},"x":{extra:?}}}"#);
        let _ = WorkerMessage::parse(&line);
        let _ = MasterMessage::parse(&line);
        let s = format!("{port} {kind}");
        let _ = WorkerMessage::parse(&serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn decoder_keeps_framing_under_any_chunking(
        lines in proptest::collection::vec("[^\n]{0,40}", 0..20),
        cuts in proptest::collection::vec(0usize..64, 0..20),
    ) {
        let max = 32;
        let mut stream = Vec::new();
        for l in &lines {
            stream.extend_from_slice(l.as_bytes());
            stream.push(b'\n');
        }
        let mut dec = LineDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(item) = dec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        // Every input line yields exactly one item: the line itself, or TooLong.
        prop_assert_eq!(out.len(), lines.len());
        for (item, line) in out.iter().zip(&lines) {
            let trimmed = line.strip_suffix('\r').unwrap_or(line);
            match item {
                Ok(text) => prop_assert_eq!(text.as_str(), trimmed),
                Err(_) => prop_assert!(line.len() > max),
            }
        }
    }
}
