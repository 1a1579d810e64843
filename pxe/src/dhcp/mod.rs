//! DHCP: which clients we answer and with what. Everything here is pure — bytes in, a
//! [`Decision`] and reply bytes out — so the whole decision table is unit-tested and fuzzed;
//! sockets live in [`server`].
//!
//! The default mode is proxyDHCP (PXE spec §2.2.3): another DHCP server on the segment hands
//! out addresses and we add only the boot information, so tether-pxe can be dropped onto an
//! existing network without taking over address management. `--full-dhcp` adds an address
//! pool ([`leases`]) for isolated segments (labs, CI, the embedded default).
//!
//! Loop prevention: a client that identifies as iPXE (user-class `iPXE`, our own user-class
//! [`OUR_USER_CLASS`], or any option 175 "iPXE encapsulated options") is never handed a
//! firmware binary again, only the HTTP URL of its script. Without this, iPXE chainloaded
//! from a PXE ROM would DHCP, receive `undionly.kpxe` and chainload itself forever.

pub mod leases;
pub mod server;

use std::net::Ipv4Addr;

use dhcproto::v4::{
    Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Decodable, Decoder, Encodable};

use crate::error::{Error, Result};
use crate::script::OUR_USER_CLASS;
use leases::Leases;
use tether_boot::Mac;

/// Longest boot file name written into the BOOTP `file` field (128 bytes, NUL included);
/// a longer one travels in option 67 alone.
pub const MAX_FILE_FIELD: usize = 127;
/// Longest server name written into the BOOTP `sname` field (64 bytes, NUL included).
pub const MAX_SNAME_FIELD: usize = 63;
/// Longest value of one DHCP option. Options are never split (RFC 3396): not every PXE
/// client joins the pieces.
pub const MAX_OPTION: usize = 255;
/// Longest DHCP message every client must accept: a 576-byte IP datagram less the IP and
/// UDP headers (RFC 2131 §2: 312 bytes of options after the 236-byte header).
pub const MAX_MESSAGE: usize = 548;

/// iPXE's "encapsulated options" option; its presence means the client is iPXE.
const OPT_IPXE_ENCAP: u8 = 175;
/// iPXE encapsulated sub-option "no-pxedhcp": skip ProxyDHCP.
const IPXE_NO_PXEDHCP: u8 = 176;
/// PXE vendor sub-option: discovery control.
const PXE_DISCOVERY_CONTROL: u8 = 6;
/// Discovery control bit 3: "download the boot file in this offer, skip boot-server discovery".
const PXE_USE_BOOTFILE: u8 = 0x08;

/// The BIOS PXE chainloader served over TFTP.
pub const BIOS_FILE: &str = "undionly.kpxe";
/// The UEFI x86-64 iPXE served over TFTP (and over HTTP to HTTP-boot firmware).
pub const EFI_FILE: &str = "ipxe.efi";

/// What kind of netboot client sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// Legacy BIOS PXE ROM (architecture 0, or none given).
    Bios,
    /// UEFI x86-64 PXE (architecture 7 or 9).
    Efi64,
    /// UEFI x86-64 HTTP boot (architecture 16, class `HTTPClient`).
    EfiHttp,
    /// iPXE (any firmware) that has not run our script yet.
    Ipxe,
    /// iPXE that set our user-class: it already ran our script.
    OurIpxe,
}

/// Why a request gets no boot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignore {
    /// A BOOTREPLY or a DHCP message type we do not answer (RELEASE, DECLINE, …).
    NotARequest,
    /// No `PXEClient`/`HTTPClient` class and no iPXE marker: an ordinary DHCP client.
    NotNetboot,
    /// A netboot client whose architecture we have no binary for.
    UnsupportedArch(u16),
    /// Option 97 that is neither empty nor a type-0 17-byte GUID (RFC 4578 §2.2).
    BadGuid,
    /// Not Ethernet, or a chaddr shorter than six bytes.
    NotEthernet,
}

/// What we do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send nothing (in full-DHCP mode an address may still be leased; see [`server`]).
    Ignore(Ignore),
    /// Send boot information.
    Boot {
        /// Who asked.
        client: Client,
        /// What to load: a TFTP file name or an HTTP URL.
        file: String,
    },
}

impl Decision {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Ignore(Ignore::NotARequest) => "ignore_not_request",
            Decision::Ignore(Ignore::NotNetboot) => "ignore_not_netboot",
            Decision::Ignore(Ignore::UnsupportedArch(_)) => "ignore_unsupported_arch",
            Decision::Ignore(Ignore::BadGuid) => "ignore_bad_guid",
            Decision::Ignore(Ignore::NotEthernet) => "ignore_not_ethernet",
            Decision::Boot { client, .. } => match client {
                Client::Bios => "bios_tftp",
                Client::Efi64 => "efi_tftp",
                Client::EfiHttp => "efi_http",
                Client::Ipxe => "ipxe_script",
                Client::OurIpxe => "ipxe_script_ours",
            },
        }
    }
}

