//! TFTP sockets: requests on the well-known port, one task and one ephemeral socket per
//! transfer (RFC 1350's transfer IDs), bounded in number and duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};

use super::{
    Admission, ErrorCode, Files, Packet, Params, Step, Transfer, data_packet, error_packet,
};
use crate::metrics::Metrics;

/// Bounds on the work one server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent transfers; more get a TFTP error.
    pub max_transfers: usize,
    /// Longest a single transfer may take.
    pub max_duration: Duration,
}

/// Serves requests arriving on `sock` until `shutdown` flips.
pub async fn serve(
    sock: UdpSocket,
    files: Arc<Files>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_transfers));
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("tftp recv: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        match super::admit(&buf[..n], &files) {
            Admission::Refuse { packet, reason } => {
                tracing::info!(%peer, reason, "tftp request refused");
                metrics.tftp("refused");
                let _ = sock.send_to(&packet, peer).await;
            }
            Admission::Serve {
                file,
                data,
                params,
                oack,
            } => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    metrics.tftp("refused_busy");
                    let _ = sock
                        .send_to(&error_packet(ErrorCode::Undefined, "server busy"), peer)
                        .await;
                    continue;
                };
                let local = sock.local_addr().map(|a| a.ip());
                let metrics = metrics.clone();
                // One blocking thread per transfer (at most `max_transfers`): a lock-step
                // transfer is a chain of round trips, and a thread blocked in recv() wakes
                // straight from the kernel, without an executor hop per block.
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let bind =
                        SocketAddr::new(local.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()), 0);
                    let result = std::net::UdpSocket::bind(bind).and_then(|s| {
                        s.connect(peer)?;
                        run_transfer(&s, &data, params, oack, limits.max_duration, &metrics)
                    });
                    match result {
                        Ok(()) => {
                            metrics.tftp("served");
                            tracing::info!(%peer, %file, bytes = data.len(), blksize = params.blksize, windowsize = params.windowsize, "tftp transfer complete");
                        }
                        Err(e) => {
                            metrics.tftp("aborted");
                            tracing::info!(%peer, %file, "tftp transfer ended early: {e}");
                        }
                    }
                });
            }
        }
    }
}

/// Drives one transfer to completion on a connected socket (blocking).
fn run_transfer(
    s: &std::net::UdpSocket,
    data: &[u8],
    params: Params,
    oack: Option<Vec<u8>>,
    max_duration: Duration,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let give_up = Instant::now() + max_duration;
    let mut t = Transfer::new(data.len() as u64, &params, oack.is_some());
    let mut step = t.start();
    let mut pkt = Vec::with_capacity(params.blksize + 4);
    let mut rbuf = vec![0u8; 1024];
    let mut deadline = Instant::now();
    let mut read_timeout = None;
    loop {
        let waiting = matches!(step, Step::Wait);
        match step {
            Step::Oack => {
                s.send(oack.as_deref().unwrap_or_default())?;
                deadline = Instant::now() + params.timeout;
            }
            Step::Blocks(r) => {
                for i in r {
                    let range = Transfer::block_range(i, params.blksize, data.len());
                    let len = range.len();
                    data_packet(Transfer::wire_block(i), &data[range], &mut pkt);
                    s.send(&pkt)?;
                    metrics.tftp_bytes.inc_by(len as u64);
                }
                deadline = Instant::now() + params.timeout;
            }
            Step::Wait => {}
            Step::Done => return Ok(()),
            Step::Abort => {
                let _ = s.send(&error_packet(ErrorCode::Undefined, "timed out"));
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped acknowledging",
                ));
            }
        }
        let now = Instant::now();
        if now > give_up {
            let _ = s.send(&error_packet(
                ErrorCode::Undefined,
                "transfer took too long",
            ));
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "transfer exceeded its time limit",
            ));
        }
        // Right after sending, wait a full timeout (set once, not per block: a setsockopt per
        // round trip is measurable); after a stale ACK, only what is left of it.
        let wait = if waiting {
            deadline.saturating_duration_since(now)
        } else {
            params.timeout
        };
        if wait.is_zero() {
            step = t.on_timeout();
            continue;
        }
        if read_timeout != Some(wait) {
            s.set_read_timeout(Some(wait))?;
            read_timeout = Some(wait);
        }
        step = match s.recv(&mut rbuf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                t.on_timeout()
            }
            // ICMP port unreachable from a gone client surfaces as ECONNREFUSED.
            Err(e) => return Err(e),
            Ok(n) => match Packet::parse(&rbuf[..n]) {
                Ok(Packet::Ack(b)) => t.on_ack(b),
                // UEFI PXE asks for tsize, then aborts (code 8) and re-requests: normal.
                Ok(Packet::Error { code, message }) => {
                    return Err(std::io::Error::other(format!(
                        "client sent error {code}: {message}"
                    )));
                }
                _ => Step::Wait,
            },
        };
    }
}
