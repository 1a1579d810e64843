//! The agent side of one konnectivity stream as a pure state machine: inputs (a packet from
//! the server, a dial finishing, a remote connection ending, drain) become actions for the
//! edge ([`super::stream`]) to carry out in order. The rules follow upstream's agent
//! (apiserver-network-proxy v0.36.0 `pkg/agent/client.go` `Serve`), plus two of our own:
//! every `DIAL_REQ` passes [`Allow::check`] first, and `DIAL_CLS` cancels the pending dial
//! (upstream ignores it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use bytes::Bytes;

use super::allow::{Allow, Reason, Refusal};
use super::proto::{Packet, PacketType, packet::Payload};

/// Something that happened to the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A packet from the server.
    Packet(Packet),
    /// The dial for `random` finished; `Err` holds the reason.
    Dialed {
        /// The frontend's dial ID.
        random: i64,
        /// Connected, or why not.
        result: Result<(), String>,
    },
    /// The remote end of a connection hit EOF or an error (read or write).
    RemoteClosed {
        /// The connection.
        connect_id: i64,
    },
    /// The agent is going away.
    Drain,
}

/// Something the edge must do, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a packet to the server.
    Send(Packet),
    /// Start dialing `addr` (with the dial timeout) for `random`.
    Dial {
        /// The frontend's dial ID.
        random: i64,
        /// Where, as [`Allow::check`] resolved it.
        addr: SocketAddr,
    },
    /// Stop the dial for `random`, or drop its connection if it already finished.
    CancelDial {
        /// The frontend's dial ID.
        random: i64,
    },
    /// The finished dial for `random` is connection `connect_id`: start pumping it. Comes after
    /// the `DIAL_RSP`, so the server knows the ID before any `DATA` for it.
    Attach {
        /// The frontend's dial ID.
        random: i64,
        /// The connection's ID on this stream.
        connect_id: i64,
    },
    /// Queue bytes for the remote end (awaiting room: back-pressure on the stream).
    Write {
        /// The connection.
        connect_id: i64,
        /// The bytes.
        data: Bytes,
    },
    /// Close the connection: stop reading it (before the `CLOSE_RSP` that follows, so no
    /// `DATA` trails it), write what is queued, then close.
    Close {
        /// The connection.
        connect_id: i64,
    },
}

/// What upstream's agent answers to `DATA` for a connection it does not know.
pub const UNRECOGNIZED: &str = "unrecognized connectID";
/// What upstream's agent answers to `CLOSE_REQ` for a connection it does not know.
pub const UNKNOWN: &str = "Unknown connectID";

/// One stream's dials and connections.
#[derive(Debug)]
pub struct Session {
    allow: Allow,
    /// Dials in flight: random → address (for the error message).
    pending: BTreeMap<i64, SocketAddr>,
    /// Open connections.
    open: BTreeSet<i64>,
    /// The last connection ID handed out; IDs start at 1 on every stream.
    last_id: i64,
    drained: bool,
}

