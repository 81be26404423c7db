//! RTSP over TLS (`rtsps://`) for retina, which speaks plain RTSP only: a session's TLS
//! connection to the camera is made here (rustls, the system's roots plus RTSP_TLS_CA_FILE,
//! the camera's name checked against its certificate), and retina talks plain RTSP to one
//! end of it on 127.0.0.1. RTP and RTCP travel interleaved on that connection (TCP only).
//!
//! Hand-written because no RTSP client crate does TLS: this is the smallest piece that lets
//! retina stay the client (a tunnel per session, torn down with it).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use url::Url;

use super::ssrf::{NetworkPolicy, Refused};

/// The RTSPS port when the URL names none (RFC 7826 §19.2).
const RTSPS_PORT: u16 = 322;

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The camera's certificate is not trusted: trying again changes nothing.
    #[error("the camera's TLS certificate is not trusted ({0}); add its CA to RTSP_TLS_CA_FILE")]
    Untrusted(String),
    #[error(transparent)]
    Refused(Refused),
    /// Anything else (no answer, reset, a name that does not resolve): worth another try.
    #[error("{0}")]
    Lost(String),
}

/// An open TLS connection to a camera, reachable as plain RTSP at [`Tunnel::url`] by one
/// client. Closed when dropped.
pub struct Tunnel {
    /// The camera's URL with `rtsp://127.0.0.1:<port>` in place of its scheme and host.
    pub url: Url,
    task: JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The roots a camera's certificate is checked against: the system's, and the PEM
/// certificates of `ca_file`.
pub fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}

/// Connects to the camera of `url` (`rtsps://`, without credentials) over TLS within
/// `timeout`, its address checked by `policy`, and opens the plain end for retina.
pub async fn open(
    url: &Url,
    policy: &NetworkPolicy,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Tunnel, TunnelError> {
    let host = url
        .host_str()
        .ok_or_else(|| TunnelError::Lost("no host".into()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let name = ServerName::try_from(host.clone())
        .map_err(|e| TunnelError::Lost(format!("{host}: {e}")))?;
    let pinned = match policy.pinned(url).await {
        Ok(pinned) => pinned,
        Err(Some(refused)) => return Err(TunnelError::Refused(refused)),
        Err(None) => return Err(TunnelError::Lost(format!("{host} does not resolve"))),
    };
    let addr = pinned
        .host_str()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = url.port().unwrap_or(RTSPS_PORT);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TunnelError::Lost(e.to_string()))?
    .with_root_certificates(roots(ca_file).map_err(TunnelError::Untrusted)?)
    .with_no_client_auth();
    let connect = async {
        let tcp = TcpStream::connect((addr.as_str(), port))
            .await
            .map_err(|e| TunnelError::Lost(format!("cannot connect to {host}:{port}: {e}")))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(why)) => {
                        TunnelError::Untrusted(format!("{why:?}"))
                    }
                    _ => TunnelError::Lost(format!("TLS with {host}:{port} failed: {e}")),
                },
            )
    };
    let tls = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| TunnelError::Lost(format!("no TLS connection to {host}:{port} in time")))??;
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| TunnelError::Lost(format!("cannot open the local end: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| TunnelError::Lost(e.to_string()))?;
    let mut plain = url.clone();
    let bad = |_| TunnelError::Lost("cannot rewrite the URL".into());
    plain.set_scheme("rtsp").map_err(bad)?;
    plain.set_host(Some("127.0.0.1")).map_err(|_| bad(()))?;
    plain.set_port(Some(local.port())).map_err(bad)?;
    let task = tokio::spawn(async move {
        // One client: retina's, which connects at once.
        let Ok(Ok((mut client, _))) = tokio::time::timeout(timeout, listener.accept()).await else {
            return;
        };
        drop(listener);
        let mut tls = tls;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut tls).await;
    });
    Ok(Tunnel { url: plain, task })
}
