//! The HTTPS edge: TLS (client certificates optional at the handshake, verified against the
//! machine API CA when given), one task per connection carrying the verified peer into the
//! request, the router, and the JSON error type every refusal uses.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::de::DeserializeOwned;
use tether_api::machine_api::{ApiError, ENROLL_PATH, Reason};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::certs::Peer;
use super::{MAX_BODY, Server, enroll, node};
use crate::error::Error;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Longest a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Longest a request head or body may take to arrive: a slow or silent client gives its
/// connection slot back.
const READ: Duration = Duration::from_secs(10);
/// Longest one connection is kept: agents reconnect, and no slot is held for ever.
const CONNECTION_LIFE: Duration = Duration::from_secs(15 * 60);

/// A refusal: HTTP status from the reason, JSON body.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl Failure {
    /// A refusal with `reason`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Failure {
        Failure(ApiError {
            reason,
            message: message.into(),
        })
    }

    /// The operator failed (the cluster did not answer, …): logged here with its detail; the
    /// caller, who may not even be enrolled, learns only that it may retry.
    pub fn internal(e: Error) -> Failure {
        tracing::warn!("machine API: {e}");
        Failure::new(
            Reason::Internal,
            "the operator could not complete the request; retry later",
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = axum::http::StatusCode::from_u16(self.0.reason.http_status())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
pub async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, Failure> {
    let read = tokio::time::timeout(READ, axum::body::to_bytes(body, MAX_BODY))
        .await
        .map_err(|_| {
            Failure::new(
                Reason::BadRequest,
                format!("the body did not arrive within {READ:?}"),
            )
        })?;
    let bytes = read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            Failure::new(
                Reason::PayloadTooLarge,
                format!("the body is larger than {MAX_BODY} bytes"),
            )
        } else {
            Failure::new(Reason::BadRequest, format!("reading the body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(Reason::BadRequest, format!("the body does not parse: {e}")))
}

/// The rustls server config: our chain, and client certificates verified against the CA
/// when presented.
pub fn server_tls(
    ca_pem: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, Error> {
    let pki = |what: &'static str| {
        move |e: &dyn std::fmt::Display| Error::Pki {
            what,
            detail: e.to_string(),
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| pki("read the machine API CA")(&e))?;
        roots
            .add(c)
            .map_err(|e| pki("trust the machine API CA")(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| pki("client certificate verifier")(&e))?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pki("read the serving chain")(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| pki("read the serving key")(&e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pki("TLS versions")(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| pki("serving certificate")(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route(ENROLL_PATH, post(enroll::handle))
        .route("/v1/machines/{name}/config", get(node::config))
        .route("/v1/machines/{name}/status", post(node::status))
        .route("/v1/machines/{name}/renew", post(node::renew))
        .fallback(|| async { Failure::new(Reason::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Failure::new(Reason::NotFound, "no such method on this endpoint")
        })
        .with_state(server)
}

/// Accepts connections until `shutdown`; an accept error that is not per-connection ends
/// the loop with that error (the caller ends the process).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    server: Arc<Server>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = router(server);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.changed() => return Ok(()),
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Per-connection failures (the peer reset before accept, fd pressure) are
                // not the listener's death.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) => continue,
                Err(e) if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) => {
                    tracing::warn!("machine API: out of file descriptors; pausing accepts");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(Error::io("accept on the machine API", "listener")(e)),
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "TLS handshake: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer: Option<Peer> = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Peer {
                    remote: Some(remote.ip()),
                    ..Peer::from_der(c)
                });
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    app.clone().oneshot(req.map(Body::new))
                },
            );
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(READ);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(60)))
                .keep_alive_timeout(READ);
            match tokio::time::timeout(
                CONNECTION_LIFE,
                builder.serve_connection(TokioIo::new(stream), svc),
            )
            .await
            {
                Ok(Err(e)) => tracing::debug!(%remote, "connection: {e}"),
                Err(_) => tracing::debug!(%remote, "connection closed after {CONNECTION_LIFE:?}"),
                Ok(Ok(())) => {}
            }
        });
    }
}