/// Where our services are, as the client must be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootServer {
    /// Our address on the segment (siaddr, option 54, TFTP server).
    pub ip: Ipv4Addr,
    /// Base URL of our HTTP server, e.g. `http://10.0.0.1:8080`.
    pub http_base: String,
}

/// Decodes a DHCPv4 packet; a packet that does not decode is an error, never a panic.
pub fn parse(bytes: &[u8]) -> Result<Message> {
    check_framing(bytes)?;
    // Belt and braces: a panic inside the third-party decoder must not take down the DHCP
    // task; it is a malformed packet like any other.
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)))
        .map_err(|_| Error::DhcpDecode("decoder panicked".into()))?
        .map_err(|e| Error::DhcpDecode(e.to_string()))
}

/// Size of the fixed BOOTP header before the magic cookie.
const HEADER_LEN: usize = 236;
/// RFC 2131 magic cookie.
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Walks the option area and rejects what decoders tend to paper over: a missing magic
/// cookie, an option whose length runs past the packet, a missing END option.
fn check_framing(bytes: &[u8]) -> Result<()> {
    let bad = |why: &str| Err(Error::DhcpDecode(why.to_string()));
    if bytes.len() < HEADER_LEN + MAGIC.len() {
        return bad("shorter than a BOOTP header and magic cookie");
    }
    // dhcproto slices chaddr[..hlen] and panics past its 16 bytes (found by the fuzz target).
    if bytes[2] > 16 {
        return bad("hardware address length over 16");
    }
    if bytes[HEADER_LEN..HEADER_LEN + 4] != MAGIC {
        return bad("no DHCP magic cookie");
    }
    let mut i = HEADER_LEN + 4;
    let mut seen_fixed = [false; 256];
    while i < bytes.len() {
        match bytes[i] {
            0 => i += 1,
            255 => return Ok(()),
            code => {
                let Some(&len) = bytes.get(i + 1) else {
                    return bad("option code without a length");
                };
                // dhcproto asserts these lengths (a panic in debug builds; found by the fuzz
                // target): check them here, and allow each only once, since repeated options
                // are concatenated (RFC 3396) before the length is checked.
                if let Some(ok) = fixed_length_ok(code, len) {
                    if !ok {
                        return bad("option with an invalid length");
                    }
                    if std::mem::replace(&mut seen_fixed[code as usize], true) {
                        return bad("fixed-length option repeated");
                    }
                }
                i += 2 + len as usize;
                if i > bytes.len() {
                    return bad("option runs past the end of the packet");
                }
            }
        }
    }
    bad("no END option")
}

/// For options whose length is fixed by their RFC: whether `len` is right.
fn fixed_length_ok(code: u8, len: u8) -> Option<bool> {
    match code {
        80 => Some(len == 0),        // Rapid Commit (RFC 4039)
        81 => Some(len >= 3),        // Client FQDN (RFC 4702)
        94 => Some(len == 3),        // Client Network Interface (RFC 4578)
        152..=155 => Some(len == 4), // Bulk lease query times (RFC 6926)
        _ => None,
    }
}

