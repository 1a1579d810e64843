//! The edge for one gRPC stream to one konnectivity-server: the TLS channel and handshake
//! ([`connect`]), then [`serve`], which feeds packets and socket events to the pure
//! [`Session`] and carries out its actions on real TCP connections.
//!
//! Back-pressure is upstream's: a full per-connection queue to the remote makes the stream's
//! reader wait. Remote → server data never waits on that reader (each connection's reader
//! task sends straight into the stream's bounded outbound queue), so a remote that is slow to
//! read cannot deadlock one that is busy writing, as an echo would.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Streaming};

use super::Settings;
use super::allow::{Allow, split_host_port};
use super::proto::Packet;
use super::proto::agent_service_client::AgentServiceClient;
use super::session::{Action, Input, Session};
use crate::error::{Error, Result};

/// Upstream's agent dial timeout (`dialTimeout` in pkg/agent/client.go).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect and TLS handshake to the server, each.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// From the Connect call to the server's response headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2 PING interval. The server's agent listener enforces a 30 s minimum
/// (`EnforcementPolicy{MinTime: 30s}`) and drops pingers with `too_many_pings`, so never less.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a PING may go unanswered before the connection is declared dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes per read from a remote connection.
pub const READ_SIZE: usize = 32 * 1024;
/// Packets queued to the server per stream.
const OUTBOUND_QUEUE: usize = 64;
/// Chunks queued to one remote connection (upstream's `--xfr-channel-size` default).
const REMOTE_QUEUE: usize = 150;

/// The `agentIdentifiers` header: a URL-encoded query, `host=<node>&ipv4=<ip>` (or `ipv6=`).
pub fn agent_identifiers(node_name: &str, node_ip: Option<IpAddr>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("host", node_name);
    match node_ip {
        Some(IpAddr::V4(ip)) => q.append_pair("ipv4", &ip.to_string()),
        Some(IpAddr::V6(ip)) => q.append_pair("ipv6", &ip.to_string()),
        None => &mut q,
    };
    q.finish()
}

/// The single value of response header `key`; upstream's agent refuses zero or several.
pub fn one_header(headers: &MetadataMap, key: &str) -> std::result::Result<String, String> {
    let values: Vec<_> = headers.get_all(key).iter().collect();
    match values.as_slice() {
        [v] => v
            .to_str()
            .map(str::to_string)
            .map_err(|_| format!("response header {key} is not text")),
        [] => Err(format!("no {key} response header")),
        _ => Err(format!("{} {key} response headers, want one", values.len())),
    }
}

/// `e` and its sources, `: `-joined (tonic's transport errors say little on their own).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        next = cause.source();
    }
    s
}

/// A gRPC status as `code: message: causes` (tonic's `Display` adds details and metadata).
fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{}: {}", s.code(), s.message());
    if let Some(cause) = std::error::Error::source(s) {
        let cause = chain(cause);
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// A stream whose handshake is done.
pub struct Connected {
    /// The server's ID (`serverID` header).
    pub server_id: String,
    /// How many servers there are (`serverCount` header).
    pub server_count: usize,
    inbound: Streaming<Packet>,
    outbound: mpsc::Sender<Packet>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("server_id", &self.server_id)
            .field("server_count", &self.server_count)
            .finish_non_exhaustive()
    }
}

/// Opens a new HTTP/2 connection to `settings.server` (a new one each time, so a load
/// balancer can pick another backend) and calls `AgentService.Connect`.
pub async fn connect(settings: &Settings) -> Result<Connected> {
    let fail = |detail: String| Error::Tunnel {
        server: settings.server.clone(),
        detail,
    };
    let (host, _) = split_host_port(&settings.server)
        .ok_or_else(|| fail("the address is not HOST:PORT".into()))?;
    let roots = CertificateDer::pem_slice_iter(settings.ca_pem.as_bytes())
        .filter(Result::is_ok)
        .count();
    if roots == 0 {
        return Err(fail("the CA bundle holds no PEM certificate".into()));
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&settings.ca_pem))
        .domain_name(host)
        .timeout(CONNECT_TIMEOUT);
    // No adaptive window: its BDP pings would trip the server's ping policy.
    let endpoint = Endpoint::from_shared(format!("https://{}", settings.server))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| fail(chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(format!("connect: {}", chain(&e))))?;

    let (outbound, mut rx) = mpsc::channel::<Packet>(OUTBOUND_QUEUE);
    let mut request = Request::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let md = request.metadata_mut();
    let value = |what: &str, v: &str| {
        MetadataValue::try_from(v).map_err(|_| fail(format!("{what} is not a valid header value")))
    };
    md.insert("agentid", value("the agent ID", &settings.agent_id)?);
    md.insert(
        "agentidentifiers",
        value(
            "the agent identifiers",
            &agent_identifiers(&settings.node_name, settings.node_ip),
        )?,
    );
    if !settings.token.is_empty() {
        md.insert(
            "authorization",
            value("the token", &format!("Bearer {}", settings.token))?,
        );
    }
    let response = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        AgentServiceClient::new(channel).connect(request),
    )
    .await
    .map_err(|_| fail(format!("no response to Connect in {HANDSHAKE_TIMEOUT:?}")))?
    .map_err(|s| fail(format!("Connect: {}", status_text(&s))))?;
    let server_id = one_header(response.metadata(), "serverid").map_err(&fail)?;
    let count = one_header(response.metadata(), "servercount").map_err(&fail)?;
    let server_count = count
        .parse()
        .map_err(|_| fail(format!("serverCount {count:?} is not a number")))?;
    Ok(Connected {
        server_id,
        server_count,
        inbound: response.into_inner(),
        outbound,
    })
}

