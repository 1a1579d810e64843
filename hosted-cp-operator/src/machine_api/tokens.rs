//! Token records as Secrets in the operator's namespace: read, compare-and-swap on spend,
//! and the `tether-operator token create|list|delete` operations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tether_api::token::{self, KIND_LABEL, TokenKind, TokenRecord};
use tether_boot::Token;
use time::OffsetDateTime;

use crate::error::Error;

/// The token records of one namespace.
#[derive(Clone)]
pub struct Tokens {
    api: Api<Secret>,
    namespace: String,
}

/// A record and the resourceVersion it was read at (for compare-and-swap).
pub struct Loaded {
    /// The record.
    pub record: TokenRecord,
    /// The Secret as read.
    pub secret: Secret,
}

impl Tokens {
    /// Tokens in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Tokens {
        Tokens {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    /// The record of token `id`; `Ok(None)` if there is none. A Secret of that name that is
    /// not a valid record is an error (logged by the caller, refused to the node).
    pub async fn get(&self, id: &str) -> Result<Option<Loaded>, Error> {
        let name = token::secret_name(id);
        let Some(secret) = self
            .api
            .get_opt(&name)
            .await
            .map_err(Error::kube(format!("get Secret {name}")))?
        else {
            return Ok(None);
        };
        let record = TokenRecord::from_secret(&secret)
            .map_err(|e| Error::Invalid(format!("Secret {name} is not a token record: {e}")))?;
        Ok(Some(Loaded { record, secret }))
    }

    /// Writes `record` over what `loaded` read; `Ok(false)` if someone wrote in between.
    pub async fn replace(&self, loaded: &Loaded, record: &TokenRecord) -> Result<bool, Error> {
        let name = token::secret_name(&record.id);
        let mut secret = record.to_secret(&self.namespace);
        secret.metadata.resource_version = loaded.secret.metadata.resource_version.clone();
        secret.metadata.labels = loaded.secret.metadata.labels.clone();
        match self
            .api
            .replace(&name, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!("update Secret {name}"))(e)),
        }
    }

    /// Creates a join token; returns it (the only time its secret half is seen).
    pub async fn create_join(
        &self,
        ttl: time::Duration,
        uses: Option<u32>,
        pool: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Token, Error> {
        if let Some(p) = &pool {
            check_pool(p)?;
        }
        let token = Token::generate().map_err(|e| Error::Invalid(e.to_string()))?;
        let record = TokenRecord::join(&token, OffsetDateTime::now_utc(), ttl, uses, pool, labels);
        self.api
            .create(&PostParams::default(), &record.to_secret(&self.namespace))
            .await
            .map_err(Error::kube("create token Secret"))?;
        Ok(token)
    }

    /// Every token record (boot and join), oldest expiry first; Secrets that are not valid
    /// records are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, Error> {
        let lp = ListParams::default().labels(KIND_LABEL);
        let mut out: Vec<TokenRecord> = self
            .api
            .list(&lp)
            .await
            .map_err(Error::kube("list token Secrets"))?
            .items
            .iter()
            .filter_map(|s| match TokenRecord::from_secret(s) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(secret = %s.name_any(), "not a token record: {e}");
                    None
                }
            })
            .collect();
        out.sort_by_key(|r| r.expires);
        Ok(out)
    }

    /// Deletes token `id`; `Ok(false)` if it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, Error> {
        Token::check_id(id).map_err(|e| Error::Invalid(e.to_string()))?;
        match self
            .api
            .delete(&token::secret_name(id), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(Error::kube(format!("delete token {id}"))(e)),
        }
    }
}

/// `namespace/name` of a WorkerPool.
pub fn check_pool(pool: &str) -> Result<(), Error> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    match pool.split_once('/') {
        Some((ns, name)) if ok(ns) && ok(name) => Ok(()),
        _ => Err(Error::Invalid(format!(
            "pool {pool:?} must be NAMESPACE/NAME (lower-case DNS labels)"
        ))),
    }
}

/// One line of `token list`.
pub fn list_line(r: &TokenRecord, now: OffsetDateTime) -> String {
    let left = r.expires - now;
    let ttl = if left.is_negative() {
        "expired".to_string()
    } else if left.whole_hours() >= 1 {
        format!("{}h{}m", left.whole_hours(), left.whole_minutes() % 60)
    } else {
        format!("{}m{}s", left.whole_minutes(), left.whole_seconds() % 60)
    };
    format!(
        "{:<8} {:<5} {:<9} {:<9} {:<20} {}",
        r.id,
        match r.kind {
            TokenKind::Boot => "boot",
            TokenKind::Join => "join",
        },
        ttl,
        r.uses_left
            .map(|n| n.to_string())
            .unwrap_or_else(|| "unlimited".into()),
        r.pool
            .clone()
            .or_else(|| r.mac.map(|m| format!("mac {m}")))
            .unwrap_or_else(|| "-".into()),
        token::render_labels(&r.labels)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools() {
        assert!(check_pool("team-a/workers").is_ok());
        for bad in ["workers", "a/b/c", "A/b", "a/", "/b", "a/-b", "a/b c"] {
            assert!(check_pool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_lines() {
        let t: Token = "abcdef.0123456789abcdef".parse().unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let r = TokenRecord::join(
            &t,
            now,
            time::Duration::minutes(90),
            Some(2),
            Some("a/b".into()),
            BTreeMap::new(),
        );
        let line = list_line(&r, now);
        assert!(line.starts_with("abcdef   join  1h30m"), "{line}");
        assert!(line.contains(" 2 ") && line.contains("a/b"), "{line}");
        assert!(!line.contains("0123456789"), "never the secret");
        assert!(list_line(&r, now + time::Duration::hours(2)).contains("expired"));
    }
}
