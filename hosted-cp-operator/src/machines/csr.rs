//! Kubelet CSR approval, per Machine. Tether tenants do not grant kube-controller-manager's
//! blanket `nodeclient` auto-approval (any holder of any bootstrap token could then name
//! itself any node); its `selfnodeclient` approval of renewals stays. Instead the operator
//! approves a kubelet's first client certificate only when the bootstrap token it used was
//! minted for the Machine whose node name it asks for, and a serving certificate only when
//! its names and addresses are the ones the machine API knows for that Machine.
//!
//! Everything else a kubelet signer is asked for is denied with a reason (as Gardener's
//! CSR approver does) rather than left pending (as k0s's autopilot does, which only skips
//! what it does not like): a pending CSR hides the problem, a denied one names it.
//!
//! The request's self-signature is checked (x509-parser's `verify` feature, which rcgen's
//! `ring` feature turns on), so the key holder made the request as it stands.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::FromDer;

use crate::error::Error;

/// The signer of kubelet client certificates.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of kubelet serving certificates.
pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// The reason written on conditions of approved CSRs.
pub const APPROVED_REASON: &str = "TetherApproved";

const NODE_PREFIX: &str = "system:node:";
const BOOTSTRAP_PREFIX: &str = "system:bootstrap:";
const NODES_GROUP: &str = "system:nodes";

/// What the approver knows of one Machine claimed for this tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The node name, which is the Machine's name.
    pub node_name: String,
    /// Ids of the bootstrap tokens Tether minted for it (may be empty).
    pub token_ids: Vec<String>,
    /// Node IP and the machine's NIC addresses, as the machine API knows them.
    pub ips: Vec<IpAddr>,
}

/// The verdict on one CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Approve, with the message written on the condition.
    Approve {
        /// Why, for the condition and logs.
        message: String,
    },
    /// Deny.
    Deny {
        /// CamelCase reason written on the condition (`UnknownToken`, `WrongNodeName`,
        /// `AddressNotOfMachine`, `BadUsages`, `NoSuchNode`, ...).
        reason: &'static str,
        /// What was wrong, for a person.
        message: String,
    },
    /// Not ours to decide (another signer, a renewal, already decided).
    Ignore,
}

fn deny(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Deny {
        reason,
        message: message.into(),
    }
}

/// `Ok` if `ok`, else a denial for `reason` with the message `why` makes.
fn ensure(ok: bool, reason: &'static str, why: impl FnOnce() -> String) -> Result<(), Verdict> {
    if ok { Ok(()) } else { Err(deny(reason, why())) }
}

/// Pure: the verdict on one CSR, given the tenant's Machines and its existing Node names.
pub fn decide(
    csr: &CertificateSigningRequest,
    known: &[Known],
    nodes: &BTreeSet<String>,
) -> Verdict {
    let conditions = csr.status.as_ref().and_then(|s| s.conditions.as_deref());
    let decided = conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Approved" || c.type_ == "Denied");
    if decided {
        return Verdict::Ignore;
    }
    let spec = &csr.spec;
    let approval = match spec.signer_name.as_str() {
        CLIENT_SIGNER => client(spec, known),
        SERVING_SIGNER => serving(spec, known, nodes),
        _ => return Verdict::Ignore,
    };
    match approval {
        Ok(message) => Verdict::Approve { message },
        Err(v) => v,
    }
}

/// A kubelet's first client certificate, asked for with a bootstrap token: `Ok(message)`
/// to approve, `Err` with the verdict otherwise.
fn client(spec: &CertificateSigningRequestSpec, known: &[Known]) -> Result<String, Verdict> {
    let user = spec.username.as_deref().unwrap_or_default();
    if user.starts_with(NODE_PREFIX) {
        return Err(Verdict::Ignore);
    }
    let Some(id) = user.strip_prefix(BOOTSTRAP_PREFIX) else {
        return Err(deny(
            "UnknownRequester",
            format!(
                "kubelet client certificates are approved for Tether's bootstrap tokens \
                 only, and {user:?} is not one"
            ),
        ));
    };
    let owners: Vec<&Known> = known
        .iter()
        .filter(|k| k.token_ids.iter().any(|t| t == id))
        .collect();
    ensure(!owners.is_empty(), "UnknownToken", || {
        format!("bootstrap token {id} was not minted by Tether for a Machine of this tenant")
    })?;
    let [m] = owners[..] else {
        let why = format!("bootstrap token {id} is listed for more than one Machine");
        return Err(deny("AmbiguousToken", why));
    };
    let req = parse(&spec.request.0).map_err(|why| deny("BadRequest", why))?;
    let node = &m.node_name;
    ensure(
        req.cn == format!("{NODE_PREFIX}{node}"),
        "WrongNodeName",
        || {
            format!(
                "CN {} is not Machine {node}'s node name with the token minted for {node}",
                req.cn
            )
        },
    )?;
    orgs(&req)?;
    let sans = req.sans();
    ensure(sans.is_empty(), "UnexpectedSan", || {
        format!("a kubelet client certificate names no SANs; the request names {sans:?}")
    })?;
    usages(spec, "client auth")?;
    Ok(format!(
        "kubelet client certificate for Machine {node} (bootstrap token {id})"
    ))
}

