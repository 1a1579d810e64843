//! The machine API client: one method per endpoint, JSON in and out. Refusals come back as
//! [`Error::Refused`] carrying the API's reason; a handshake the pin refused comes back as
//! [`Error::Untrusted`] (and nothing was sent).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_api::machine_api::{
    self, ApiError, DesiredConfig, ENROLL_PATH, EnrollRequest, EnrollResponse, Reason,
    RenewRequest, StatusAck, StatusReport,
};
use tether_boot::CaPin;

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::tls::{self, PinnedVerifier};

/// Longest a request may take, long-polls excepted.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one machine API.
#[derive(Clone)]
pub struct MachineApi {
    base: String,
    client: reqwest::Client,
    pinned: Option<Arc<PinnedVerifier>>,
}

impl MachineApi {
    /// For first contact: the server must match `pin`.
    pub fn pinned(base: &str, pin: CaPin) -> Result<MachineApi> {
        let verifier = PinnedVerifier::new(pin);
        Ok(MachineApi {
            base: base.trim_end_matches('/').to_string(),
            client: client(tls::pinned(verifier.clone())?)?,
            pinned: Some(verifier),
        })
    }

    /// For an enrolled machine: its CA and certificate.
    pub fn mutual(base: &str, id: &Identity) -> Result<MachineApi> {
        Ok(MachineApi {
            base: base.trim_end_matches('/').to_string(),
            client: client(tls::mutual(
                &id.enrolled.ca,
                &id.enrolled.certificate,
                &id.key_pem,
            )?)?,
            pinned: None,
        })
    }

    /// `POST /v1/enroll`
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse> {
        self.post("enrollment", ENROLL_PATH, req).await
    }

    /// `GET /v1/machines/{m}/config?version=V&timeout=S`: returns as soon as the config's
    /// version differs from `known` (at once without it), else the current one after `wait`.
    pub async fn config(
        &self,
        machine: &str,
        known: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredConfig> {
        let version = known.map(|v| format!("version={v}&")).unwrap_or_default();
        let url = format!(
            "{}{}?{version}timeout={}",
            self.base,
            machine_api::config_path(machine),
            wait.as_secs()
        );
        let req = self.client.get(&url).timeout(wait + REQUEST_TIMEOUT);
        self.send("the config long-poll", &url, req).await
    }

    /// `POST /v1/machines/{m}/status`
    pub async fn status(&self, machine: &str, report: &StatusReport) -> Result<StatusAck> {
        self.post(
            "the status report",
            &machine_api::status_path(machine),
            report,
        )
        .await
    }

    /// `POST /v1/machines/{m}/renew`
    pub async fn renew(&self, machine: &str, csr: String) -> Result<EnrollResponse> {
        self.post(
            "the renewal",
            &machine_api::renew_path(machine),
            &RenewRequest { csr },
        )
        .await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let req = self.client.post(&url).json(body).timeout(REQUEST_TIMEOUT);
        self.send(what, &url, req).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        what: &str,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(why) = self.pinned.as_ref().and_then(|v| v.refusal()) {
                    return Err(Error::Untrusted {
                        url: self.base.clone(),
                        detail: why,
                    });
                }
                return Err(Error::Unreachable {
                    url: url.to_string(),
                    detail: chain(&e),
                });
            }
        };
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| Error::Unreachable {
            url: url.to_string(),
            detail: chain(&e),
        })?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| Error::Refused {
                what: what.to_string(),
                error: ApiError {
                    reason: Reason::Internal,
                    message: format!("answer does not parse: {e}"),
                },
            });
        }
        let error = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
            reason: if status.as_u16() == 429 {
                Reason::RateLimited
            } else {
                Reason::Internal
            },
            message: format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        });
        Err(Error::Refused {
            what: what.to_string(),
            error,
        })
    }
}

fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        // A node talks to one API; idle connections are kept for the next long-poll.
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| Error::Crypto {
            what: "build the HTTPS client",
            detail: e.to_string(),
        })
}

/// An error and its sources on one line (reqwest's own Display says only "error sending
/// request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