/// True when a user-class option value names `class`, whether sent raw (as iPXE does) or as
/// RFC 3004 length-prefixed entries.
fn user_class_has(value: &[u8], class: &str) -> bool {
    if value == class.as_bytes() {
        return true;
    }
    let mut rest = value;
    while let Some((&len, tail)) = rest.split_first() {
        let len = len as usize;
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == class.as_bytes() {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// The DHCP message type, if any.
pub fn message_type(msg: &Message) -> Option<MessageType> {
    msg.opts().msg_type()
}

/// Classifies a decoded request and decides what it should boot.
pub fn decide(msg: &Message, server: &BootServer) -> Decision {
    if msg.opcode() != Opcode::BootRequest
        || !matches!(
            message_type(msg),
            Some(MessageType::Discover | MessageType::Request | MessageType::Inform)
        )
    {
        return Decision::Ignore(Ignore::NotARequest);
    }
    let Some(mac) = Mac::from_chaddr(msg.chaddr()) else {
        return Decision::Ignore(Ignore::NotEthernet);
    };
    if msg.hlen() != 6 {
        return Decision::Ignore(Ignore::NotEthernet);
    }
    let opts = msg.opts();
    let class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => c.as_slice(),
        _ => &[],
    };
    let pxe = class.starts_with(b"PXEClient");
    let http = class.starts_with(b"HTTPClient");
    let user_class = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(u)) => u.as_slice(),
        _ => &[],
    };
    let ours = user_class_has(user_class, OUR_USER_CLASS);
    let ipxe = ours
        || user_class_has(user_class, "iPXE")
        || opts.get(OptionCode::Unknown(OPT_IPXE_ENCAP)).is_some();
    if !(pxe || http || ipxe) {
        return Decision::Ignore(Ignore::NotNetboot);
    }
    if let Some(DhcpOption::ClientMachineIdentifier(guid)) =
        opts.get(OptionCode::ClientMachineIdentifier)
        && !(guid.is_empty() || (guid.len() == 17 && guid[0] == 0))
    {
        return Decision::Ignore(Ignore::BadGuid);
    }
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(*a),
        _ => None,
    };
    if ipxe {
        let client = if ours { Client::OurIpxe } else { Client::Ipxe };
        return Decision::Boot {
            client,
            file: format!("{}/boot/{}.ipxe", server.http_base, mac.dashed()),
        };
    }
    match arch.map(u16::from) {
        None | Some(0) if !http => Decision::Boot {
            client: Client::Bios,
            file: BIOS_FILE.into(),
        },
        Some(7 | 9) if !http => Decision::Boot {
            client: Client::Efi64,
            file: EFI_FILE.into(),
        },
        Some(16) => Decision::Boot {
            client: Client::EfiHttp,
            file: format!("{}/{EFI_FILE}", server.http_base),
        },
        other => Decision::Ignore(Ignore::UnsupportedArch(
            other.unwrap_or(u16::from(Architecture::X86_Bios)),
        )),
    }
}

/// Which service a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Port 67: DISCOVER/REQUEST broadcasts.
    Dhcp,
    /// Port 4011: PXE boot-server (proxyDHCP) REQUESTs, answered by unicast.
    ProxyDhcp,
}

/// An address handed out in full-DHCP mode, with what the client needs to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The client's address.
    pub ip: Ipv4Addr,
    /// Netmask of the segment.
    pub netmask: Ipv4Addr,
    /// Default gateway, if the segment has one.
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds.
    pub secs: u32,
}

/// Builds the reply to `req` (already decided as `decision`). `lease` is set in full-DHCP
/// mode; without it the reply is a proxyDHCP one (no address). Returns `None` when nothing
/// should be sent.
pub fn reply(
    req: &Message,
    decision: &Decision,
    port: Port,
    server: &BootServer,
    lease: Option<&Lease>,
) -> Option<Message> {
    let req_type = message_type(req)?;
    let reply_type = match (req_type, port, lease.is_some()) {
        (MessageType::Discover, Port::Dhcp, _) => MessageType::Offer,
        // In proxy mode a REQUEST on port 67 is for the real DHCP server.
        (MessageType::Request | MessageType::Inform, Port::Dhcp, true) => MessageType::Ack,
        (MessageType::Request | MessageType::Inform, Port::ProxyDhcp, _) => MessageType::Ack,
        _ => return None,
    };
    let boot = match decision {
        Decision::Boot { client, file } => Some((*client, file.as_str())),
        Decision::Ignore(_) => None,
    };
    // Without an address to give, only boot information is worth sending.
    if lease.is_none() && boot.is_none() {
        return None;
    }
    // INFORM must not carry yiaddr; proxy replies never do.
    let yiaddr = match (lease, req_type) {
        (Some(l), MessageType::Discover | MessageType::Request) => l.ip,
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let mut msg = Message::new_with_id(
        req.xid(),
        req.ciaddr(),
        yiaddr,
        server.ip,
        req.giaddr(),
        req.chaddr(),
    );
    msg.set_opcode(Opcode::BootReply);
    msg.set_flags(req.flags());
    msg.set_htype(req.htype());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(reply_type));
    opts.insert(DhcpOption::ServerIdentifier(server.ip));
    if let Some(l) = lease {
        if req_type != MessageType::Inform {
            opts.insert(DhcpOption::AddressLeaseTime(l.secs));
            opts.insert(DhcpOption::Renewal(l.secs / 2));
            opts.insert(DhcpOption::Rebinding(l.secs / 8 * 7));
        }
        opts.insert(DhcpOption::SubnetMask(l.netmask));
        if let Some(r) = l.router {
            opts.insert(DhcpOption::Router(vec![r]));
        }
    }
    if let Some((client, file)) = boot {
        let class: &[u8] = if client == Client::EfiHttp {
            b"HTTPClient"
        } else {
            b"PXEClient"
        };
        let ipxe = matches!(client, Client::Ipxe | Client::OurIpxe);
        if ipxe && lease.is_some() {
            // We are its DHCP server and already gave it everything: tell iPXE not to wait
            // for (or ask) a ProxyDHCP server (encapsulated option 175.176 "no-pxedhcp").
            // The PXEClient class would make iPXE treat this offer as a proxy offer too.
            opts.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(OPT_IPXE_ENCAP),
                vec![IPXE_NO_PXEDHCP, 1, 1],
            )));
        } else {
            opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        }
        opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        let sname = server.ip.to_string();
        opts.insert(DhcpOption::TFTPServerName(sname.clone().into_bytes()));
        if matches!(client, Client::Bios | Client::Efi64) {
            opts.insert(DhcpOption::VendorExtensions(vec![
                PXE_DISCOVERY_CONTROL,
                1,
                PXE_USE_BOOTFILE,
                255,
            ]));
        }
        if let Some(DhcpOption::ClientMachineIdentifier(g)) =
            req.opts().get(OptionCode::ClientMachineIdentifier)
        {
            opts.insert(DhcpOption::ClientMachineIdentifier(g.clone()));
        }
        // The fixed fields only when the value fits (with its NUL); option 67 and 66 carry
        // it either way, and a client reads the options first.
        if file.len() <= MAX_FILE_FIELD {
            msg.set_fname_str(file);
        }
        if sname.len() <= MAX_SNAME_FIELD {
            msg.set_sname_str(sname);
        }
    }
    Some(msg)
}

