//! TLS termination with rustls (`--tls-cert`, `--tls-key`): loading the PEM certificate
//! chain and key, reloading them without dropping a connection, accepting TLS on a client
//! socket, and the tcp path's TLS variant (terminate, then copy plain bytes to a backend).
//!
//! The crypto provider is *ring*: it builds with only a C compiler, which every machine
//! that builds Rust has; aws-lc-rs (rustls' default) also wants cmake or NASM for its
//! C build. The provider is passed explicitly, never installed process-wide.
//!
//! Reloading swaps the [`CertifiedKey`] behind the server's certificate resolver
//! ([`ArcSwap`]): new handshakes get the new pair, established connections keep theirs,
//! and a file that does not load leaves the old pair in place.
//!
//! The tcp path's TLS variant copies with `tokio::io::copy_bidirectional` (rustls is an
//! `AsyncRead`/`AsyncWrite`, not a socket the copy loop of `copy.rs` can read directly), with
//! each side wrapped in [`Noted`]: reads are noted in an [`Activity`] and a client between
//! exchanges is not read while an in-place upgrade quiesces, so the drain rules of
//! [`crate::quiesce`] hold here too, and `--idle-timeout` and `--response-timeout` are
//! watched by the plain path's own `forward::cut_short` (passive health included).
//! An idle TLS connection (at an upgrade, or for the idle timeout) is ended with a
//! `close_notify` and a FIN, which a TLS client takes as a clean close of its keep-alive
//! connection; a backend's EOF ends the client's side with a `close_notify` and one close
//! (`Ends`), without waiting for the client. A handshake not done within
//! `--tls-handshake-timeout` ([`HANDSHAKE_TIMEOUT`]) is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::backends::Backends;
use crate::copy::BackendEof;
use crate::forward::{ForwardConfig, ForwardError, Forwarded, Transfer};
use crate::server::{accept_loop, record, Connections, Proxy};

/// How long a tcp-mode client may take to finish its TLS handshake (the default of
/// `--tls-handshake-timeout`): as long as an HTTP client may take to send its head (the
/// http path's handshake counts toward its 10 s header timeout), so a stalled handshake
/// holds a connection permit no longer. Shorter than nginx's 60 s `ssl_handshake_timeout`:
/// a handshake takes a round trip or two, and a client that connects and says nothing holds
/// its permit all that while. An in-place upgrade's drain does not wait this long (see
/// [`forward`]).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the `close_notify` (and the FIN after it) of a connection ended at an in-place
/// upgrade may take to go out. The connection is idle, so its socket has room and this
/// takes one write; the bound only keeps a wedged peer from holding the drain.
const CLOSE_NOTIFY: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed as PEM certificates.
    #[error("reading the certificate {path}: {source}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The key file could not be read or holds no PEM private key.
    #[error("reading the key {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The key is not usable, or does not belong to the certificate.
    #[error("using the key {path} with its certificate: {source}")]
    Pair {
        /// The key file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The server configuration was refused (no usable protocol version).
    #[error("configuring TLS: {0}")]
    Config(#[source] rustls::Error),
}

/// Which protocols ALPN offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` and `http/1.1` (http mode).
    Http,
    /// None (tcp mode: the bytes inside are the backend's business).
    None,
}

/// The certificate and key, swappable while connections are open.
#[derive(Debug)]
struct Store {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Store {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS termination: the acceptor and the files it reloads from.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    store: Arc<Store>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads `cert` (PEM, full chain, leaf first) and `key` (PEM, PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path, alpn: Alpn) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = load_pair(cert, key, &provider)?;
        let store = Arc::new(Store {
            current: ArcSwap::from_pointee(pair),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&store) as Arc<dyn ResolvesServerCert>);
        if alpn == Alpn::Http {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            store,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the files again and, if they load, serves the new pair to new handshakes.
    /// On error the old pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.cert, &self.key, &self.provider)?;
        self.store.current.store(Arc::new(pair));
        Ok(())
    }

