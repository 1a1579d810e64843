//! Enrollment token records: the Secret of type [`SECRET_TYPE`] in the operator's namespace
//! that stands behind each [`Token`]. It holds only the sha256 of the secret half.
//!
//! Two kinds: **boot** tokens, minted by tether-pxe for one rendered boot script — single
//! use, bound to the MAC the script was rendered for, ~15 minutes — and **join** tokens, made
//! by `tether-operator token create` — expiring, optionally limited in uses, optionally
//! pre-assigning a pool and labels. [`TokenRecord::admit`] is the whole decision, pure; the
//! machine API only loads the record, calls it and writes the result back.
//!
//! Spending is idempotent: the record remembers the hash of the keys it was spent for (the
//! last [`MAX_SPENT`]), and the same key presented again within the token's life is an
//! [`Admission::Replay`] that returns the same Machine — so a power cut between "token
//! spent" and "certificate saved" never strands a machine.

use std::collections::BTreeMap;

use tether_boot::{Mac, Token};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The Secret type of token records.
pub const SECRET_TYPE: &str = "tether.dev/enrollment-token";
/// Label on token Secrets: `boot` or `join` (so `token list` can select them).
pub const KIND_LABEL: &str = "tether.dev/token-kind";
/// Spent keys remembered per token: enough for any retry, bounded for tokens with
/// unlimited uses.
pub const MAX_SPENT: usize = 256;

/// The Secret name of a token id.
pub fn secret_name(id: &str) -> String {
    format!("tether-token-{id}")
}

/// Who minted a token and for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// tether-pxe, for one boot script.
    Boot,
    /// `tether-operator token create`.
    Join,
}

impl TokenKind {
    /// `boot` or `join`.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Boot => "boot",
            TokenKind::Join => "join",
        }
    }
}

/// One token's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The public id.
    pub id: String,
    /// Hex sha256 of the secret.
    pub secret_sha256: String,
    /// Boot or join.
    pub kind: TokenKind,
    /// When it stops working.
    pub expires: OffsetDateTime,
    /// Uses left; `None` is unlimited.
    pub uses_left: Option<u32>,
    /// WorkerPool (`namespace/name`) the machine is pre-assigned to.
    pub pool: Option<String>,
    /// Labels the machine gets.
    pub labels: BTreeMap<String, String>,
    /// A boot token's machine.
    pub mac: Option<Mac>,
    /// Keys it was spent for (hex sha256 of the SubjectPublicKeyInfo) and the Machine each
    /// became, oldest first.
    pub spent: Vec<(String, String)>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No record, or the secret does not match (indistinguishable on purpose).
    Invalid,
    /// Past its expiry.
    Expired,
    /// No uses left.
    UsedUp,
    /// A boot token presented for another MAC.
    WrongMac {
        /// The MAC it was minted for.
        bound: Mac,
    },
}

/// What a valid token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A new enrollment: spend one use.
    Spend,
    /// The same key again: the Machine it already became.
    Replay {
        /// That Machine.
        machine: String,
    },
}

impl TokenRecord {
    /// A boot token's record: single use, bound to `mac`, valid for `ttl`.
    pub fn boot(token: &Token, mac: Mac, now: OffsetDateTime, ttl: time::Duration) -> TokenRecord {
        TokenRecord {
            id: token.id().to_string(),
            secret_sha256: token.secret_hash(),
            kind: TokenKind::Boot,
            expires: now + ttl,
            uses_left: Some(1),
            pool: None,
            labels: BTreeMap::new(),
            mac: Some(mac),
            spent: Vec::new(),
        }
    }

