//! DHCP sockets: port 67 (broadcast DISCOVER/REQUEST) and 4011 (proxyDHCP REQUESTs), both
//! bound to one interface so replies leave where requests came from.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::leases::Leases;
use super::{BootServer, Decision, Dest, Port, handle};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::recent::RecentMacs;

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

/// Serves one DHCP port until `shutdown` flips, running each datagram through
/// [`super::handle`] (the function the fuzz target drives). `leases` is set in full-DHCP
/// mode (only on port 67). `reply_port` is where broadcast replies go (68; tests and
/// benchmarks move it). Every netboot client answered is recorded in `recent`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    sock: UdpSocket,
    port: Port,
    server: BootServer,
    mut leases: Option<Leases>,
    reply_port: u16,
    recent: Arc<RecentMacs>,
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
        let h = match handle(&buf[..n], port, &server, leases.as_mut(), now()) {
            Ok(h) => h,
            Err(e) => {
                metrics.dhcp("malformed");
                tracing::debug!(%peer, "{e}");
                continue;
            }
        };
        metrics.dhcp(h.decision.label());
        tracing::debug!(%peer, ?port, kind = ?h.kind, decision = h.decision.label(), "dhcp request");
        let Some(mac) = h.mac else { continue };
        if let Decision::Boot { .. } = h.decision {
            recent.saw(mac);
        }
        if h.leases_changed
            && let Some(book) = &leases
            && let Err(e) = book.save()
        {
            tracing::error!("{e}");
        }
        let Some((bytes, dest)) = h.reply else {
            tracing::debug!(%mac, decision = h.decision.label(), "no reply");
            continue;
        };
        let dest = match dest {
            Dest::Relay(ip) => SocketAddr::V4(SocketAddrV4::new(ip, 67)),
            Dest::Peer => peer,
            Dest::Broadcast => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, reply_port)),
        };
        if let Decision::Boot { client, file } = &h.decision {
            tracing::info!(%mac, ?client, %file, "dhcp boot answer");
        }
        if let Err(e) = sock.send_to(&bytes, dest).await {
            tracing::warn!(%mac, %dest, "dhcp send: {e}");
        }
    }
}