/// What the stream's tasks report back.
enum Event {
    Dialed {
        random: i64,
        result: std::result::Result<TcpStream, String>,
    },
    Closed {
        connect_id: i64,
    },
}

/// What the streams of one settings generation share with the clientset, which reports it
/// in [`super::Status`]: the remote connections open across them, and how many have queued
/// their `DRAIN`. A draining agent waits for both before it exits.
#[derive(Debug, Default)]
pub struct Counters {
    /// Remote connections open now.
    pub open: AtomicUsize,
    /// Streams that have queued their `DRAIN` packet.
    pub drained: AtomicUsize,
}

/// Counts one open connection for as long as it lives.
struct OpenGuard(Arc<Counters>);

impl OpenGuard {
    fn new(counters: &Arc<Counters>) -> OpenGuard {
        counters.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(counters.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open remote connection.
struct Conn {
    _open: OpenGuard,
    to_remote: mpsc::Sender<Bytes>,
    /// Set (under the lock) before `CLOSE_RSP` is queued; the reader sends `DATA` only under
    /// the lock and while unset, so no `DATA` follows the `CLOSE_RSP`.
    closed: Arc<Mutex<bool>>,
    reader: AbortHandle,
}

/// The I/O side of one stream: tasks, finished dials, open connections.
struct Edge {
    server: String,
    outbound: mpsc::Sender<Packet>,
    events: mpsc::UnboundedSender<Event>,
    /// Dial, reader and writer tasks; dropped (aborted) with the stream.
    tasks: JoinSet<()>,
    dials: HashMap<i64, AbortHandle>,
    dialed: HashMap<i64, TcpStream>,
    conns: HashMap<i64, Conn>,
    counters: Arc<Counters>,
}

impl Edge {
    /// Feeds `input` to the session and carries out the actions, including the inputs they
    /// cause (a write to a dead connection closes it).
    async fn handle(&mut self, session: &mut Session, input: Input) -> Result<()> {
        let mut inputs = vec![input];
        while let Some(input) = inputs.pop() {
            for action in session.handle(input) {
                if let Some(next) = self.act(action).await? {
                    inputs.push(next);
                }
            }
        }
        Ok(())
    }

    async fn act(&mut self, action: Action) -> Result<Option<Input>> {
        match action {
            Action::Send(p) => {
                // A refused or failed dial is worth a line: it is either an attempt to use
                // the tunnel beyond the tenant or a node that cannot reach its own pods.
                if let Some(super::proto::packet::Payload::DialResponse(r)) = &p.payload
                    && !r.error.is_empty()
                {
                    tracing::warn!(server = %self.server, "tunnel: {}", r.error);
                }
                self.outbound.send(p).await.map_err(|_| Error::Tunnel {
                    server: self.server.clone(),
                    detail: "the stream closed".into(),
                })?;
            }
            Action::Dial { random, addr } => {
                let events = self.events.clone();
                let handle = self.tasks.spawn(async move {
                    let result = dial(addr).await;
                    let _ = events.send(Event::Dialed { random, result });
                });
                self.dials.insert(random, handle);
            }
            Action::CancelDial { random } => {
                if let Some(dial) = self.dials.remove(&random) {
                    dial.abort();
                }
                self.dialed.remove(&random);
            }
            Action::Attach { random, connect_id } => {
                if let Some(tcp) = self.dialed.remove(&random) {
                    self.attach(connect_id, tcp);
                } else {
                    return Ok(Some(Input::RemoteClosed { connect_id }));
                }
            }
            Action::Write { connect_id, data } => {
                if let Some(conn) = self.conns.get(&connect_id)
                    && conn.to_remote.send(data).await.is_err()
                {
                    return Ok(Some(Input::RemoteClosed { connect_id }));
                }
            }
            Action::Close { connect_id } => {
                if let Some(conn) = self.conns.remove(&connect_id) {
                    *conn.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    conn.reader.abort();
                    // Dropping `to_remote` lets the writer flush what is queued, then close.
                }
            }
        }
        Ok(None)
    }

    fn attach(&mut self, connect_id: i64, tcp: TcpStream) {
        let (read, write) = tcp.into_split();
        let (to_remote, queue) = mpsc::channel(REMOTE_QUEUE);
        let closed = Arc::new(Mutex::new(false));
        self.tasks
            .spawn(write_remote(connect_id, write, queue, self.events.clone()));
        let reader = self.tasks.spawn(read_remote(
            connect_id,
            read,
            self.outbound.clone(),
            closed.clone(),
            self.events.clone(),
        ));
        self.conns.insert(
            connect_id,
            Conn {
                _open: OpenGuard::new(&self.counters),
                to_remote,
                closed,
                reader,
            },
        );
    }
}

async fn dial(addr: SocketAddr) -> std::result::Result<TcpStream, String> {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => Err(format!("i/o timeout after {DIAL_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
    }
}

async fn read_remote(
    connect_id: i64,
    mut read: OwnedReadHalf,
    outbound: mpsc::Sender<Packet>,
    closed: Arc<Mutex<bool>>,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let mut buf = BytesMut::zeroed(READ_SIZE);
        match read.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                let Ok(permit) = outbound.reserve().await else {
                    return; // the stream is gone
                };
                let closed = closed.lock().unwrap_or_else(|e| e.into_inner());
                if *closed {
                    return;
                }
                permit.send(Packet::data(connect_id, buf.freeze()));
            }
            Err(e) => {
                tracing::debug!(connect_id, "tunnel: read from remote: {e}");
                break;
            }
        }
    }
    let _ = events.send(Event::Closed { connect_id });
}

async fn write_remote(
    connect_id: i64,
    mut write: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Bytes>,
    events: mpsc::UnboundedSender<Event>,
) {
    while let Some(data) = queue.recv().await {
        if let Err(e) = write.write_all(&data).await {
            tracing::debug!(connect_id, "tunnel: write to remote: {e}");
            let _ = events.send(Event::Closed { connect_id });
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// Serves `stream` until the server ends it (`Ok`) or it breaks (`Err`). Returning (or being
/// dropped) closes every connection of the stream.
pub async fn serve(
    stream: Connected,
    server: &str,
    allow: Allow,
    mut drain: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<()> {
    let Connected {
        mut inbound,
        outbound,
        ..
    } = stream;
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let mut edge = Edge {
        server: server.to_string(),
        outbound,
        events,
        tasks: JoinSet::new(),
        dials: HashMap::new(),
        dialed: HashMap::new(),
        conns: HashMap::new(),
        counters: counters.clone(),
    };
    let mut session = Session::new(allow);
    if *drain.borrow_and_update() {
        edge.handle(&mut session, Input::Drain).await?;
        counters.drained.fetch_add(1, Ordering::Relaxed);
    }
    let mut drain_open = true;
    loop {
        let input = tokio::select! {
            Some(event) = event_rx.recv() => match event {
                Event::Dialed { random, result } => {
                    edge.dials.remove(&random);
                    let result = match result {
                        Ok(tcp) => {
                            edge.dialed.insert(random, tcp);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    };
                    Input::Dialed { random, result }
                }
                Event::Closed { connect_id } => Input::RemoteClosed { connect_id },
            },
            changed = drain.changed(), if drain_open => {
                if changed.is_err() {
                    drain_open = false;
                    continue;
                }
                if !*drain.borrow_and_update() {
                    continue;
                }
                Input::Drain
            }
            message = inbound.message() => match message {
                Ok(Some(packet)) => Input::Packet(packet),
                Ok(None) => return Ok(()),
                Err(s) => {
                    return Err(Error::Tunnel {
                        server: server.to_string(),
                        detail: format!("stream: {}", status_text(&s)),
                    });
                }
            },
            Some(_) = edge.tasks.join_next(), if !edge.tasks.is_empty() => continue,
        };
        let drained = input == Input::Drain;
        edge.handle(&mut session, input).await?;
        if drained {
            counters.drained.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_identifiers_are_a_query() {
        let cases = [
            ("node-1", Some("10.0.0.5"), "host=node-1&ipv4=10.0.0.5"),
            ("node-1", Some("fd00::5"), "host=node-1&ipv6=fd00%3A%3A5"),
            ("node-1", None, "host=node-1"),
            ("a b&c=d", None, "host=a+b%26c%3Dd"),
        ];
        for (name, ip, want) in cases {
            let ip = ip.map(|s| s.parse().unwrap());
            assert_eq!(agent_identifiers(name, ip), want, "{name} {ip:?}");
        }
    }

    #[test]
    fn exactly_one_header() {
        let mut md = MetadataMap::new();
        assert_eq!(
            one_header(&md, "serverid"),
            Err("no serverid response header".into())
        );
        md.insert("serverid", "a".parse().unwrap());
        assert_eq!(one_header(&md, "serverid"), Ok("a".into()));
        md.append("serverid", "b".parse().unwrap());
        assert_eq!(
            one_header(&md, "serverid"),
            Err("2 serverid response headers, want one".into())
        );
    }

    #[test]
    fn keepalive_respects_the_server_policy() {
        // konnectivity-server: EnforcementPolicy{MinTime: 30s}.
        const { assert!(KEEPALIVE_INTERVAL.as_secs() >= 30) };
    }
}
