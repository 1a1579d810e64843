//! Any datagram into the DHCP handler: never a panic; every reply re-parses, never leases in
//! proxy mode, and answers the request's transaction.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use tether_pxe::dhcp::{self, BootServer, Decision, Lease, Port};

fuzz_target!(|data: &[u8]| {
    let server = BootServer {
        ip: Ipv4Addr::new(10, 0, 0, 1),
        http_base: "http://10.0.0.1".into(),
    };
    for port in [Port::Dhcp, Port::ProxyDhcp] {
        let Ok((decision, reply)) = dhcp::handle_proxy(data, port, &server) else {
            continue;
        };
        let req = dhcp::parse(data).expect("decoded once, decodes again");
        if let Some(bytes) = reply {
            let r = dhcp::parse(&bytes).expect("our reply parses");
            assert_eq!(r.xid(), req.xid());
            assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED, "proxy never leases");
            assert!(matches!(decision, Decision::Boot { .. }));
        }
        // Full-DHCP replies for the same request must encode too.
        let lease = Lease {
            ip: Ipv4Addr::new(10, 0, 0, 50),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            secs: 600,
        };
        if let Some(m) = dhcp::reply(&req, &decision, port, &server, Some(&lease)) {
            let bytes = dhcp::encode(&m).expect("full reply encodes");
            dhcp::parse(&bytes).expect("full reply parses");
        }
    }
});