    /// Runs the server handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_err = |source| TlsError::Cert {
        path: cert.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(cert_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cert_err)?;
    if chain.is_empty() {
        return Err(cert_err(rustls::pki_types::pem::Error::NoItemsFound));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::Pair {
        path: key.to_owned(),
        source,
    })
}

/// A client connection, with or without TLS.
#[derive(Debug)]
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: rustls' state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The protocol ALPN settled on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(t) => t.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The tcp path with TLS terminated: accepts on `listener` like [`crate::serve`] and, for
/// each client, runs the handshake and forwards the decrypted bytes ([`forward`]).
pub async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    tls: Arc<Tls>,
    stop: CancellationToken,
    conns: Connections,
) {
    let shared = Arc::clone(&proxy);
    accept_loop(
        listener,
        &proxy,
        stop,
        &conns,
        move |client, from: crate::ClientAddr| {
            let (proxy, tls) = (Arc::clone(&shared), Arc::clone(&tls));
            async move {
                let result =
                    forward(&tls, client, from.addr, &proxy.backends, &proxy.forward).await;
                record(&proxy.stats, from, result.map(Forwarded::Copied));
            }
        },
    )
    .await;
}

/// The tcp path with TLS: runs the handshake (within `config.tls_handshake_timeout`),
/// connects to a backend (the next one on a refused or timed-out connect, each at most once)
/// and copies the decrypted bytes both ways until both sides close, or the backend's does
/// ([`BackendEof::Close`]), or a timeout of `config` ends the connection, as on the plain path.
pub async fn forward(
    tls: &Tls,
    client: TcpStream,
    peer: SocketAddr,
    backends: &Backends,
    config: &ForwardConfig,
) -> Result<Transfer, ForwardError> {
    let quiesce = &*config.quiesce;
    // By descriptor: the handshake owns the stream while the quiesce look asks.
    let client_fd = client.as_raw_fd();
    let handshake = tokio::time::timeout(config.tls_handshake_timeout, tls.accept(client));
    let nothing_yet = Activity::default();
    let mut client = tokio::select! {
        shaken = handshake => match shaken {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ForwardError::Copy(e)),
            Err(_) => return Err(ForwardError::Copy(io::ErrorKind::TimedOut.into())),
        },
        // Nothing moved yet, so an upgrade's drain gives the handshake FIRST_BYTES, as the
        // plain path gives a client's first bytes, not the whole handshake timeout.
        () = quiesce.idle(&nothing_yet, || crate::forward::unsent_fd(client_fd), || {}) => {
            return Err(ForwardError::Quiesced);
        }
    };
    let mut tried = Vec::new();
    let mut last = None;
    let (_active, backend, mut upstream) = loop {
        let Some(backend) = backends.pick_excluding(&tried) else {
            return Err(match last {
                Some(last) => ForwardError::AllFailed {
                    tries: tried.len(),
                    last,
                },
                None => ForwardError::NoBackend,
            });
        };
        tried.push(backend.key);
        let active = backend.open();
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => {
                backend.record_connect(true);
                break (active, backend, s);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(io::ErrorKind::TimedOut.into()),
        }
        backend.record_connect(false);
        tracing::debug!(%peer, addr = %backend.addr, error = ?last, "backend connect failed, trying next");
    };
    let _ = upstream.set_nodelay(true);
    let activity = Activity::default();
    // By descriptor: the copy holds the stream mutably while the quiesce look asks.
    let client_fd = client.get_ref().0.as_raw_fd();
    let busy = || {
        tracing::debug!(%peer, owes = activity.owes(), answered = activity.answered(), "tls connection still busy while quiescing");
    };
    let ends = (config.on_backend_eof == BackendEof::Close).then_some(Ends {
        fd: client_fd,
        close_notify: |s: &mut &mut TlsStream<TcpStream>| s.get_mut().1.send_close_notify(),
    });
    let outcome = {
        let mut a = Noted::new(
            &mut client,
            &activity,
            Activity::to_backend,
            Some(quiesce),
            ends,
        );
        let mut b = Noted::new(&mut upstream, &activity, Activity::to_client, None, None);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut a, &mut b) => copied.map_err(ForwardError::Copy),
            cut = crate::forward::cut_short(&activity, config, &backend) => Err(cut),
            () = quiesce.idle(&activity, || crate::forward::unsent_fd(client_fd), busy) => Err(ForwardError::Quiesced),
        }
    };
    crate::forward::note_health(&backend, &activity, &outcome);
    if let Err(ForwardError::Quiesced | ForwardError::Idle(_)) = outcome {
        // Idle (at an in-place upgrade, or for the idle timeout): a held request is dropped
        // unread (an unread byte would turn the close into an RST), then close_notify and
        // FIN, so the client sees its keep-alive connection closed cleanly (and sends a
        // held request again). A response timeout or a retired backend gets no close_notify:
        // the client must not take a missing answer for a whole one.
        crate::forward::discard_unread(client.get_ref().0);
        let _ = tokio::time::timeout(CLOSE_NOTIFY, client.shutdown()).await;
    }
    let (to_backend, to_client) = outcome?;
    Ok(Transfer {
        to_backend,
        to_client,
    })
}