    /// A join token's record.
    pub fn join(
        token: &Token,
        now: OffsetDateTime,
        ttl: time::Duration,
        uses: Option<u32>,
        pool: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> TokenRecord {
        TokenRecord {
            id: token.id().to_string(),
            secret_sha256: token.secret_hash(),
            kind: TokenKind::Join,
            expires: now + ttl,
            uses_left: uses,
            pool,
            labels,
            mac: None,
            spent: Vec::new(),
        }
    }

    /// Decides whether `token`, presented at `now` by a machine booted from `mac` with the
    /// key hashing to `key_sha256`, may enroll.
    pub fn admit(
        &self,
        token: &Token,
        now: OffsetDateTime,
        mac: Option<Mac>,
        key_sha256: &str,
    ) -> Result<Admission, Refusal> {
        if token.id() != self.id || !token.matches(&self.secret_sha256) {
            return Err(Refusal::Invalid);
        }
        if now >= self.expires {
            return Err(Refusal::Expired);
        }
        if let Some(bound) = self.mac
            && mac != Some(bound)
        {
            return Err(Refusal::WrongMac { bound });
        }
        if let Some((_, machine)) = self.spent.iter().find(|(k, _)| k == key_sha256) {
            return Ok(Admission::Replay {
                machine: machine.clone(),
            });
        }
        if self.uses_left == Some(0) {
            return Err(Refusal::UsedUp);
        }
        Ok(Admission::Spend)
    }

    /// Records one use by `key_sha256` becoming `machine`.
    pub fn spend(&mut self, key_sha256: &str, machine: &str) {
        if let Some(n) = self.uses_left.as_mut() {
            *n = n.saturating_sub(1);
        }
        self.spent
            .push((key_sha256.to_string(), machine.to_string()));
        if self.spent.len() > MAX_SPENT {
            self.spent.remove(0);
        }
    }

    /// The record as Secret `stringData`.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::from([
            ("token-id".to_string(), self.id.clone()),
            (
                "token-secret-sha256".to_string(),
                self.secret_sha256.clone(),
            ),
            ("kind".to_string(), self.kind.name().to_string()),
            (
                "expiration".to_string(),
                self.expires.format(&Rfc3339).unwrap_or_default(),
            ),
            (
                "spent".to_string(),
                serde_json::to_string(&self.spent).expect("pairs of strings serialize"),
            ),
        ]);
        if let Some(n) = self.uses_left {
            d.insert("usages-left".into(), n.to_string());
        }
        if let Some(p) = &self.pool {
            d.insert("pool".into(), p.clone());
        }
        if !self.labels.is_empty() {
            d.insert("labels".into(), render_labels(&self.labels));
        }
        if let Some(m) = self.mac {
            d.insert("mac".into(), m.to_string());
        }
        d
    }

    /// Parses Secret data (already decoded); an unusable record is an error naming the key.
    pub fn from_data(d: &BTreeMap<String, String>) -> Result<TokenRecord, String> {
        let get = |k: &str| d.get(k).ok_or_else(|| format!("missing key {k}"));
        let id = get("token-id")?.clone();
        Token::check_id(&id).map_err(|e| e.to_string())?;
        let kind = match get("kind")?.as_str() {
            "boot" => TokenKind::Boot,
            "join" => TokenKind::Join,
            other => return Err(format!("kind {other:?} is neither boot nor join")),
        };
        let expires = OffsetDateTime::parse(get("expiration")?, &Rfc3339)
            .map_err(|e| format!("expiration: {e}"))?;
        let uses_left = match d.get("usages-left") {
            Some(n) => Some(n.parse().map_err(|_| format!("usages-left {n:?}"))?),
            None => None,
        };
        let mac = match d.get("mac") {
            Some(m) => Some(m.parse().map_err(|e: tether_boot::Error| e.to_string())?),
            None => None,
        };
        let spent = match d.get("spent") {
            Some(s) => serde_json::from_str(s).map_err(|e| format!("spent: {e}"))?,
            None => Vec::new(),
        };
        Ok(TokenRecord {
            id,
            secret_sha256: get("token-secret-sha256")?.clone(),
            kind,
            expires,
            uses_left,
            pool: d.get("pool").cloned(),
            labels: d
                .get("labels")
                .map(|l| parse_labels(l))
                .transpose()?
                .unwrap_or_default(),
            mac,
            spent,
        })
    }
}