/// A kubelet serving certificate, asked for by the node itself: `Ok(message)` to approve,
/// `Err` with the verdict otherwise.
fn serving(
    spec: &CertificateSigningRequestSpec,
    known: &[Known],
    nodes: &BTreeSet<String>,
) -> Result<String, Verdict> {
    let user = spec.username.as_deref().unwrap_or_default();
    let groups = spec.groups.as_deref().unwrap_or_default();
    let node = user.strip_prefix(NODE_PREFIX).unwrap_or_default();
    ensure(
        !node.is_empty() && groups.iter().any(|g| g == NODES_GROUP),
        "NotANode",
        || {
            format!(
                "serving certificates are for nodes: {user:?} must be system:node:<name> \
                 in group {NODES_GROUP}"
            )
        },
    )?;
    let req = parse(&spec.request.0).map_err(|why| deny("BadRequest", why))?;
    ensure(req.cn == user, "WrongNodeName", || {
        format!("CN {} is not the requester {user}", req.cn)
    })?;
    orgs(&req)?;
    let [m] = known
        .iter()
        .filter(|k| k.node_name == node)
        .collect::<Vec<_>>()[..]
    else {
        let why = format!("node {node} is not bound to exactly one Machine of this tenant");
        return Err(deny("NotOneMachine", why));
    };
    ensure(nodes.contains(node), "NoSuchNode", || {
        format!("Node {node} does not exist")
    })?;
    ensure(
        !req.dns.is_empty() || !req.ips.is_empty(),
        "MissingSan",
        || "a serving certificate needs at least one DNS name or IP address".into(),
    )?;
    ensure(req.others.is_empty(), "UnexpectedSan", || {
        format!(
            "a kubelet serving certificate names DNS names and IP addresses only, not {:?}",
            req.others
        )
    })?;
    if let Some(d) = req.dns.iter().find(|d| *d != node) {
        return Err(deny(
            "NameNotOfMachine",
            format!("DNS name {d} is not the node name {node}"),
        ));
    }
    let ours: BTreeSet<IpAddr> = m.ips.iter().map(IpAddr::to_canonical).collect();
    if let Some(ip) = req.ips.iter().find(|ip| !ours.contains(&ip.to_canonical())) {
        let why = format!(
            "IP address {ip} is not one the machine API knows for Machine {node} ({:?})",
            m.ips
        );
        return Err(deny("AddressNotOfMachine", why));
    }
    usages(spec, "server auth")?;
    Ok(format!(
        "kubelet serving certificate for Machine {node}: DNS {:?}, IP {:?}",
        req.dns, req.ips
    ))
}

/// The subject's O must be exactly `system:nodes`.
fn orgs(req: &Request) -> Result<(), Verdict> {
    ensure(req.orgs == [NODES_GROUP], "WrongOrganization", || {
        format!("O must be exactly [{NODES_GROUP}], not {:?}", req.orgs)
    })
}

/// The usages must be {digital signature, `auth`}, key encipherment allowed.
fn usages(spec: &CertificateSigningRequestSpec, auth: &str) -> Result<(), Verdict> {
    let got: BTreeSet<&str> = spec.usages.iter().flatten().map(String::as_str).collect();
    let bare = BTreeSet::from(["digital signature", auth]);
    let with_ke = BTreeSet::from(["digital signature", "key encipherment", auth]);
    ensure(got == bare || got == with_ke, "BadUsages", || {
        format!("usages must be {with_ke:?} or {bare:?}, not {got:?}")
    })
}

/// What a PKCS#10 request asks for.
struct Request {
    cn: String,
    orgs: Vec<String>,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    /// SANs of other kinds (e-mail, URI, ...), described.
    others: Vec<String>,
}

