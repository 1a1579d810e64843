//! tether-agent's konnectivity agent against the real upstream konnectivity-server (the pinned
//! binary from the tether cache; `cargo xtask deps` puts it there). The test plays the
//! kube-apiserver: it dials through the server's gRPC frontend on a Unix socket, as the
//! egress selector does, and checks what arrives at real TCP servers on loopback.

mod harness;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::*;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tether_agent::tunnel::Settings;
use tether_agent::tunnel::proto::packet::Payload;
use tether_agent::tunnel::proto::{Packet, PacketType};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One server on a free port and an agent holding its stream.
struct OneServer {
    dir: TempDir,
    pki: Pki,
    port: u16,
    server: Server,
    agent: Agent,
}

async fn one_server(id: &str) -> OneServer {
    init_logs();
    let dir = TempDir::new().unwrap();
    let pki = pki(dir.path());
    let port = free_port();
    let server = Server::start(dir.path(), &pki, id, 1, port).await;
    let mut agent = Agent::start(settings(&format!("127.0.0.1:{port}"), &pki));
    agent.wait_servers(&[id]).await;
    OneServer {
        dir,
        pki,
        port,
        server,
        agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_allowed_dials_and_refuses_the_rest() {
    // The directory holds the server's socket: kept to the end.
    let OneServer {
        dir: _dir,
        server,
        agent,
        ..
    } = one_server("s1").await;
    let status = agent.status.borrow().clone();
    assert_eq!(status.server_count, 1);
    assert_eq!(status.last_error, None);

    let (echo, ended) = echo_server().await;
    let mut t = dial_through(&server.uds, &echo.to_string()).await.unwrap();
    t.send(b"hello").await;
    assert_eq!(t.read(5).await, b"hello");

    // Several MB both ways at once, checksummed.
    const SIZE: usize = 8 * 1024 * 1024;
    let data = noise(SIZE);
    let started = Instant::now();
    let sender = {
        let tx = t.tx.clone();
        let id = t.id;
        let data = data.clone();
        tokio::spawn(async move {
            for chunk in data.chunks(32 * 1024) {
                tx.send(Packet::data(id, Bytes::copy_from_slice(chunk)))
                    .await
                    .unwrap();
            }
        })
    };
    let back = t.read(SIZE).await;
    sender.await.unwrap();
    assert_eq!(Sha256::digest(&back), Sha256::digest(&data));
    println!(
        "{} MiB echoed through the tunnel in {:?}",
        SIZE >> 20,
        started.elapsed()
    );

    // CLOSE_REQ closes the remote connection. (The server ends the frontend stream on
    // CLOSE_REQ, so the CLOSE_RSP may or may not reach us.)
    t.tx.send(Packet::close_request(t.id)).await.unwrap();
    poll("the echo connection to close", || {
        (ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    // The remote closing first: DATA, then CLOSE_RSP unasked.
    let bye = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bye_addr = bye.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = bye.accept().await.unwrap();
        tcp.write_all(b"bye").await.unwrap();
    });
    let mut t = dial(&server.uds, &bye_addr.to_string()).await.unwrap();
    assert_eq!(t.read(3).await, b"bye");
    let packet = next(&mut t.rx).await.expect("CLOSE_RSP");
    assert_eq!(packet.kind(), Some(PacketType::CloseRsp));
    match packet.payload {
        Some(Payload::CloseResponse(c)) => {
            assert_eq!((c.connect_id, c.error.as_str()), (t.id, ""));
        }
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }

    // Outside the allow-list: refused by the agent, with the reason.
    let refused = dial(&server.uds, "10.0.0.1:2379").await.err().unwrap();
    assert_eq!(
        refused,
        "tether-agent: dial 10.0.0.1:2379 refused: not this node's kubelet port nor the \
         tenant's pod/service networks"
    );
    let refused = dial(&server.uds, "10.255.0.5:22").await.err().unwrap();
    assert!(refused.contains("only the kubelet port 10250"), "{refused}");
    // Allowed, but nothing listens.
    let closed = format!("127.0.0.1:{}", free_port());
    let failed = dial(&server.uds, &closed).await.err().unwrap();
    assert!(
        failed.starts_with(&format!("tether-agent: dial tcp {closed}: ")),
        "{failed}"
    );
    // The stream survived all of it.
    let mut t = dial(&server.uds, &echo.to_string()).await.unwrap();
    t.send(b"still here").await;
    assert_eq!(t.read(10).await, b"still here");
    assert_eq!(server.logged("\"Agent connected\""), 1, "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts() {
    let OneServer {
        dir,
        pki,
        port,
        server,
        mut agent,
    } = one_server("first").await;

    let killed = Instant::now();
    drop(server);
    let server = Server::start(dir.path(), &pki, "second", 1, port).await;
    let listening = killed.elapsed();
    agent.wait_servers(&["second"]).await;
    let reconnected = killed.elapsed();
    println!(
        "reconnect: {reconnected:?} from kill to a stream to the new server \
         (new server listening after {listening:?})"
    );
    assert!(reconnected < Duration::from_secs(15));

    let (echo, _) = echo_server().await;
    let mut t = dial_through(&server.uds, &echo.to_string()).await.unwrap();
    t.send(b"again").await;
    assert_eq!(t.read(5).await, b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_a_stream_to_every_server_behind_one_address() {
    init_logs();
    let dir = TempDir::new().unwrap();
    let pki = pki(dir.path());
    let (port_a, port_b) = (free_port(), free_port());
    let a = Server::start(dir.path(), &pki, "server-a", 2, port_a).await;
    let b = Server::start(dir.path(), &pki, "server-b", 2, port_b).await;
    let lb = round_robin(vec![
        SocketAddr::from(([127, 0, 0, 1], port_a)),
        SocketAddr::from(([127, 0, 0, 1], port_b)),
    ])
    .await;
    let mut agent = Agent::start(settings(&lb.to_string(), &pki));
    let status = agent.wait_servers(&["server-a", "server-b"]).await;
    assert_eq!(status.server_count, 2);

    // Each server reaches the node.
    let (echo, _) = echo_server().await;
    for server in [&a, &b] {
        let mut t = dial_through(&server.uds, &echo.to_string()).await.unwrap();
        t.send(server.id.as_bytes()).await;
        assert_eq!(t.read(server.id.len()).await, server.id.as_bytes());
    }

    // One server goes away and comes back: the agent finds it again through the balancer
    // (meeting server-a again on the way, which it closes as a duplicate).
    drop(b);
    agent.wait_servers(&["server-a"]).await;
    let b = Server::start(dir.path(), &pki, "server-b", 2, port_b).await;
    agent.wait_servers(&["server-a", "server-b"]).await;
    assert_eq!(
        a.logged("\"Agent connected\"") + b.logged("\"Agent connected\""),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_tells_the_server_and_opens_no_streams() {
    let OneServer {
        dir,
        pki,
        port,
        server,
        mut agent,
    } = one_server("s1").await;

    agent.drain.send_replace(true);
    let status = agent.wait("draining", |s| s.draining).await;
    assert_eq!(status.servers.len(), 1, "the stream stays");
    // What a stopping agent waits on: DRAIN queued on its one stream, nothing open.
    agent
        .wait("DRAIN queued", |s| {
            s.drained == 1 && s.open_connections == 0
        })
        .await;
    poll("the server to mark the agent draining", || {
        (server.logged("marked backend as draining") == 1).then_some(())
    })
    .await;
    // Existing streams keep serving.
    let (echo, _) = echo_server().await;
    let mut t = dial(&server.uds, &echo.to_string()).await.unwrap();
    t.send(b"draining").await;
    assert_eq!(t.read(8).await, b"draining");
    agent
        .wait("one open connection", |s| s.open_connections == 1)
        .await;

    // Its server restarts: no new stream while draining. The agent would reconnect within
    // about a second (see the restart test), so three quiet seconds show it does not.
    drop(t);
    agent
        .wait("the connection closed", |s| s.open_connections == 0)
        .await;
    drop(server);
    agent.wait_servers(&[]).await;
    let server = Server::start(dir.path(), &pki, "s2", 1, port).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.status.borrow().servers.is_empty());
    assert_eq!(server.logged("\"Agent connected\""), 0, "{}", server.logs());

    // Undrained, it connects again.
    agent.drain.send_replace(false);
    agent.wait_servers(&["s2"]).await;
    assert!(!agent.status.borrow().draining);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changes() {
    init_logs();
    let dir = TempDir::new().unwrap();
    let pki = pki(dir.path());
    let port = free_port();
    let server = Server::start(dir.path(), &pki, "s1", 1, port).await;
    let base = settings(&format!("127.0.0.1:{port}"), &pki);
    let mut agent = Agent::start(base.clone());
    agent.wait_servers(&["s1"]).await;

    // A new token is for the next Connect: the stream stays. (Nothing is expected to
    // happen, so this watches a window about as long as a reconnect takes.)
    agent.settings.send_replace(Some(Settings {
        token: "rotated".into(),
        ..base.clone()
    }));
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(1500) {
        assert_eq!(server.logged("\"Agent connected\""), 1);
        assert_eq!(agent.status.borrow().servers.len(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new identity reconnects.
    agent.settings.send_replace(Some(Settings {
        node_name: "node-a-renamed".into(),
        token: "rotated".into(),
        ..base.clone()
    }));
    poll("a second Connect", || {
        (server.logged("\"Agent connected\"") == 2).then_some(())
    })
    .await;
    agent.wait_servers(&["s1"]).await;

    // No settings: no streams.
    agent.settings.send_replace(None);
    agent.wait_servers(&[]).await;
    poll("the server to see the agent go", || {
        (server.logged("\"Close backend of agent\"") == 2).then_some(())
    })
    .await;

    // A server certificate the CA does not vouch for: an error, reported and retried.
    let other = pki_in(&dir, "other");
    agent.settings.send_replace(Some(Settings {
        ca_pem: other.ca_pem.clone(),
        ..base.clone()
    }));
    let status = agent.wait("a TLS error", |s| s.last_error.is_some()).await;
    assert!(status.servers.is_empty());
    println!("untrusted server: {}", status.last_error.unwrap());

    // The sender gone: run returns.
    let Agent { settings, task, .. } = &mut agent;
    drop(std::mem::replace(settings, watch::channel(None).0));
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    drop(server);
}

#[tokio::test]
async fn reports_an_unreachable_server() {
    let dir = TempDir::new().unwrap();
    let pki = pki(dir.path());
    let mut agent = Agent::start(settings(&format!("127.0.0.1:{}", free_port()), &pki));
    let status = agent
        .wait("a connect error", |s| s.last_error.is_some())
        .await;
    assert!(status.servers.is_empty());
    let error = status.last_error.unwrap();
    assert!(error.contains("connect"), "{error}");
}
