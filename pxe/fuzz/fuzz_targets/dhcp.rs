//! Any datagram into [`dhcp::handle`] — the function the server runs on every packet — in
//! proxy mode on both ports and in full-DHCP mode with a lease book: never a panic; every
//! reply re-parses, answers the request's transaction, leases only in full mode and only
//! from the pool; an offered address is then confirmed by a REQUEST for it.
#![no_main]

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, MessageType};
use libfuzzer_sys::fuzz_target;
use tether_pxe::dhcp::leases::{Leases, Pool};
use tether_pxe::dhcp::{self, BootServer, Decision, Port};

fn pool() -> Pool {
    Pool {
        start: Ipv4Addr::new(10, 0, 0, 50),
        end: Ipv4Addr::new(10, 0, 0, 53),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        router: Some(Ipv4Addr::new(10, 0, 0, 1)),
        lease_secs: 600,
    }
}

fn in_pool(ip: Ipv4Addr) -> bool {
    (u32::from(pool().start)..=u32::from(pool().end)).contains(&u32::from(ip))
}

fuzz_target!(|data: &[u8]| {
    let server = BootServer {
        ip: Ipv4Addr::new(10, 0, 0, 1),
        http_base: "http://10.0.0.1".into(),
    };
    for port in [Port::Dhcp, Port::ProxyDhcp] {
        let Ok(h) = dhcp::handle(data, port, &server, None, 1000) else {
            continue;
        };
        let req = dhcp::parse(data).expect("decoded once, decodes again");
        assert!(!h.leases_changed);
        if let Some((bytes, _)) = h.reply {
            assert!(bytes.len() <= dhcp::MAX_MESSAGE);
            let r = dhcp::parse(&bytes).expect("our reply parses");
            assert_eq!(r.xid(), req.xid());
            assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED, "proxy never leases");
            assert!(matches!(h.decision, Decision::Boot { .. }));
        }
    }
    // Full DHCP: the same packet twice through one book, then a REQUEST for what was offered.
    let mut book = Leases::new(pool()).unwrap();
    for t in [1000, 1001] {
        let Ok(h) = dhcp::handle(data, Port::Dhcp, &server, Some(&mut book), t) else {
            return;
        };
        let Some((bytes, _)) = h.reply else { continue };
        assert!(bytes.len() <= dhcp::MAX_MESSAGE);
        let r = dhcp::parse(&bytes).expect("full reply parses");
        let yi = r.yiaddr();
        assert!(
            yi.is_unspecified() || in_pool(yi),
            "leased {yi} outside the pool"
        );
        if r.opts().msg_type() == Some(MessageType::Offer) && !yi.is_unspecified() {
            let Some(mac) = h.mac else { continue };
            let mut req = dhcp::client_request(mac, MessageType::Request, None, None, None);
            req.opts_mut().insert(DhcpOption::RequestedIpAddress(yi));
            req.opts_mut()
                .insert(DhcpOption::ServerIdentifier(server.ip));
            let ack = dhcp::handle(
                &dhcp::encode(&req).unwrap(),
                Port::Dhcp,
                &server,
                Some(&mut book),
                t,
            )
            .expect("a REQUEST we built decodes");
            assert!(ack.leases_changed, "the offered address is confirmed");
            let a = dhcp::parse(&ack.reply.expect("an ACK").0).unwrap();
            assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(a.yiaddr(), yi);
        }
    }
});