impl Request {
    /// Every SAN, described.
    fn sans(&self) -> Vec<String> {
        let dns = self.dns.iter().map(|d| format!("DNS {d}"));
        let ips = self.ips.iter().map(|i| format!("IP {i}"));
        dns.chain(ips).chain(self.others.iter().cloned()).collect()
    }
}

/// Parses the PEM request and checks its self-signature.
fn parse(pem: &[u8]) -> Result<Request, String> {
    let (_, p) = parse_x509_pem(pem).map_err(|e| format!("the request is not PEM: {e}"))?;
    if p.label != "CERTIFICATE REQUEST" {
        return Err(format!(
            "the request is a PEM {}, not a CERTIFICATE REQUEST",
            p.label
        ));
    }
    let (rest, req) = X509CertificationRequest::from_der(&p.contents)
        .map_err(|e| format!("the request does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("the request has trailing bytes".into());
    }
    req.verify_signature()
        .map_err(|e| format!("the request's self-signature does not verify: {e}"))?;
    let info = &req.certification_request_info;
    let texts = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.map(|a| a.as_str().map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a subject attribute is not text: {e}"))
    };
    let cns = texts(&mut info.subject.iter_common_name())?;
    let [cn] = <[String; 1]>::try_from(cns)
        .map_err(|c| format!("the subject has {} common names, not one", c.len()))?;
    let mut r = Request {
        cn,
        orgs: texts(&mut info.subject.iter_organization())?,
        dns: vec![],
        ips: vec![],
        others: vec![],
    };
    for attr in info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(er) = attr.parsed_attribute() else {
            continue;
        };
        for ext in er
            .extensions
            .iter()
            .filter(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
        {
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                return Err("the subjectAltName extension does not parse".into());
            };
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => r.dns.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => r.ips.push(match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")),
                        n => return Err(format!("an IP address SAN has {n} bytes")),
                    }),
                    GeneralName::RFC822Name(e) => r.others.push(format!("email {e}")),
                    GeneralName::URI(u) => r.others.push(format!("URI {u}")),
                    other => r.others.push(other.to_string()),
                }
            }
        }
    }
    Ok(r)
}

/// The condition that records `v`, or `None` for [`Verdict::Ignore`].
fn condition(v: &Verdict, now: Time) -> Option<CertificateSigningRequestCondition> {
    let (type_, reason, message) = match v {
        Verdict::Approve { message } => ("Approved", APPROVED_REASON, message),
        Verdict::Deny { reason, message } => ("Denied", *reason, message),
        Verdict::Ignore => return None,
    };
    Some(CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.clone()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    })
}