impl Session {
    /// A fresh stream serving `allow`.
    pub fn new(allow: Allow) -> Session {
        Session {
            allow,
            pending: BTreeMap::new(),
            open: BTreeSet::new(),
            last_id: 0,
            drained: false,
        }
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Dials in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What to do about `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Packet(p) => self.packet(p),
            Input::Dialed { random, result } => self.dialed(random, result),
            Input::RemoteClosed { connect_id } => {
                if self.open.remove(&connect_id) {
                    vec![
                        Action::Close { connect_id },
                        Action::Send(Packet::close_response(connect_id, "")),
                    ]
                } else {
                    // Already closed at the server's request.
                    vec![]
                }
            }
            Input::Drain if self.drained => vec![],
            Input::Drain => {
                self.drained = true;
                vec![Action::Send(Packet::drain())]
            }
        }
    }

    fn packet(&mut self, p: Packet) -> Vec<Action> {
        match (p.kind(), p.payload) {
            (Some(PacketType::DialReq), Some(Payload::DialRequest(req))) => {
                let refused = |reason| {
                    let refusal = Refusal {
                        address: req.address.clone(),
                        reason,
                    };
                    vec![Action::Send(Packet::dial_response(
                        req.random,
                        0,
                        &refusal.to_string(),
                    ))]
                };
                if req.protocol != "tcp" {
                    return refused(Reason::Protocol(req.protocol.clone()));
                }
                if self.pending.contains_key(&req.random) {
                    return vec![Action::Send(Packet::dial_response(
                        req.random,
                        0,
                        &format!(
                            "tether-agent: dial ID {} is already in progress",
                            req.random
                        ),
                    ))];
                }
                match self.allow.check(&req.address) {
                    Ok(addr) => {
                        self.pending.insert(req.random, addr);
                        vec![Action::Dial {
                            random: req.random,
                            addr,
                        }]
                    }
                    Err(refusal) => refused(refusal.reason),
                }
            }
            (Some(PacketType::DialCls), Some(Payload::CloseDial(cls))) => {
                // Once the dial has finished the connection has an ID and the server closes it
                // by that; nothing else is closed here.
                if self.pending.remove(&cls.random).is_some() {
                    vec![Action::CancelDial { random: cls.random }]
                } else {
                    vec![]
                }
            }
            (Some(PacketType::Data), Some(Payload::Data(data))) => {
                if data.connect_id == 0 {
                    vec![]
                } else if !self.open.contains(&data.connect_id) {
                    vec![Action::Send(Packet::close_response(
                        data.connect_id,
                        UNRECOGNIZED,
                    ))]
                } else if data.data.is_empty() {
                    vec![]
                } else {
                    vec![Action::Write {
                        connect_id: data.connect_id,
                        data: data.data,
                    }]
                }
            }
            (Some(PacketType::CloseReq), Some(Payload::CloseRequest(req))) => {
                let connect_id = req.connect_id;
                if self.open.remove(&connect_id) {
                    vec![
                        Action::Close { connect_id },
                        Action::Send(Packet::close_response(connect_id, "")),
                    ]
                } else {
                    vec![Action::Send(Packet::close_response(connect_id, UNKNOWN))]
                }
            }
            // Packets an agent never receives (DIAL_RSP, CLOSE_RSP, DRAIN), unknown types and
            // packets without their payload: ignored, as upstream does.
            _ => vec![],
        }
    }

    fn dialed(&mut self, random: i64, result: Result<(), String>) -> Vec<Action> {
        let Some(addr) = self.pending.remove(&random) else {
            // Cancelled by DIAL_CLS while it was finishing: drop what it made.
            return match result {
                Ok(()) => vec![Action::CancelDial { random }],
                Err(_) => vec![],
            };
        };
        match result {
            Ok(()) => {
                self.last_id += 1;
                let connect_id = self.last_id;
                self.open.insert(connect_id);
                vec![
                    Action::Send(Packet::dial_response(random, connect_id, "")),
                    Action::Attach { random, connect_id },
                ]
            }
            Err(why) => vec![Action::Send(Packet::dial_response(
                random,
                0,
                &format!("tether-agent: dial tcp {addr}: {why}"),
            ))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::tenant_control_plane::Cidr;

    fn session() -> Session {
        Session::new(Allow {
            node_ips: vec!["10.0.0.5".parse().unwrap()],
            node_names: vec!["node-1".into()],
            kubelet_port: 10250,
            cidrs: vec![Cidr::parse("10.244.0.0/16").unwrap()],
        })
    }

    fn pkt(p: Packet) -> Input {
        Input::Packet(p)
    }

    fn send(p: Packet) -> Action {
        Action::Send(p)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn data(id: i64, b: &'static [u8]) -> Packet {
        Packet::data(id, Bytes::from_static(b))
    }

    /// DIAL_REQ 7 to a pod, dialed: connection 1 is open.
    fn opened() -> Vec<Input> {
        vec![
            pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
            Input::Dialed {
                random: 7,
                result: Ok(()),
            },
        ]
    }

    /// Each case: inputs fed in order, and the actions the last one must produce.
    #[test]
    fn rules() {
        let ok = || Ok(());
        let cases: Vec<(&str, Vec<Input>, Vec<Action>)> = vec![
            (
                "allowed dial starts",
                vec![pkt(Packet::dial_request("tcp", "10.0.0.5:10250", 7))],
                vec![Action::Dial {
                    random: 7,
                    addr: addr("10.0.0.5:10250"),
                }],
            ),
            (
                "node name dials the node address",
                vec![pkt(Packet::dial_request("tcp", "node-1:10250", 7))],
                vec![Action::Dial {
                    random: 7,
                    addr: addr("10.0.0.5:10250"),
                }],
            ),
            (
                "refused dial answers with the reason",
                vec![pkt(Packet::dial_request("tcp", "10.0.0.1:2379", 7))],
                vec![send(Packet::dial_response(
                    7,
                    0,
                    "tether-agent: dial 10.0.0.1:2379 refused: not this node's kubelet port nor \
                     the tenant's pod/service networks",
                ))],
            ),
            (
                "udp is refused",
                vec![pkt(Packet::dial_request("udp", "10.244.0.9:53", 7))],
                vec![send(Packet::dial_response(
                    7,
                    0,
                    "tether-agent: dial 10.244.0.9:53 refused: protocol \"udp\" is not \
                     supported (only tcp)",
                ))],
            ),
            (
                "a second dial with a pending ID is refused",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                ],
                vec![send(Packet::dial_response(
                    7,
                    0,
                    "tether-agent: dial ID 7 is already in progress",
                ))],
            ),
            (
                "dial success answers with connectID 1 then attaches",
                opened(),
                vec![
                    send(Packet::dial_response(7, 1, "")),
                    Action::Attach {
                        random: 7,
                        connect_id: 1,
                    },
                ],
            ),
            (
                "connect IDs count up per stream",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    pkt(Packet::dial_request("tcp", "10.244.0.9:81", 8)),
                    Input::Dialed {
                        random: 8,
                        result: Err("x".into()),
                    },
                    Input::Dialed {
                        random: 7,
                        result: ok(),
                    },
                    pkt(Packet::dial_request("tcp", "10.244.0.9:82", 9)),
                    Input::Dialed {
                        random: 9,
                        result: ok(),
                    },
                ],
                vec![
                    send(Packet::dial_response(9, 2, "")),
                    Action::Attach {
                        random: 9,
                        connect_id: 2,
                    },
                ],
            ),
            (
                "dial failure answers with the error",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    Input::Dialed {
                        random: 7,
                        result: Err("connection refused".into()),
                    },
                ],
                vec![send(Packet::dial_response(
                    7,
                    0,
                    "tether-agent: dial tcp 10.244.0.9:80: connection refused",
                ))],
            ),
            (
                "DIAL_CLS cancels a pending dial",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    pkt(Packet::close_dial(7)),
                ],
                vec![Action::CancelDial { random: 7 }],
            ),
            (
                "a dial finishing after DIAL_CLS is dropped, not answered",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    pkt(Packet::close_dial(7)),
                    Input::Dialed {
                        random: 7,
                        result: ok(),
                    },
                ],
                vec![Action::CancelDial { random: 7 }],
            ),
            (
                "a failed dial after DIAL_CLS needs nothing",
                vec![
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                    pkt(Packet::close_dial(7)),
                    Input::Dialed {
                        random: 7,
                        result: Err("timeout".into()),
                    },
                ],
                vec![],
            ),
            (
                "DIAL_CLS after the dial finished closes nothing",
                [opened(), vec![pkt(Packet::close_dial(7))]].concat(),
                vec![],
            ),
            (
                "DIAL_CLS for an unknown dial",
                vec![pkt(Packet::close_dial(99))],
                vec![],
            ),
            (
                "DATA for an open connection is written",
                [opened(), vec![pkt(data(1, b"hello"))]].concat(),
                vec![Action::Write {
                    connect_id: 1,
                    data: Bytes::from_static(b"hello"),
                }],
            ),
            (
                "empty DATA writes nothing",
                [opened(), vec![pkt(data(1, b""))]].concat(),
                vec![],
            ),
            (
                "DATA with connectID 0 is dropped",
                vec![pkt(data(0, b"x"))],
                vec![],
            ),
            (
                "DATA for an unknown connection",
                vec![pkt(data(5, b"x"))],
                vec![send(Packet::close_response(5, UNRECOGNIZED))],
            ),
            (
                "CLOSE_REQ for an open connection",
                [opened(), vec![pkt(Packet::close_request(1))]].concat(),
                vec![
                    Action::Close { connect_id: 1 },
                    send(Packet::close_response(1, "")),
                ],
            ),
            (
                "CLOSE_REQ for an unknown connection",
                vec![pkt(Packet::close_request(3))],
                vec![send(Packet::close_response(3, UNKNOWN))],
            ),
            (
                "CLOSE_REQ twice",
                [
                    opened(),
                    vec![pkt(Packet::close_request(1)), pkt(Packet::close_request(1))],
                ]
                .concat(),
                vec![send(Packet::close_response(1, UNKNOWN))],
            ),
            (
                "remote EOF closes unasked",
                [opened(), vec![Input::RemoteClosed { connect_id: 1 }]].concat(),
                vec![
                    Action::Close { connect_id: 1 },
                    send(Packet::close_response(1, "")),
                ],
            ),
            (
                "remote EOF after CLOSE_REQ says nothing more",
                [
                    opened(),
                    vec![
                        pkt(Packet::close_request(1)),
                        Input::RemoteClosed { connect_id: 1 },
                    ],
                ]
                .concat(),
                vec![],
            ),
            (
                "DATA after remote EOF is for an unknown connection",
                [
                    opened(),
                    vec![Input::RemoteClosed { connect_id: 1 }, pkt(data(1, b"late"))],
                ]
                .concat(),
                vec![send(Packet::close_response(1, UNRECOGNIZED))],
            ),
            (
                "drain sends DRAIN",
                vec![Input::Drain],
                vec![send(Packet::drain())],
            ),
            (
                "drain sends DRAIN once",
                vec![Input::Drain, Input::Drain],
                vec![],
            ),
            (
                "dials are still served while draining",
                vec![
                    Input::Drain,
                    pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)),
                ],
                vec![Action::Dial {
                    random: 7,
                    addr: addr("10.244.0.9:80"),
                }],
            ),
            (
                "packets an agent never gets are ignored",
                vec![
                    pkt(Packet::dial_response(1, 1, "")),
                    pkt(Packet::close_response(1, "")),
                    pkt(Packet::drain()),
                    pkt(Packet {
                        r#type: 42,
                        payload: None,
                    }),
                    pkt(Packet {
                        r#type: PacketType::DialReq as i32,
                        payload: None,
                    }),
                ],
                vec![],
            ),
        ];
        for (name, inputs, want) in cases {
            let mut s = session();
            let mut got = vec![];
            for input in inputs {
                got = s.handle(input);
            }
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn counts_follow_the_connections() {
        let mut s = session();
        s.handle(pkt(Packet::dial_request("tcp", "10.244.0.9:80", 7)));
        assert_eq!((s.pending(), s.open()), (1, 0));
        s.handle(Input::Dialed {
            random: 7,
            result: Ok(()),
        });
        assert_eq!((s.pending(), s.open()), (0, 1));
        s.handle(pkt(Packet::close_request(1)));
        assert_eq!((s.pending(), s.open()), (0, 0));
    }
}