/// A DHCPNAK for a REQUEST we cannot honour (full-DHCP mode).
pub fn nak(req: &Message, server: &BootServer) -> Message {
    let mut msg = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        req.giaddr(),
        req.chaddr(),
    );
    msg.set_opcode(Opcode::BootReply);
    msg.set_flags(req.flags());
    msg.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Nak));
    msg.opts_mut()
        .insert(DhcpOption::ServerIdentifier(server.ip));
    msg
}

/// Encodes a reply.
pub fn encode(msg: &Message) -> Result<Vec<u8>> {
    msg.to_vec().map_err(|e| Error::DhcpEncode(e.to_string()))
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The relay agent that forwarded the request (`giaddr`, port 67).
    Relay(Ipv4Addr),
    /// Back to the sender (proxyDHCP on 4011: the client has an address).
    Peer,
    /// Broadcast on the segment (the client has no address yet).
    Broadcast,
}

/// What [`handle`] made of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// The DHCP message type of the request.
    pub kind: Option<MessageType>,
    /// The decision.
    pub decision: Decision,
    /// The client's MAC (Ethernet clients only).
    pub mac: Option<Mac>,
    /// The encoded reply, if one is due, and where it goes.
    pub reply: Option<(Vec<u8>, Dest)>,
    /// A lease was confirmed: the book must be saved.
    pub leases_changed: bool,
}

/// The whole DHCP pipeline on raw bytes, as the server runs it and the fuzz target drives
/// it: decode, decide, lease (full-DHCP mode: `leases` set, on port 67 only), build and
/// encode the reply. `now` is Unix seconds. Pure apart from the lease book in memory.
pub fn handle(
    bytes: &[u8],
    port: Port,
    server: &BootServer,
    leases: Option<&mut Leases>,
    now: u64,
) -> Result<Handled> {
    let req = parse(bytes)?;
    let decision = decide(&req, server);
    let kind = message_type(&req);
    let mac = Mac::from_chaddr(req.chaddr()).filter(|_| req.hlen() == 6);
    let mut leases_changed = false;
    let msg = match (leases, mac) {
        (Some(book), Some(mac))
            if port == Port::Dhcp
                && !matches!(
                    decision,
                    Decision::Ignore(Ignore::NotARequest | Ignore::NotEthernet)
                ) =>
        {
            full_dhcp(book, &req, &decision, server, mac, now, &mut leases_changed)
        }
        _ => reply(&req, &decision, port, server, None),
    };
    let reply = match msg {
        Some(m) => {
            let dest = if !req.giaddr().is_unspecified() {
                Dest::Relay(req.giaddr())
            } else if port == Port::ProxyDhcp {
                Dest::Peer
            } else {
                Dest::Broadcast
            };
            Some((encode(&m)?, dest))
        }
        None => None,
    };
    Ok(Handled {
        kind,
        decision,
        mac,
        reply,
        leases_changed,
    })
}

fn full_dhcp(
    book: &mut Leases,
    req: &Message,
    decision: &Decision,
    server: &BootServer,
    mac: Mac,
    now: u64,
    changed: &mut bool,
) -> Option<Message> {
    let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    match message_type(req)? {
        // Offers are held in memory only; an ACK is what must survive a restart.
        MessageType::Discover => book
            .offer(mac, requested, now)
            .ok()
            .and_then(|lease| reply(req, decision, Port::Dhcp, server, Some(&lease))),
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(id)) =
                req.opts().get(OptionCode::ServerIdentifier)
                && *id != server.ip
            {
                return None; // The client chose another server.
            }
            let ip = requested.or((!req.ciaddr().is_unspecified()).then(|| req.ciaddr()))?;
            match book.ack(mac, ip, now) {
                Some(lease) => {
                    *changed = true;
                    reply(req, decision, Port::Dhcp, server, Some(&lease))
                }
                None => Some(nak(req, server)),
            }
        }
        // INFORM: the client has an address already; it only wants options.
        MessageType::Inform => reply(req, decision, Port::ProxyDhcp, server, None),
        _ => None,
    }
}