/// The edge: lists the tenant's CSRs, decides each pending one, and writes the Approved or
/// Denied condition through the `/approval` subresource, against the resourceVersion read
/// (a CSR decided or deleted meanwhile is skipped; the next sweep looks again). Returns
/// (CSR name, verdict) for every CSR it approved or denied, not the ignored ones. A failed
/// write does not stop the sweep; the first such error is returned at its end.
pub async fn sweep(
    tenant: &kube::Client,
    known: &[Known],
    nodes: &BTreeSet<String>,
) -> Result<Vec<(String, Verdict)>, Error> {
    let api = Api::<CertificateSigningRequest>::all(tenant.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list the tenant's CertificateSigningRequests"))?;
    let mut done = Vec::new();
    let mut failed = None;
    for csr in list.items {
        let verdict = decide(&csr, known, nodes);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let Some(new) = condition(&verdict, now) else {
            continue;
        };
        let (name, version) = (csr.name_any(), csr.resource_version());
        let mut conditions = csr.status.and_then(|s| s.conditions).unwrap_or_default();
        conditions.push(new);
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "status": {"conditions": conditions},
        });
        match api
            .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(csr = %name, "{verdict:?}");
                done.push((name, verdict));
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                tracing::debug!(csr = %name, "changed meanwhile, next sweep: {e}");
            }
            Err(e) => {
                tracing::warn!(csr = %name, "writing the verdict failed: {e}");
                failed.get_or_insert(Error::kube(format!("write the verdict on CSR {name}"))(e));
            }
        }
    }
    failed.map_or(Ok(done), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus;
    use k8s_openapi::jiff::Timestamp;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    type Spec = CertificateSigningRequestSpec;
    type Csr = CertificateSigningRequest;

    const M1: &str = "system:node:m1";
    const M2: &str = "system:node:m2";
    const NODES: &[&str] = &["system:nodes"];
    const CLIENT_USAGES: &[&str] = &["digital signature", "key encipherment", "client auth"];
    const SERVING_USAGES: &[&str] = &["digital signature", "server auth"];

    /// A real PKCS#10 request (PEM) made by rcgen with a fresh key.
    fn request(cn: &str, orgs: &[&str], sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name.push(DnType::OrganizationName, *o);
        }
        p.subject_alt_names = sans;
        let req = p.serialize_request(&KeyPair::generate().unwrap()).unwrap();
        req.pem().unwrap().into_bytes()
    }

    fn dns(d: &str) -> SanType {
        SanType::DnsName(d.try_into().unwrap())
    }

    fn ip(i: &str) -> SanType {
        SanType::IpAddress(i.parse().unwrap())
    }

    fn strings(s: &[&str]) -> Option<Vec<String>> {
        Some(s.iter().map(|s| s.to_string()).collect())
    }

    fn csr(signer: &str, user: &str, usages: &[&str], req: Vec<u8>) -> Csr {
        let group = match user.starts_with(NODE_PREFIX) {
            true => NODES_GROUP,
            false => "system:bootstrappers",
        };
        Csr {
            spec: Spec {
                signer_name: signer.into(),
                username: Some(user.into()),
                groups: strings(&[group, "system:authenticated"]),
                usages: strings(usages),
                request: ByteString(req),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A client CSR by bootstrap token `token` for `cn`, O system:nodes.
    fn client(token: &str, cn: &str) -> Csr {
        let user = format!("{BOOTSTRAP_PREFIX}{token}");
        csr(
            CLIENT_SIGNER,
            &user,
            CLIENT_USAGES,
            request(cn, NODES, vec![]),
        )
    }

    /// A serving CSR by node `n` with these SANs.
    fn serving(n: &str, sans: Vec<SanType>) -> Csr {
        let user = format!("{NODE_PREFIX}{n}");
        let req = request(&user, NODES, sans);
        csr(SERVING_SIGNER, &user, SERVING_USAGES, req)
    }

    /// `c` changed by `f`.
    fn with(mut c: Csr, f: impl FnOnce(&mut Spec)) -> Csr {
        f(&mut c.spec);
        c
    }

    fn pem_of(der: &[u8]) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
            .into_bytes()
    }

    /// `pem` with `from` replaced by `to` (same length) in its DER: a request whose
    /// self-signature no longer matches its content.
    fn forge(pem: &[u8], from: &str, to: &str) -> Vec<u8> {
        let mut der = parse_x509_pem(pem).unwrap().1.contents;
        let at = der.windows(from.len()).position(|w| w == from.as_bytes());
        let at = at.unwrap();
        der[at..at + to.len()].copy_from_slice(to.as_bytes());
        pem_of(&der)
    }

    fn known() -> Vec<Known> {
        let k = |n: &str, tokens: &[&str], ips: &[&str]| Known {
            node_name: n.into(),
            token_ids: tokens.iter().map(|t| t.to_string()).collect(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        };
        vec![
            k("m1", &["abc123"], &["10.0.0.5", "fd00::5"]),
            k("m2", &["def456"], &["10.0.0.6"]),
            k("m3", &[], &["10.0.0.7"]),
            k("twin", &[], &["10.0.0.8"]),
            k("twin", &[], &["10.0.0.9"]),
        ]
    }

    #[test]
    fn decide_table() {
        let known = known();
        let nodes: BTreeSet<String> = ["m1", "m2", "twin", "stray"].map(String::from).into();
        // want: "" = approve, "-" = ignore, else the reason of the denial.
        let check = |name: &str, c: Csr, want: &str| {
            let got = decide(&c, &known, &nodes);
            let ok = match (&got, want) {
                (Verdict::Ignore, "-") | (Verdict::Approve { .. }, "") => true,
                (Verdict::Deny { reason, .. }, r) => *reason == r,
                _ => false,
            };
            assert!(ok, "{name}: want {want:?}, got {got:?}");
        };
        let own = || client("abc123", M1);
        let usages = |c, u: &[&str]| with(c, |s| s.usages = strings(u));
        let req = |c, r: Vec<u8>| with(c, |s| s.request = ByteString(r));
        let m1 = |orgs: &[&str], sans| req(own(), request(M1, orgs, sans));
        let user = |c, u: &str| with(c, |s| s.username = Some(u.into()));
        let s1 = || serving("m1", vec![dns("m1")]);

        // Client certificates.
        check("own client CSR", own(), "");
        let bare = usages(client("def456", M2), &["client auth", "digital signature"]);
        check("bare usages", bare, "");
        check("m2 with m1's token", client("abc123", M2), "WrongNodeName");
        check("unknown token", client("zzz999", M1), "UnknownToken");
        check("renewal by the node", user(own(), M1), "-");
        check("other requester", user(own(), "alice"), "UnknownRequester");
        let masters = m1(&["system:masters"], vec![]);
        check("wrong O", masters, "WrongOrganization");
        check("no O", m1(&[], vec![]), "WrongOrganization");
        let san = m1(NODES, vec![dns("m1")]);
        check("client CSR with a SAN", san, "UnexpectedSan");
        check("server usages", usages(own(), SERVING_USAGES), "BadUsages");
        check("no usages", with(own(), |s| s.usages = None), "BadUsages");
        check("garbage", req(own(), pem_of(b"nope")), "BadRequest");
        check("not PEM", req(own(), b"hello".to_vec()), "BadRequest");
        let forged = forge(&request(M2, NODES, vec![]), M2, M1);
        check("forged signature", req(own(), forged), "BadRequest");

        // Serving certificates.
        let all = vec![dns("m1"), ip("10.0.0.5"), ip("fd00::5")];
        check("own serving CSR", serving("m1", all), "");
        check("IP only", serving("m2", vec![ip("10.0.0.6")]), "");
        let other_ip = serving("m1", vec![dns("m1"), ip("10.0.0.6")]);
        check("IP not the Machine's", other_ip, "AddressNotOfMachine");
        let other_dns = serving("m1", vec![dns("m1"), dns("m1.evil")]);
        check("DNS not the node name", other_dns, "NameNotOfMachine");
        check("no SANs", serving("m1", vec![]), "MissingSan");
        let email = SanType::Rfc822Name("a@b.c".try_into().unwrap());
        let email = serving("m1", vec![dns("m1"), email]);
        check("e-mail SAN", email, "UnexpectedSan");
        let stray = serving("stray", vec![dns("stray")]);
        check("no Known", stray, "NotOneMachine");
        let twin = serving("twin", vec![dns("twin")]);
        check("two Knowns", twin, "NotOneMachine");
        check("no Node", serving("m3", vec![dns("m3")]), "NoSuchNode");
        check("CN not the requester", user(s1(), M2), "WrongNodeName");
        let no_group = with(s1(), |s| s.groups = None);
        check("not in system:nodes", no_group, "NotANode");
        let by_token = user(s1(), "system:bootstrap:abc123");
        check("by a bootstrap token", by_token, "NotANode");
        check("client usages", usages(s1(), CLIENT_USAGES), "BadUsages");

        // Not ours.
        let mut approved = own();
        let yes = Verdict::Approve {
            message: "x".into(),
        };
        let cond = condition(&yes, Time(Timestamp::UNIX_EPOCH)).unwrap();
        approved.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![cond]),
            certificate: None,
        });
        check("already approved", approved, "-");
        let other = with(own(), |s| s.signer_name = "a.b/c".into());
        check("other signer", other, "-");
    }

    #[test]
    fn denial_names_what_was_wrong() {
        let c = client("abc123", "system:node:other");
        let v = decide(&c, &known(), &BTreeSet::new());
        let want =
            "CN system:node:other is not Machine m1's node name with the token minted for m1";
        let got = if let Verdict::Deny { message, .. } = &v {
            message
        } else {
            ""
        };
        assert_eq!(got, want, "{v:?}");
    }

    #[test]
    fn conditions_record_the_verdict() {
        let now = Time(Timestamp::UNIX_EPOCH);
        let yes = Verdict::Approve {
            message: "ok".into(),
        };
        let a = condition(&yes, now.clone()).unwrap();
        assert_eq!((&*a.type_, &*a.status), ("Approved", "True"));
        assert_eq!(a.reason.as_deref(), Some("TetherApproved"));
        assert_eq!(a.message.as_deref(), Some("ok"));
        assert_eq!(a.last_update_time, Some(now.clone()));
        let d = condition(&deny("NoSuchNode", "gone"), now.clone()).unwrap();
        assert_eq!(
            (&*d.type_, d.reason.as_deref()),
            ("Denied", Some("NoSuchNode"))
        );
        assert!(condition(&Verdict::Ignore, now).is_none());
    }
}
