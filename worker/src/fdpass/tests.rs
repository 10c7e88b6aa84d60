//! Tests of descriptor passing over real socket pairs.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Generous bound for steps that take microseconds, so a broken test fails instead of
/// hanging.
const STEP: Duration = Duration::from_secs(10);

fn pair() -> (UnixStream, FdReader<UnixStream>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (a, FdReader::new(b, 1 << 20))
}

async fn line(reader: &mut FdReader<UnixStream>) -> String {
    tokio::time::timeout(STEP, reader.next_line())
        .await
        .expect("line in time")
        .expect("read ok")
        .expect("not eof")
        .expect("good line")
}

/// True once every copy of the pipe's read end is closed: a write then fails with EPIPE
/// (Rust ignores SIGPIPE). Exact, unlike counting `/proc/self/fd` while other tests run.
fn read_end_closed(w: &mut std::fs::File) -> bool {
    match w.write_all(b"x") {
        Ok(()) => false,
        Err(e) => e.kind() == io::ErrorKind::BrokenPipe,
    }
}

fn pipe() -> (OwnedFd, std::fs::File) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (r, std::fs::File::from(w))
}

fn is_cloexec(fd: &OwnedFd) -> bool {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
    nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
}

#[tokio::test]
async fn listener_travels_and_accepts() {
    let (tx, mut rx) = pair();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    send_message(&tx, &MasterMessage::Listener, &[listener.as_fd()])
        .await
        .expect("send");
    drop(listener); // the received copy is now the only one

    assert_eq!(
        line(&mut rx).await,
        r#"{"cmd":"NODE_HANDLE","type":"net.Server","msg":"server"}"#
    );
    let fd = rx.take_fd().expect("a descriptor with the line");
    assert!(is_cloexec(&fd), "received with MSG_CMSG_CLOEXEC");
    let listener = tcp_listener(fd).expect("a listener");
    assert_eq!(listener.local_addr().expect("addr"), addr);
    let listener = tokio::net::TcpListener::from_std(listener).expect("register");

    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut server, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("accept in time")
        .expect("accept");
    client.write_all(b"hi").await.expect("write");
    let mut got = [0; 2];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"hi");
}