/// How the client's side of the TLS copy ends when the backend's EOF ends the connection
/// ([`BackendEof::Close`], as `copy.rs` does it): `copy_bidirectional` shuts the client down
/// once the backend's bytes are delivered; instead of a `shutdown(SHUT_WR)` and a wait for
/// the client's own close, a `close_notify` goes out and the client's read side ends at
/// once, so the copy returns and both sockets are closed (one `close`). A client with bytes
/// in its socket that nobody read gets the half-close instead (closing would send an RST,
/// which can destroy the answer in flight).
struct Ends<S> {
    /// The client's socket, asked whether it holds unread bytes.
    fd: std::os::fd::RawFd,
    /// Queues the `close_notify` (rustls' `send_close_notify`).
    close_notify: fn(&mut S),
}

/// One side of the TLS path's copy: notes each read that brought bytes in `activity` (with
/// its direction, `read`), and while `hold` (an in-place upgrade's [`crate::quiesce::Quiesce`])
/// holds the client, does not read it (see [`crate::quiesce`]): `copy.rs`'s rules, for a
/// stream that is not a bare socket.
struct Noted<'a, S> {
    inner: S,
    activity: &'a Activity,
    read: fn(&Activity),
    hold: Option<&'a crate::quiesce::Quiesce>,
    /// While held: the wait for the quiescing to end (the upgrade was refused or failed).
    resumed: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    /// The client's side, when the backend's EOF ends the connection (see [`Ends`]); `None`
    /// once it was found to need the half-close instead.
    ends: Option<Ends<S>>,
    /// The `close_notify` is queued: reads end, and the shutdown only flushes it.
    ended: bool,
}

