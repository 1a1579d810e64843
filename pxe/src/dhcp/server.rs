//! DHCP sockets: port 67 (broadcast DISCOVER/REQUEST) and 4011 (proxyDHCP REQUESTs), both
//! bound to one interface so replies leave where requests came from.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::leases::Leases;
use super::{BootServer, Decision, Ignore, Port, decide, encode, message_type, nak, parse, reply};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use tether_boot::Mac;

/// Opens a UDP socket for DHCP on `port`, broadcast-capable and (when given) bound to
/// `interface` so that a multi-homed host answers only on the boot segment.
pub fn bind(ip: Ipv4Addr, port: u16, interface: Option<&str>) -> Result<UdpSocket> {
    let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
    let what = format!("{addr} (interface {})", interface.unwrap_or("any"));
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(Error::io("create DHCP socket", &what))?;
    s.set_reuse_address(true)
        .map_err(Error::io("SO_REUSEADDR", &what))?;
    s.set_broadcast(true)
        .map_err(Error::io("SO_BROADCAST", &what))?;
    if let Some(ifname) = interface {
        s.bind_device(Some(ifname.as_bytes()))
            .map_err(Error::io("SO_BINDTODEVICE", &what))?;
    }
    s.set_nonblocking(true)
        .map_err(Error::io("set non-blocking", &what))?;
    s.bind(&addr.into()).map_err(Error::io("bind", &what))?;
    UdpSocket::from_std(s.into()).map_err(Error::io("register DHCP socket", &what))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves one DHCP port until `shutdown` flips. `leases` is set in full-DHCP mode (only on
/// port 67). `reply_port` is where broadcast replies go (68; tests and benchmarks move it).
pub async fn serve(
    sock: UdpSocket,
    port: Port,
    server: BootServer,
    mut leases: Option<Leases>,
    reply_port: u16,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("dhcp recv: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let req = match parse(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                metrics.dhcp("malformed");
                tracing::debug!(%peer, "{e}");
                continue;
            }
        };
        let decision = decide(&req, &server);
        metrics.dhcp(decision.label());
        tracing::debug!(%peer, ?port, kind = ?message_type(&req), decision = decision.label(), "dhcp request");
        let Some(mac) = Mac::from_chaddr(req.chaddr()) else {
            continue;
        };
        let msg = match leases.as_mut() {
            Some(book)
                if !matches!(
                    decision,
                    Decision::Ignore(Ignore::NotARequest | Ignore::NotEthernet)
                ) =>
            {
                full_dhcp(book, &req, &decision, &server, mac)
            }
            _ => reply(&req, &decision, port, &server, None),
        };
        let Some(msg) = msg else {
            tracing::debug!(%mac, decision = decision.label(), "no reply");
            continue;
        };
        let bytes = match encode(&msg) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%mac, "{e}");
                continue;
            }
        };
        let dest = if !req.giaddr().is_unspecified() {
            SocketAddr::V4(SocketAddrV4::new(req.giaddr(), 67))
        } else if port == Port::ProxyDhcp {
            peer
        } else {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, reply_port))
        };
        if let Decision::Boot { client, file } = &decision {
            tracing::info!(%mac, ?client, %file, reply = ?message_type(&msg), "dhcp boot answer");
        }
        if let Err(e) = sock.send_to(&bytes, dest).await {
            tracing::warn!(%mac, %dest, "dhcp send: {e}");
        }
    }
}

fn full_dhcp(
    book: &mut Leases,
    req: &dhcproto::v4::Message,
    decision: &Decision,
    server: &BootServer,
    mac: Mac,
) -> Option<dhcproto::v4::Message> {
    let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let t = now();
    match message_type(req)? {
        MessageType::Discover => match book.offer(mac, requested, t) {
            Ok(lease) => reply(req, decision, Port::Dhcp, server, Some(&lease)),
            Err(e) => {
                tracing::warn!(%mac, "no address to offer: {e}");
                None
            }
        },
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(id)) =
                req.opts().get(OptionCode::ServerIdentifier)
                && *id != server.ip
            {
                return None; // The client chose another server.
            }
            let ip = requested.or((!req.ciaddr().is_unspecified()).then(|| req.ciaddr()))?;
            match book.ack(mac, ip, t) {
                Some(lease) => {
                    if let Err(e) = book.save() {
                        tracing::error!("{e}");
                    }
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