#[tokio::test]
async fn descriptor_with_a_line_written_in_pieces() {
    let (mut tx, mut rx) = pair();
    let (r, mut w) = pipe();
    // Only the first bytes carry the descriptor; the rest of the line follows later.
    send_with_fds(&tx, br#"{"type":"#, &[r.as_fd()])
        .await
        .expect("send");
    drop(r);
    tokio::task::yield_now().await;
    tx.write_all(br#""conn","id":1}"#).await.expect("write");
    tx.write_all(b"\n").await.expect("write");

    assert_eq!(line(&mut rx).await, r#"{"type":"conn","id":1}"#);
    let fd = rx.take_fd().expect("descriptor");
    assert!(rx.take_fd().is_none(), "only one was sent");
    assert!(!read_end_closed(&mut w));
    drop(fd);
    assert!(read_end_closed(&mut w));
}

#[tokio::test]
async fn long_line_is_written_in_chunks_with_the_descriptor_once() {
    let (tx, mut rx) = pair();
    let (r, mut w) = pipe();
    // Far more than a socket buffer: the kernel takes it in several sendmsg calls.
    let mut long = vec![b'a'; 600 * 1024];
    long.push(b'\n');
    let sender = async {
        send_with_fds(&tx, &long, &[r.as_fd()]).await.expect("send");
        send_with_fds(&tx, b"short\n", &[]).await.expect("send");
    };
    let receiver = async {
        let first = line(&mut rx).await;
        let fd = rx.take_fd();
        let second = line(&mut rx).await;
        (first, fd, second, rx.take_fd())
    };
    let ((), (first, fd, second, none)) = tokio::join!(sender, receiver);
    assert_eq!(first.len(), 600 * 1024);
    assert!(fd.is_some(), "the long line brought its descriptor");
    assert_eq!(second, "short");
    assert!(
        none.is_none(),
        "the descriptor went with the first chunk only"
    );
    drop(r);
    drop(fd);
    assert!(read_end_closed(&mut w));
}

#[tokio::test]
async fn two_messages_each_with_a_descriptor_keep_their_order() {
    let (tx, mut rx) = pair();
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    send_message(&tx, &MasterMessage::Conn { id: 1 }, &[a.as_fd()])
        .await
        .expect("send");
    send_message(&tx, &MasterMessage::Conn { id: 2 }, &[b.as_fd()])
        .await
        .expect("send");

    assert_eq!(line(&mut rx).await, r#"{"type":"conn","id":1}"#);
    let first = tcp_listener(rx.take_fd().expect("first")).expect("listener");
    assert_eq!(line(&mut rx).await, r#"{"type":"conn","id":2}"#);
    let second = tcp_listener(rx.take_fd().expect("second")).expect("listener");
    assert_eq!(first.local_addr().ok(), a.local_addr().ok());
    assert_eq!(second.local_addr().ok(), b.local_addr().ok());
}

#[tokio::test]
async fn unclaimed_descriptors_are_closed() {
    let (tx, mut rx) = pair();
    let (r, mut w) = pipe();
    // A message that expects no handle, sent with one anyway.
    send_with_fds(&tx, b"{\"type\":\"ping\",\"seq\":1}\n", &[r.as_fd()])
        .await
        .expect("send");
    drop(r);
    send_with_fds(&tx, b"{\"type\":\"shutdown\"}\n", &[])
        .await
        .expect("send");

    assert_eq!(line(&mut rx).await, r#"{"type":"ping","seq":1}"#);
    assert!(!read_end_closed(&mut w), "kept until the next line is read");
    assert_eq!(line(&mut rx).await, r#"{"type":"shutdown"}"#);
    assert!(read_end_closed(&mut w), "closed once its line was done");
    assert_eq!(rx.queued_fds(), 0);
}

#[tokio::test]
async fn a_line_without_its_descriptor_does_not_take_the_next_ones() {
    let (tx, mut rx) = pair();
    let (r, _w) = pipe();
    send_with_fds(&tx, b"{\"type\":\"conn\",\"id\":1}\n", &[])
        .await
        .expect("send");
    send_with_fds(&tx, b"{\"type\":\"conn\",\"id\":2}\n", &[r.as_fd()])
        .await
        .expect("send");
    // Both lines may well arrive in one read: the descriptor still goes to the second.
    assert_eq!(line(&mut rx).await, r#"{"type":"conn","id":1}"#);
    assert!(rx.take_fd().is_none(), "id 1 must not take id 2's handle");
    assert_eq!(line(&mut rx).await, r#"{"type":"conn","id":2}"#);
    assert!(rx.take_fd().is_some());
}

#[tokio::test]
async fn descriptors_are_closed_at_end_of_stream() {
    let (tx, mut rx) = pair();
    let (r, mut w) = pipe();
    send_with_fds(&tx, b"no newline", &[r.as_fd()])
        .await
        .expect("send");
    drop(r);
    drop(tx);
    let end = tokio::time::timeout(STEP, rx.next_line())
        .await
        .expect("in time");
    assert!(matches!(end, Ok(None)));
    assert!(read_end_closed(&mut w));
}

#[tokio::test]
async fn truncated_control_data_closes_what_arrived() {
    let (tx, mut rx) = pair();
    let pipes: Vec<_> = (0..MAX_FDS_PER_MESSAGE + 2).map(|_| pipe()).collect();
    let raw: Vec<RawFd> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
    // More descriptors than the receiver has room for (send_with_fds refuses this).
    sendmsg::<()>(
        tx.as_raw_fd(),
        &[IoSlice::new(b"{\"type\":\"listener\"}\n")],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let mut writers = Vec::new();
    for (r, w) in pipes {
        drop(r);
        writers.push(w);
    }
    assert_eq!(line(&mut rx).await, r#"{"type":"listener"}"#);
    assert!(
        rx.take_fd().is_none(),
        "a truncated message gets no handles"
    );
    for w in &mut writers {
        assert!(read_end_closed(w));
    }
}

#[tokio::test]
async fn descriptors_in_the_middle_of_a_line_are_closed() {
    let (tx, mut rx) = pair();
    let mut pipes: Vec<_> = (0..MAX_QUEUED_FDS + 8).map(|_| pipe()).collect();
    // Every byte of one endless line carries a descriptor; each read brings one, and only
    // the first came with the start of a line.
    for (r, _) in &pipes {
        send_with_fds(&tx, b"a", &[r.as_fd()]).await.expect("send");
    }
    let mut writers: Vec<_> = pipes.drain(..).map(|(_, w)| w).collect();
    send_with_fds(&tx, b"\n", &[]).await.expect("send");
    assert_eq!(line(&mut rx).await.len(), MAX_QUEUED_FDS + 8);
    assert_eq!(
        rx.queued_fds(),
        1,
        "only the line's first byte brought a handle"
    );
    assert!(!read_end_closed(&mut writers[0]));
    for w in &mut writers[1..] {
        assert!(read_end_closed(w));
    }
    drop(tx);
    let end = tokio::time::timeout(STEP, rx.next_line())
        .await
        .expect("in time");
    assert!(matches!(end, Ok(None)));
    assert_eq!(rx.queued_fds(), 0);
    assert!(read_end_closed(&mut writers[0]));
}

#[tokio::test]
async fn sender_rejects_bad_counts() {
    let (tx, _rx) = pair();
    let (r, _w) = pipe();
    let many = vec![r.as_fd(); MAX_FDS_PER_MESSAGE + 1];
    let err = send_with_fds(&tx, b"x\n", &many)
        .await
        .expect_err("too many");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = send_with_fds(&tx, b"", &[r.as_fd()])
        .await
        .expect_err("no byte");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = send_with_fds(&tx, b"one\ntwo\n", &[r.as_fd()])
        .await
        .expect_err("two lines");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = send_message(&tx, &MasterMessage::Listener, &[])
        .await
        .expect_err("listener without its handle");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = send_message(&tx, &MasterMessage::Shutdown, &[r.as_fd()])
        .await
        .expect_err("shutdown with a handle");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn wrong_kinds_of_descriptor_are_refused() {
    let (r, _w) = pipe();
    assert!(matches!(tcp_listener(r), Err(HandleError::Inspect(_))));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    assert!(matches!(
        tcp_stream(OwnedFd::from(listener)),
        Err(HandleError::WrongKind { .. })
    ));
    let (unix, _other) = std::os::unix::net::UnixStream::pair().expect("pair");
    assert!(matches!(
        tcp_stream(OwnedFd::from(unix)),
        Err(HandleError::WrongKind { .. })
    ));
    let unbound = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = unbound.local_addr().expect("addr");
    let client = std::net::TcpStream::connect(addr).expect("connect");
    assert!(matches!(
        tcp_listener(OwnedFd::from(client)),
        Err(HandleError::WrongKind { .. })
    ));
}