impl<'a, S> Noted<'a, S> {
    fn new(
        inner: S,
        activity: &'a Activity,
        read: fn(&Activity),
        hold: Option<&'a crate::quiesce::Quiesce>,
        ends: Option<Ends<S>>,
    ) -> Self {
        Self {
            inner,
            activity,
            read,
            hold,
            resumed: None,
            ends,
            ended: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Noted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            // The backend ended the connection: this side is over too (see `Ends`).
            return Poll::Ready(Ok(()));
        }
        // Checked on every read the copy asks for, so a request that arrives once the
        // quiescing began is held too.
        if let Some(q) = this.hold {
            if this.resumed.is_none() && q.holds(this.activity) {
                this.resumed = Some(Box::pin(q.resumed()));
            }
            if let Some(resumed) = this.resumed.as_mut() {
                std::task::ready!(resumed.as_mut().poll(cx));
                this.resumed = None;
            }
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            (this.read)(this.activity);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Noted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ended {
            match this.ends.take() {
                Some(ends) if crate::copy::has_unread(&ends.fd) => {}
                Some(ends) => {
                    (ends.close_notify)(&mut this.inner);
                    this.ended = true;
                }
                None => {}
            }
        }
        if !this.ended {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        // The copy polled this side's read before this shutdown: it must look again to see
        // the read side ended.
        cx.waker().wake_by_ref();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A fresh self-signed pair for `localhost`, written to `dir`; returns the cert DER.
    fn write_pair(dir: &Path) -> CertificateDer<'static> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        ck.cert.der().clone()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("balancer-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Connects with TLS trusting `roots`, offering `alpn`; returns the stream.
    async fn connect(
        addr: SocketAddr,
        roots: &[CertificateDer<'static>],
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn alpn_and_reload_keep_open_connections() {
        let dir = temp_dir("reload");
        let first = write_pair(&dir);
        let tls =
            Arc::new(Tls::load(&dir.join("cert.pem"), &dir.join("key.pem"), Alpn::Http).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::clone(&tls);
        let _srv = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = Arc::clone(&server);
                tokio::spawn(async move {
                    let Ok(mut s) = tls.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 16];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut old = connect(addr, std::slice::from_ref(&first), &[b"h2", b"http/1.1"]).await;
        assert_eq!(old.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        // A bad file keeps the old pair.
        std::fs::write(dir.join("key.pem"), "not a key").unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Key { .. })));
        let still = connect(addr, std::slice::from_ref(&first), &[b"http/1.1"]).await;
        assert_eq!(still.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        // A good new pair is served to new handshakes; the old connection goes on.
        let second = write_pair(&dir);
        tls.reload().unwrap();
        let new = connect(addr, std::slice::from_ref(&second), &[]).await;
        assert_eq!(new.get_ref().1.peer_certificates().unwrap()[0], second);
        old.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), old.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"ping");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// At an in-place upgrade a TLS connection with a request outstanding is not cut: its
    /// (slow) answer is delivered, the client's next request is held back (never reaches the
    /// backend), and the then idle connection ends with a close_notify (`read_to_end` is
    /// `Ok` only after one: a bare FIN is an `UnexpectedEof`).
    #[tokio::test]
    async fn at_an_upgrade_an_owed_answer_is_delivered_then_the_idle_connection_gets_close_notify()
    {
        let dir = temp_dir("quiesce");
        let root = write_pair(&dir);
        let tls = Tls::load(&dir.join("cert.pem"), &dir.join("key.pem"), Alpn::None).unwrap();
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backends = Backends::new(crate::backends::Policy::RoundRobin);
        backends.insert(1, 0, backend.local_addr().unwrap());
        let config = ForwardConfig::default();
        let quiesce = Arc::clone(&config.quiesce);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let proxy = async {
            let (c, peer) = front.accept().await.unwrap();
            forward(&tls, c, peer, &backends, &config).await
        };
        let server = async {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut req = [0u8; 3];
            s.read_exact(&mut req).await.unwrap();
            // The upgrade begins with the request outstanding, and the answer is slow: many
            // quiesce looks find the connection owing, not idle.
            quiesce.start();
            tokio::time::sleep(crate::quiesce::LOOK * 8).await;
            s.write_all(b"answer").await.unwrap();
            // What else reaches the backend before the proxy closes its side.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        };
        let client = async {
            let mut c = connect(addr, std::slice::from_ref(&root), &[]).await;
            c.write_all(b"req").await.unwrap();
            let mut answer = [0u8; 6];
            c.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"answer");
            // The next request, at once: held, never delivered.
            c.write_all(b"next").await.unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
                .await
                .expect("the idle connection was not closed")
                .expect("closed without a close_notify");
            rest
        };
        let (forwarded, at_backend, at_client) = tokio::join!(proxy, server, client);
        assert!(
            matches!(forwarded, Err(ForwardError::Quiesced)),
            "{forwarded:?}"
        );
        assert!(at_backend.is_empty(), "{at_backend:?}");
        assert!(at_client.is_empty(), "{at_client:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One backend at `backend`, for `forward`.
    fn one_backend(backend: &TcpListener) -> Backends {
        let backends = Backends::new(crate::backends::Policy::RoundRobin);
        backends.insert(1, 0, backend.local_addr().unwrap());
        backends
    }

    /// The backend answers and closes; the client keeps its side open: the connection ends
    /// all the same (the client reads a close_notify), as on the plain path, instead of
    /// waiting for the client's close.
    #[tokio::test]
    async fn a_backend_eof_ends_the_connection_without_waiting_for_the_client() {
        let dir = temp_dir("backend-eof");
        let root = write_pair(&dir);
        let tls = Tls::load(&dir.join("cert.pem"), &dir.join("key.pem"), Alpn::None).unwrap();
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backends = one_backend(&backend);
        let config = ForwardConfig::default();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let proxy = async {
            let (c, peer) = front.accept().await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(10),
                forward(&tls, c, peer, &backends, &config),
            )
            .await
        };
        let server = async {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut req = [0u8; 3];
            s.read_exact(&mut req).await.unwrap();
            s.write_all(b"answer").await.unwrap();
        };
        let client = async {
            let mut c = connect(addr, std::slice::from_ref(&root), &[]).await;
            c.write_all(b"req").await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
                .await
                .expect("not closed")
                .expect("closed without a close_notify");
            // Kept open (not even half-closed) until the proxy is done.
            (c, got)
        };
        let (forwarded, (), (_open, got)) = tokio::join!(proxy, server, client);
        let t = forwarded
            .expect("the proxy waited for the client's close")
            .unwrap();
        assert_eq!((t.to_backend, t.to_client), (3, 6));
        assert_eq!(got, b"answer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--response-timeout` holds on the TLS path: a backend that reads and never answers
    /// ends the connection and is charged a failed response.
    #[tokio::test]
    async fn a_silent_backend_meets_the_response_timeout() {
        let dir = temp_dir("response");
        let root = write_pair(&dir);
        let tls = Tls::load(&dir.join("cert.pem"), &dir.join("key.pem"), Alpn::None).unwrap();
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backends = one_backend(&backend);
        let config = ForwardConfig {
            response_timeout: Some(Duration::from_millis(200)),
            ..ForwardConfig::default()
        };
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let proxy = async {
            let (c, peer) = front.accept().await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(10),
                forward(&tls, c, peer, &backends, &config),
            )
            .await
        };
        let server = async {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut req = [0u8; 3];
            s.read_exact(&mut req).await.unwrap();
            s
        };
        let client = async {
            let mut c = connect(addr, std::slice::from_ref(&root), &[]).await;
            c.write_all(b"req").await.unwrap();
            c
        };
        let (forwarded, _held, _client) = tokio::join!(proxy, server, client);
        let forwarded = forwarded.expect("no response timeout on the TLS path");
        assert!(
            matches!(forwarded, Err(ForwardError::NoResponse(_))),
            "{forwarded:?}"
        );
        assert_eq!(backends.snapshot()[0].response_failures(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_or_mismatched_files_are_errors() {
        let dir = temp_dir("bad");
        write_pair(&dir);
        let missing = Tls::load(&dir.join("nope.pem"), &dir.join("key.pem"), Alpn::None);
        assert!(matches!(missing, Err(TlsError::Cert { .. })));
        // The key of another pair does not fit the certificate.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("other.pem"), other.signing_key.serialize_pem()).unwrap();
        let mismatched = Tls::load(&dir.join("cert.pem"), &dir.join("other.pem"), Alpn::None);
        assert!(
            matches!(mismatched, Err(TlsError::Pair { .. })),
            "{mismatched:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
