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

use std::io;
use std::net::SocketAddr;
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::forward::{ForwardConfig, ForwardError, Forwarded, Transfer};
use crate::server::{accept_loop, record, Connections, Proxy};

/// How long a tcp-mode client may take to finish its TLS handshake: as long as an HTTP
/// client may take to send its head, so a stalled handshake holds a permit no longer.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
                let result = forward(
                    &tls,
                    client,
                    from.addr,
                    &proxy.backends,
                    &proxy.forward,
                    HANDSHAKE_TIMEOUT,
                )
                .await;
                record(&proxy.stats, from, result.map(Forwarded::Copied));
            }
        },
    )
    .await;
}

/// The tcp path with TLS: runs the handshake (within `handshake_timeout`), connects to a
/// backend (the next one on a refused or timed-out connect, each at most once) and copies
/// the decrypted bytes both ways until both sides close.
pub async fn forward(
    tls: &Tls,
    client: TcpStream,
    peer: SocketAddr,
    backends: &Backends,
    config: &ForwardConfig,
    handshake_timeout: std::time::Duration,
) -> Result<Transfer, ForwardError> {
    let handshake = tokio::time::timeout(handshake_timeout, tls.accept(client)).await;
    let mut client = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ForwardError::Copy(e)),
        Err(_) => return Err(ForwardError::Copy(io::ErrorKind::TimedOut.into())),
    };
    let mut tried = Vec::new();
    let mut last = None;
    let (_active, mut upstream) = loop {
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
                break (active, s);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(io::ErrorKind::TimedOut.into()),
        }
        backend.record_connect(false);
        tracing::debug!(%peer, addr = %backend.addr, error = ?last, "backend connect failed, trying next");
    };
    let _ = upstream.set_nodelay(true);
    let (to_backend, to_client) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(ForwardError::Copy)?;
    Ok(Transfer {
        to_backend,
        to_client,
    })
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