/// Checks at start-up that every reply this server can send fits: the longest boot file
/// name (a script URL) in one option, and the largest reply in the [`MAX_MESSAGE`] bytes
/// every client accepts. `full` is full-DHCP mode (replies carry a lease too).
pub fn check_sizes(server: &BootServer, full: bool) -> Result<()> {
    let bad = |detail: String| Error::Config {
        path: "flags".into(),
        detail,
    };
    let mac = Mac([0xff; 6]);
    let longest = format!("{}/boot/{}.ipxe", server.http_base, mac.dashed());
    if longest.len() > MAX_OPTION {
        return Err(bad(format!(
            "boot file names like {longest:?} are {} bytes; DHCP option 67 holds at most {MAX_OPTION}: shorten --http-base-url",
            longest.len()
        )));
    }
    let lease = Lease {
        ip: Ipv4Addr::new(255, 255, 255, 254),
        netmask: Ipv4Addr::new(255, 255, 255, 255),
        router: Some(Ipv4Addr::new(255, 255, 255, 254)),
        secs: u32::MAX,
    };
    let mut worst = 0;
    for (class, uc, arch) in [
        (&b"PXEClient"[..], Some(&b"iPXE"[..]), Some(0)),
        (b"HTTPClient", None, Some(16)),
        (b"PXEClient", None, Some(7)),
    ] {
        for kind in [MessageType::Discover, MessageType::Request] {
            let req = client_request(mac, kind, Some(class), arch, uc);
            let d = decide(&req, server);
            for (port, l) in [
                (Port::Dhcp, full.then_some(&lease)),
                (Port::ProxyDhcp, None),
            ] {
                if let Some(m) = reply(&req, &d, port, server, l) {
                    worst = worst.max(encode(&m)?.len());
                }
            }
        }
    }
    if worst > MAX_MESSAGE {
        return Err(bad(format!(
            "with --http-base-url {:?} a DHCP reply takes {worst} bytes, more than the {MAX_MESSAGE} every client must accept: shorten it",
            server.http_base
        )));
    }
    Ok(())
}

/// Builds a request the way firmware does; for tests, benchmarks and the fuzz corpus.
pub fn client_request(
    mac: Mac,
    kind: MessageType,
    class: Option<&[u8]>,
    arch: Option<u16>,
    user_class: Option<&[u8]>,
) -> Message {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    if let Some(c) = class {
        o.insert(DhcpOption::ClassIdentifier(c.to_vec()));
    }
    if let Some(a) = arch {
        o.insert(DhcpOption::ClientSystemArchitecture(a.into()));
        o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    }
    if let Some(u) = user_class {
        o.insert(DhcpOption::UserClass(u.to_vec()));
    }
    m
}