#[cfg(feature = "kube")]
impl TokenRecord {
    /// The record as the Secret `tether-token-<id>` in `namespace` (type [`SECRET_TYPE`],
    /// labelled with its kind), for server-side apply or create.
    pub fn to_secret(&self, namespace: &str) -> k8s_openapi::api::core::v1::Secret {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        k8s_openapi::api::core::v1::Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(&self.id)),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    KIND_LABEL.to_string(),
                    self.kind.name().to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            data: Some(
                self.to_data()
                    .into_iter()
                    .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// Reads a record from its Secret; anything else (wrong type, bad data) is an error.
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<TokenRecord, String> {
        if secret.type_.as_deref() != Some(SECRET_TYPE) {
            return Err(format!(
                "Secret type is {:?}, not {SECRET_TYPE}",
                secret.type_
            ));
        }
        let data: BTreeMap<String, String> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| {
                String::from_utf8(v.0.clone())
                    .map(|v| (k.clone(), v))
                    .map_err(|_| format!("key {k} is not UTF-8"))
            })
            .collect::<Result<_, _>>()?;
        TokenRecord::from_data(&data)
    }
}

/// `k=v,k2=v2`
pub fn render_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `k=v,k2=v2`, checking each key and value as Kubernetes label syntax.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        check_label_key(k)?;
        check_label_value(v)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn name_part_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    if prefix_ok && name_part_ok(name) {
        Ok(())
    } else {
        Err(format!(
            "label key {k:?} is not a valid Kubernetes label key"
        ))
    }
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || name_part_ok(v) {
        Ok(())
    } else {
        Err(format!(
            "label value {v:?} is not a valid Kubernetes label value"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn mac(last: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, last])
    }

    #[test]
    fn admission_table() {
        let t: Token = "abcdef.0123456789abcdef".parse().unwrap();
        let wrong: Token = "abcdef.0123456789abcdee".parse().unwrap();
        let other_id: Token = "zzzzzz.0123456789abcdef".parse().unwrap();
        let boot = TokenRecord::boot(&t, mac(1), now(), time::Duration::minutes(15));
        let mut spent_boot = boot.clone();
        spent_boot.spend("k1", "mac-525400000001");
        let join = TokenRecord::join(
            &t,
            now(),
            time::Duration::hours(1),
            None,
            None,
            BTreeMap::new(),
        );
        let late = now() + time::Duration::minutes(16);
        type Case<'a> = (
            &'a str,
            &'a TokenRecord,
            &'a Token,
            OffsetDateTime,
            Option<Mac>,
            &'a str,
            Result<Admission, Refusal>,
        );
        let cases: Vec<Case> = vec![
            (
                "boot: first use",
                &boot,
                &t,
                now(),
                Some(mac(1)),
                "k1",
                Ok(Admission::Spend),
            ),
            (
                "boot: wrong secret",
                &boot,
                &wrong,
                now(),
                Some(mac(1)),
                "k1",
                Err(Refusal::Invalid),
            ),
            (
                "boot: other id",
                &boot,
                &other_id,
                now(),
                Some(mac(1)),
                "k1",
                Err(Refusal::Invalid),
            ),
            (
                "boot: expired",
                &boot,
                &t,
                late,
                Some(mac(1)),
                "k1",
                Err(Refusal::Expired),
            ),
            (
                "boot: other MAC",
                &boot,
                &t,
                now(),
                Some(mac(2)),
                "k1",
                Err(Refusal::WrongMac { bound: mac(1) }),
            ),
            (
                "boot: no MAC",
                &boot,
                &t,
                now(),
                None,
                "k1",
                Err(Refusal::WrongMac { bound: mac(1) }),
            ),
            (
                "boot: used, same key",
                &spent_boot,
                &t,
                now(),
                Some(mac(1)),
                "k1",
                Ok(Admission::Replay {
                    machine: "mac-525400000001".into(),
                }),
            ),
            (
                "boot: used, other key",
                &spent_boot,
                &t,
                now(),
                Some(mac(1)),
                "k2",
                Err(Refusal::UsedUp),
            ),
            (
                "boot: replay after expiry",
                &spent_boot,
                &t,
                late,
                Some(mac(1)),
                "k1",
                Err(Refusal::Expired),
            ),
            (
                "join: any MAC",
                &join,
                &t,
                now(),
                Some(mac(9)),
                "k",
                Ok(Admission::Spend),
            ),
            (
                "join: no MAC",
                &join,
                &t,
                now(),
                None,
                "k",
                Ok(Admission::Spend),
            ),
        ];
        for (name, rec, tok, at, m, key, want) in cases {
            assert_eq!(rec.admit(tok, at, m, key), want, "{name}");
        }
    }

    #[test]
    fn limited_uses_run_out_and_spent_keys_stay_bounded() {
        let t = Token::generate().unwrap();
        let mut r = TokenRecord::join(
            &t,
            now(),
            time::Duration::hours(1),
            Some(2),
            None,
            BTreeMap::new(),
        );
        for i in 0..2 {
            assert_eq!(
                r.admit(&t, now(), None, &format!("k{i}")),
                Ok(Admission::Spend)
            );
            r.spend(&format!("k{i}"), &format!("m{i}"));
        }
        assert_eq!(r.admit(&t, now(), None, "k2"), Err(Refusal::UsedUp));
        let mut unlimited = TokenRecord::join(
            &t,
            now(),
            time::Duration::hours(1),
            None,
            None,
            BTreeMap::new(),
        );
        for i in 0..(MAX_SPENT + 10) {
            unlimited.spend(&format!("k{i}"), "m");
        }
        assert_eq!(unlimited.spent.len(), MAX_SPENT);
        assert_eq!(unlimited.spent[0].0, "k10");
    }

    #[test]
    fn records_round_trip_through_secret_data() {
        let t = Token::generate().unwrap();
        let mut r = TokenRecord::join(
            &t,
            now(),
            time::Duration::hours(2),
            Some(3),
            Some("team-a/workers".into()),
            parse_labels("rack=r1,tether.dev/zone=z-2").unwrap(),
        );
        r.spend("aa", "mac-1");
        let d = r.to_data();
        assert!(
            !d.values().any(|v| v.contains(&t.to_string())),
            "the secret is never stored"
        );
        assert_eq!(TokenRecord::from_data(&d).unwrap(), r);
        let b = TokenRecord::boot(&t, mac(3), now(), time::Duration::minutes(15));
        assert_eq!(TokenRecord::from_data(&b.to_data()).unwrap(), b);
        for (key, value, want) in [
            ("kind", "admin", "neither"),
            ("expiration", "tomorrow", "expiration"),
            ("usages-left", "-1", "usages-left"),
            ("token-id", "../x", "token id"),
            ("mac", "zz", "MAC"),
        ] {
            let mut bad = d.clone();
            bad.insert(key.into(), value.into());
            let err = TokenRecord::from_data(&bad).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
        }
    }

    #[cfg(feature = "kube")]
    #[test]
    fn records_round_trip_through_secrets() {
        let t = Token::generate().unwrap();
        let r = TokenRecord::boot(&t, mac(7), now(), time::Duration::minutes(15));
        let s = r.to_secret("tether-system");
        assert_eq!(
            s.metadata.name.as_deref(),
            Some(secret_name(t.id()).as_str())
        );
        assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
        assert_eq!(TokenRecord::from_secret(&s).unwrap(), r);
        let mut wrong = s.clone();
        wrong.type_ = Some("Opaque".into());
        assert!(TokenRecord::from_secret(&wrong).is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(render_labels(&parse_labels("b=2,a=1").unwrap()), "a=1,b=2");
        assert!(parse_labels("").unwrap().is_empty());
        for bad in ["a", "a=b c", "-a=1", "a=-1", "Foo.Bar/x=1", "a=$(x)"] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
    }
}