/// Adds an iPXE option 175 (encapsulated; contents irrelevant to us) to a request.
pub fn add_ipxe_encap(m: &mut Message) {
    m.opts_mut().insert(DhcpOption::Unknown(UnknownOption::new(
        OptionCode::Unknown(OPT_IPXE_ENCAP),
        vec![0xb1, 1, 1],
    )));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

    fn server() -> BootServer {
        BootServer {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            http_base: "http://10.0.0.1:8080".into(),
        }
    }

    fn boot(client: Client, file: &str) -> Decision {
        Decision::Boot {
            client,
            file: file.into(),
        }
    }

    #[test]
    fn decision_table() {
        use MessageType::*;
        let script = "http://10.0.0.1:8080/boot/52-54-00-aa-bb-cc.ipxe";
        let pxe = Some(&b"PXEClient:Arch:00000:UNDI:002001"[..]);
        let pxe7 = Some(&b"PXEClient:Arch:00007:UNDI:003016"[..]);
        let httpc = Some(&b"HTTPClient:Arch:00016:UNDI:003001"[..]);
        let cases: Vec<(&str, Message, Decision)> = vec![
            (
                "bios",
                client_request(MAC, Discover, pxe, Some(0), None),
                boot(Client::Bios, BIOS_FILE),
            ),
            (
                "bios no arch",
                client_request(MAC, Discover, pxe, None, None),
                boot(Client::Bios, BIOS_FILE),
            ),
            (
                "bios request",
                client_request(MAC, Request, pxe, Some(0), None),
                boot(Client::Bios, BIOS_FILE),
            ),
            (
                "uefi x64 (7)",
                client_request(MAC, Discover, pxe7, Some(7), None),
                boot(Client::Efi64, EFI_FILE),
            ),
            (
                "uefi x64 (9)",
                client_request(MAC, Discover, pxe7, Some(9), None),
                boot(Client::Efi64, EFI_FILE),
            ),
            (
                "uefi http",
                client_request(MAC, Discover, httpc, Some(16), None),
                boot(Client::EfiHttp, "http://10.0.0.1:8080/ipxe.efi"),
            ),
            (
                "ipxe user-class",
                client_request(MAC, Discover, pxe, Some(0), Some(b"iPXE")),
                boot(Client::Ipxe, script),
            ),
            (
                "ipxe rfc3004 user-class",
                client_request(MAC, Discover, pxe7, Some(7), Some(b"\x04iPXE")),
                boot(Client::Ipxe, script),
            ),
            (
                "our user-class",
                client_request(MAC, Discover, pxe, Some(0), Some(b"tether")),
                boot(Client::OurIpxe, script),
            ),
            (
                "our user-class without PXEClient",
                client_request(MAC, Request, None, None, Some(b"tether")),
                boot(Client::OurIpxe, script),
            ),
            (
                "ipxe option 175",
                {
                    let mut m = client_request(MAC, Discover, pxe, Some(7), None);
                    add_ipxe_encap(&mut m);
                    m
                },
                boot(Client::Ipxe, script),
            ),
            (
                "plain dhcp client",
                client_request(MAC, Discover, Some(b"android-dhcp-13"), None, None),
                Decision::Ignore(Ignore::NotNetboot),
            ),
            (
                "no class at all",
                client_request(MAC, Discover, None, None, Some(b"iPXE-ish")),
                Decision::Ignore(Ignore::NotNetboot),
            ),
            (
                "arm64 uefi",
                client_request(MAC, Discover, pxe, Some(11), None),
                Decision::Ignore(Ignore::UnsupportedArch(11)),
            ),
            (
                "ia32 uefi",
                client_request(MAC, Discover, pxe, Some(6), None),
                Decision::Ignore(Ignore::UnsupportedArch(6)),
            ),
            (
                "PXEClient claiming arch 16",
                client_request(MAC, Discover, pxe, Some(16), None),
                boot(Client::EfiHttp, "http://10.0.0.1:8080/ipxe.efi"),
            ),
            (
                "HTTPClient claiming bios",
                client_request(MAC, Discover, httpc, Some(0), None),
                Decision::Ignore(Ignore::UnsupportedArch(0)),
            ),
            (
                "release",
                client_request(MAC, Release, pxe, Some(0), None),
                Decision::Ignore(Ignore::NotARequest),
            ),
            (
                "bad guid",
                {
                    let mut m = client_request(MAC, Discover, pxe, Some(0), None);
                    m.opts_mut()
                        .insert(DhcpOption::ClientMachineIdentifier(vec![1; 17]));
                    m
                },
                Decision::Ignore(Ignore::BadGuid),
            ),
            (
                "short guid",
                {
                    let mut m = client_request(MAC, Discover, pxe, Some(0), None);
                    m.opts_mut()
                        .insert(DhcpOption::ClientMachineIdentifier(vec![0; 5]));
                    m
                },
                Decision::Ignore(Ignore::BadGuid),
            ),
            (
                "empty guid ok",
                {
                    let mut m = client_request(MAC, Discover, pxe, Some(0), None);
                    m.opts_mut()
                        .insert(DhcpOption::ClientMachineIdentifier(vec![]));
                    m
                },
                boot(Client::Bios, BIOS_FILE),
            ),
            (
                "boot reply",
                {
                    let mut m = client_request(MAC, Discover, pxe, Some(0), None);
                    m.set_opcode(Opcode::BootReply);
                    m
                },
                Decision::Ignore(Ignore::NotARequest),
            ),
        ];
        for (name, msg, want) in cases {
            // Through the wire format, as the server sees it.
            let bytes = encode(&msg).unwrap();
            let got = decide(&parse(&bytes).unwrap(), &server());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn malformed_packets_are_errors() {
        let good = encode(&client_request(
            MAC,
            MessageType::Discover,
            Some(b"PXEClient"),
            Some(0),
            None,
        ))
        .unwrap();
        assert!(handle(&good, Port::Dhcp, &server(), None, 0).is_ok());
        let mut bad_len = good.clone();
        // First option after the cookie is 53 (type); claim it is longer than the packet.
        bad_len[241] = 250;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("one byte", vec![1]),
            ("header only, truncated", good[..100].to_vec()),
            ("no magic cookie", good[..236].to_vec()),
            ("option runs past end", bad_len),
            ("truncated mid-option", good[..good.len() - 4].to_vec()),
            ("rapid commit with a length (fuzz crash)", {
                let mut b = good[..240].to_vec();
                b.extend_from_slice(&[53, 1, 1, 80, 32, 60, 88]);
                b.extend_from_slice(&[0; 30]);
                b.push(255);
                b
            }),
            ("hlen 249 (fuzz crash)", {
                let mut b = good.clone();
                b[2] = 249;
                b
            }),
            ("client interface repeated", {
                let mut b = good[..240].to_vec();
                b.extend_from_slice(&[53, 1, 1, 94, 3, 1, 2, 1, 94, 3, 1, 2, 1, 255]);
                b
            }),
            ("client interface too short", {
                let mut b = good[..240].to_vec();
                b.extend_from_slice(&[53, 1, 1, 94, 2, 1, 2, 255]);
                b
            }),
        ];
        for (name, bytes) in cases {
            let r = handle(&bytes, Port::Dhcp, &server(), None, 0);
            assert!(
                matches!(r, Err(Error::DhcpDecode(_))),
                "{name}: {:?}",
                r.map(|h| h.decision)
            );
        }
    }

    #[test]
    fn proxy_replies() {
        let s = server();
        let req = client_request(
            MAC,
            MessageType::Discover,
            Some(b"PXEClient:Arch:00007"),
            Some(7),
            None,
        );
        let d = decide(&req, &s);
        let offer = reply(&req, &d, Port::Dhcp, &s, None).unwrap();
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED, "proxy never leases");
        assert_eq!(offer.siaddr(), s.ip);
        assert_eq!(offer.xid(), req.xid());
        assert_eq!(offer.fname_str().unwrap().unwrap(), EFI_FILE);
        assert!(matches!(
            offer.opts().get(OptionCode::ClassIdentifier),
            Some(DhcpOption::ClassIdentifier(c)) if c == b"PXEClient"
        ));
        assert!(matches!(
            offer.opts().get(OptionCode::VendorExtensions),
            Some(DhcpOption::VendorExtensions(v)) if v == &[6, 1, 8, 255]
        ));
        // A proxy DISCOVER on 4011 is not answered; REQUEST on 4011 gets an ACK.
        assert!(reply(&req, &d, Port::ProxyDhcp, &s, None).is_none());
        let req = client_request(MAC, MessageType::Request, Some(b"PXEClient"), Some(7), None);
        let ack = reply(&req, &decide(&req, &s), Port::ProxyDhcp, &s, None).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert!(
            reply(&req, &decide(&req, &s), Port::Dhcp, &s, None).is_none(),
            "proxy REQUEST on 67 belongs to the real DHCP server"
        );
        // Non-netboot clients get nothing in proxy mode.
        let req = client_request(MAC, MessageType::Discover, None, None, None);
        assert!(reply(&req, &decide(&req, &s), Port::Dhcp, &s, None).is_none());
    }

    #[test]
    fn full_dhcp_replies_carry_the_lease() {
        let s = server();
        let lease = Lease {
            ip: Ipv4Addr::new(10, 0, 0, 50),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            secs: 3600,
        };
        let req = client_request(MAC, MessageType::Discover, None, None, None);
        let offer = reply(&req, &decide(&req, &s), Port::Dhcp, &s, Some(&lease)).unwrap();
        assert_eq!(offer.yiaddr(), lease.ip);
        assert!(offer.opts().get(OptionCode::BootfileName).is_none());
        let req = client_request(
            MAC,
            MessageType::Discover,
            Some(b"PXEClient"),
            Some(0),
            None,
        );
        let offer = reply(&req, &decide(&req, &s), Port::Dhcp, &s, Some(&lease)).unwrap();
        assert_eq!(offer.yiaddr(), lease.ip);
        assert_eq!(offer.fname_str().unwrap().unwrap(), BIOS_FILE);
        assert!(matches!(
            offer.opts().get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        ));
        // iPXE asking our full DHCP gets no-pxedhcp instead of a PXEClient class.
        let req = client_request(
            MAC,
            MessageType::Discover,
            Some(b"PXEClient"),
            Some(0),
            Some(b"iPXE"),
        );
        let offer = reply(&req, &decide(&req, &s), Port::Dhcp, &s, Some(&lease)).unwrap();
        assert!(offer.opts().get(OptionCode::ClassIdentifier).is_none());
        assert!(matches!(
            offer.opts().get(OptionCode::Unknown(OPT_IPXE_ENCAP)),
            Some(DhcpOption::Unknown(u)) if u.data() == [176, 1, 1]
        ));
    }

    fn server_with_base(len: usize) -> BootServer {
        let head = "http://10.0.0.1:8080/";
        BootServer {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            http_base: format!("{head}{}", "a".repeat(len - head.len())),
        }
    }

    #[test]
    fn long_boot_file_names_go_in_option_67_only() {
        for (base_len, in_field) in [(40, true), (99, true), (100, false), (200, false)] {
            let s = server_with_base(base_len);
            let req = client_request(
                MAC,
                MessageType::Request,
                Some(b"PXEClient"),
                Some(0),
                Some(b"iPXE"),
            );
            let h = handle(&encode(&req).unwrap(), Port::ProxyDhcp, &s, None, 0).unwrap();
            let (bytes, dest) = h.reply.unwrap();
            assert_eq!(dest, Dest::Peer);
            let m = parse(&bytes).unwrap();
            let url = format!("{}/boot/52-54-00-aa-bb-cc.ipxe", s.http_base);
            assert!(
                matches!(
                    m.opts().get(OptionCode::BootfileName),
                    Some(DhcpOption::BootfileName(f)) if f == url.as_bytes()
                ),
                "{base_len}"
            );
            let field = m
                .fname_str()
                .and_then(|r| r.ok())
                .unwrap_or_default()
                .trim_end_matches('\0');
            assert_eq!(field == url, in_field, "{base_len}: file field {field:?}");
            assert_eq!(
                m.sname_str().unwrap().unwrap().trim_end_matches('\0'),
                "10.0.0.1"
            );
        }
    }

    #[test]
    fn reply_sizes_are_checked_at_start_up() {
        assert!(check_sizes(&server(), true).is_ok());
        // Proxy replies are bounded by option 67 alone; full replies carry a lease too.
        assert!(check_sizes(&server_with_base(200), true).is_ok());
        assert!(check_sizes(&server_with_base(220), false).is_ok());
        let err = check_sizes(&server_with_base(220), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than the 548"), "{err}");
        let err = check_sizes(&server_with_base(240), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("option 67 holds at most 255"), "{err}");
        // What passes the check encodes within the limit, for every client kind.
        let s = server_with_base(200);
        for arch in [0u16, 7, 9, 16] {
            for uc in [None, Some(&b"iPXE"[..]), Some(b"tether")] {
                let req = client_request(
                    MAC,
                    MessageType::Request,
                    Some(b"PXEClient"),
                    Some(arch),
                    uc,
                );
                let h = handle(&encode(&req).unwrap(), Port::ProxyDhcp, &s, None, 0).unwrap();
                if let Some((b, _)) = h.reply {
                    assert!(b.len() <= MAX_MESSAGE, "{arch} {uc:?}: {}", b.len());
                }
            }
        }
    }

    #[test]
    fn full_dhcp_through_handle() {
        let s = server();
        let mut book = Leases::new(leases::Pool {
            start: Ipv4Addr::new(10, 0, 0, 10),
            end: Ipv4Addr::new(10, 0, 0, 10),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            lease_secs: 600,
        })
        .unwrap();
        let disc = client_request(
            MAC,
            MessageType::Discover,
            Some(b"PXEClient"),
            Some(0),
            None,
        );
        let h = handle(
            &encode(&disc).unwrap(),
            Port::Dhcp,
            &s,
            Some(&mut book),
            100,
        )
        .unwrap();
        assert!(!h.leases_changed, "an offer is not saved");
        let (b, dest) = h.reply.unwrap();
        assert_eq!(dest, Dest::Broadcast);
        let offer = parse(&b).unwrap();
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 10));
        let mut req = client_request(MAC, MessageType::Request, Some(b"PXEClient"), Some(0), None);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        req.opts_mut().insert(DhcpOption::ServerIdentifier(s.ip));
        let h = handle(&encode(&req).unwrap(), Port::Dhcp, &s, Some(&mut book), 101).unwrap();
        assert!(h.leases_changed);
        let ack = parse(&h.reply.unwrap().0).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), offer.yiaddr());
        // Another MAC asking for the same address is refused; the pool is exhausted for it.
        let other = Mac([2, 0, 0, 0, 0, 9]);
        let mut req = client_request(other, MessageType::Request, None, None, None);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        let h = handle(&encode(&req).unwrap(), Port::Dhcp, &s, Some(&mut book), 102).unwrap();
        let nak = parse(&h.reply.unwrap().0).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        let disc = client_request(other, MessageType::Discover, None, None, None);
        let h = handle(
            &encode(&disc).unwrap(),
            Port::Dhcp,
            &s,
            Some(&mut book),
            103,
        )
        .unwrap();
        assert!(h.reply.is_none(), "no address to offer");
        // On 4011 the book is never consulted.
        let h = handle(
            &encode(&disc).unwrap(),
            Port::ProxyDhcp,
            &s,
            Some(&mut book),
            104,
        )
        .unwrap();
        assert!(h.reply.is_none());
    }
}
