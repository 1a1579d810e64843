//! TFTP, read-only: RFC 1350 with option negotiation (RFC 2347), blksize (RFC 2348), tsize and
//! timeout (RFC 2349) and windowsize (RFC 7440). Packet parsing, request admission and the
//! per-transfer state machine are pure; [`server`] does the sockets.
//!
//! Only files registered at start-up (the iPXE binaries and explicit extras) are served, from
//! memory: there is no directory to escape from, and names with `..`, a leading `/`, a
//! backslash or control characters are refused with a TFTP error before any lookup.

pub mod server;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};

/// Largest blksize we accept (RFC 2348's limit is 65464; an Ethernet frame's payload is the
/// practical one, but clients on loopback may ask for more).
pub const MAX_BLKSIZE: usize = 65464;
/// Smallest legal blksize.
pub const MIN_BLKSIZE: usize = 8;
/// Largest windowsize we agree to: bounds the burst one client can cause.
pub const MAX_WINDOW: u16 = 64;
/// Resends of one window before a transfer is abandoned.
pub const MAX_RETRIES: u32 = 5;

/// TFTP error codes (RFC 1350 §5, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see message.
    Undefined = 0,
    /// File not found.
    NotFound = 1,
    /// Access violation.
    AccessViolation = 2,
    /// Illegal TFTP operation.
    IllegalOperation = 4,
    /// Unknown transfer ID.
    UnknownTid = 5,
    /// Option negotiation refused.
    BadOption = 8,
}

/// A parsed TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Read request: file, mode and options (lower-cased names).
    Rrq {
        /// Requested file name as sent.
        file: String,
        /// Transfer mode, lower-cased.
        mode: String,
        /// Options, names lower-cased.
        options: BTreeMap<String, String>,
    },
    /// Write request (always refused).
    Wrq,
    /// A data block.
    Data {
        /// Block number.
        block: u16,
        /// Payload.
        data: Bytes,
    },
    /// Acknowledgement of a block (0 acknowledges an OACK).
    Ack(u16),
    /// An error from the peer.
    Error {
        /// The code.
        code: u16,
        /// The message.
        message: String,
    },
    /// Option acknowledgement.
    Oack(BTreeMap<String, String>),
}

fn cstrings(mut b: &[u8]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| Error::TftpPacket("string not NUL-terminated".into()))?;
        let s = std::str::from_utf8(&b[..end])
            .map_err(|_| Error::TftpPacket("string is not UTF-8".into()))?;
        out.push(s.to_string());
        b = &b[end + 1..];
    }
    Ok(out)
}

fn options_from(strings: &[String]) -> Result<BTreeMap<String, String>> {
    if !strings.len().is_multiple_of(2) {
        return Err(Error::TftpPacket("option without a value".into()));
    }
    Ok(strings
        .chunks(2)
        .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].clone()))
        .collect())
}

impl Packet {
    /// Parses one datagram.
    pub fn parse(b: &[u8]) -> Result<Packet> {
        if b.len() < 2 {
            return Err(Error::TftpPacket("shorter than an opcode".into()));
        }
        let op = u16::from_be_bytes([b[0], b[1]]);
        let body = &b[2..];
        let u16_at = |i: usize| -> Result<u16> {
            body.get(i..i + 2)
                .map(|s| u16::from_be_bytes([s[0], s[1]]))
                .ok_or_else(|| Error::TftpPacket("truncated".into()))
        };
        match op {
            1 => {
                let s = cstrings(body)?;
                if s.len() < 2 {
                    return Err(Error::TftpPacket("RRQ without file name and mode".into()));
                }
                Ok(Packet::Rrq {
                    file: s[0].clone(),
                    mode: s[1].to_ascii_lowercase(),
                    options: options_from(&s[2..])?,
                })
            }
            2 => Ok(Packet::Wrq),
            3 => Ok(Packet::Data {
                block: u16_at(0)?,
                data: Bytes::copy_from_slice(&body[2..]),
            }),
            4 => {
                if body.len() != 2 {
                    return Err(Error::TftpPacket("ACK is not 4 bytes".into()));
                }
                Ok(Packet::Ack(u16_at(0)?))
            }
            5 => {
                let code = u16_at(0)?;
                let s = cstrings(&body[2..])?;
                Ok(Packet::Error {
                    code,
                    message: s.into_iter().next().unwrap_or_default(),
                })
            }
            6 => Ok(Packet::Oack(options_from(&cstrings(body)?)?)),
            other => Err(Error::TftpPacket(format!("unknown opcode {other}"))),
        }
    }
}

/// Encodes an ERROR packet.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + message.len());
    v.extend_from_slice(&5u16.to_be_bytes());
    v.extend_from_slice(&(code as u16).to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v.push(0);
    v
}

/// Encodes an OACK packet.
pub fn oack_packet(options: &BTreeMap<String, String>) -> Vec<u8> {
    let mut v = vec![0, 6];
    for (k, val) in options {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Encodes a DATA packet header + payload into `out`.
pub fn data_packet(block: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&3u16.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Encodes an ACK (for clients in tests and benchmarks).
pub fn ack_packet(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// Encodes an RRQ (for clients in tests and benchmarks).
pub fn rrq_packet(file: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![0, 1];
    for s in [file, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(k, val)| [*k, *val]))
    {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    v
}

/// The files we serve, by name, held in memory.
#[derive(Debug, Clone, Default)]
pub struct Files(BTreeMap<String, Bytes>);

impl Files {
    /// Registers `name` (a plain file name) with its contents.
    pub fn insert(&mut self, name: &str, data: Bytes) {
        self.0.insert(name.to_string(), data);
    }

    /// The contents of `name`, if registered.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0.get(name)
    }
}

/// Negotiated transfer parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Bytes per DATA block.
    pub blksize: usize,
    /// Blocks sent before waiting for an ACK.
    pub windowsize: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            blksize: 512,
            windowsize: 1,
            timeout: Duration::from_secs(1),
        }
    }
}

/// What to do with an incoming request on port 69.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Refuse with this ERROR packet.
    Refuse {
        /// The packet to send.
        packet: Vec<u8>,
        /// Why, for logs and metrics.
        reason: &'static str,
    },
    /// Serve `file` with `params`; send `oack` first if present (and wait for ACK 0).
    Serve {
        /// The registered file name.
        file: String,
        /// Its contents.
        data: Bytes,
        /// Negotiated parameters.
        params: Params,
        /// The OACK to send, when the client asked for options we accept.
        oack: Option<Vec<u8>>,
    },
}

/// Checks a requested file name: a plain name, no directories, nothing odd.
pub fn check_file_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty file name");
    }
    if name.starts_with('/') {
        return Err("absolute path");
    }
    if name.contains('\\') || name.split('/').any(|c| c == ".." || c == ".") {
        return Err("path traversal");
    }
    if name.contains('/') {
        return Err("directories are not served");
    }
    if name.len() > 255 || name.chars().any(|c| c.is_control()) {
        return Err("bad characters in file name");
    }
    Ok(())
}

/// Decides on a datagram arriving at port 69: parse, validate, negotiate.
pub fn admit(bytes: &[u8], files: &Files) -> Admission {
    let refuse = |code, reason: &'static str| Admission::Refuse {
        packet: error_packet(code, reason),
        reason,
    };
    let (file, mode, options) = match Packet::parse(bytes) {
        Ok(Packet::Rrq {
            file,
            mode,
            options,
        }) => (file, mode, options),
        Ok(Packet::Wrq) => return refuse(ErrorCode::AccessViolation, "read-only server"),
        Ok(_) => return refuse(ErrorCode::IllegalOperation, "expected a read request"),
        Err(_) => return refuse(ErrorCode::IllegalOperation, "malformed request"),
    };
    if mode != "octet" {
        return refuse(ErrorCode::IllegalOperation, "only octet mode is served");
    }
    if let Err(reason) = check_file_name(&file) {
        return refuse(ErrorCode::AccessViolation, reason);
    }
    let Some(data) = files.get(&file) else {
        return refuse(ErrorCode::NotFound, "file not found");
    };
    let mut params = Params::default();
    let mut ack = BTreeMap::new();
    for (k, v) in &options {
        let n: Option<u64> = v.parse().ok();
        match (k.as_str(), n) {
            ("blksize", Some(n)) if n as usize >= MIN_BLKSIZE => {
                params.blksize = (n as usize).min(MAX_BLKSIZE);
                ack.insert(k.clone(), params.blksize.to_string());
            }
            ("tsize", Some(_)) => {
                ack.insert(k.clone(), data.len().to_string());
            }
            ("timeout", Some(n)) if (1..=255).contains(&n) => {
                params.timeout = Duration::from_secs(n);
                ack.insert(k.clone(), n.to_string());
            }
            ("windowsize", Some(n)) if n >= 1 => {
                params.windowsize = (n.min(u64::from(MAX_WINDOW))) as u16;
                ack.insert(k.clone(), params.windowsize.to_string());
            }
            // RFC 2347: options we do not understand or whose values we reject are left
            // out of the OACK.
            _ => {}
        }
    }
    Admission::Serve {
        file,
        data: data.clone(),
        params,
        oack: (!ack.is_empty()).then(|| oack_packet(&ack)),
    }
}

/// What the transfer wants sent next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the OACK again.
    Oack,
    /// Send these blocks (1-based absolute indices).
    Blocks(std::ops::RangeInclusive<u64>),
    /// Nothing to send; keep waiting.
    Wait,
    /// The last block was acknowledged.
    Done,
    /// Give up (too many retries).
    Abort,
}

/// One outgoing transfer's state: a sliding window over the file's blocks.
///
/// Each ACK slides the window (so clients that acknowledge every block keep `windowsize`
/// blocks in flight without duplicates); a repeated ACK with blocks outstanding means the
/// receiver saw a gap (RFC 7440 §4) and rolls the window back to the block after it. With a
/// window of one, duplicate ACKs are ignored (RFC 1123's Sorcerer's Apprentice rule).
#[derive(Debug, Clone)]
pub struct Transfer {
    total_blocks: u64,
    window: u64,
    /// Highest absolute block acknowledged (0 = none / OACK acknowledged).
    acked: u64,
    /// Highest absolute block sent.
    sent_to: u64,
    oack_pending: bool,
    retries: u32,
}

impl Transfer {
    /// A transfer of `size` bytes. With `oack`, block sending waits for ACK 0.
    pub fn new(size: u64, params: &Params, oack: bool) -> Transfer {
        Transfer {
            // A final short (possibly empty) block always ends the transfer.
            total_blocks: size / params.blksize as u64 + 1,
            window: u64::from(params.windowsize.max(1)),
            acked: 0,
            sent_to: 0,
            oack_pending: oack,
            retries: 0,
        }
    }

    /// Number of DATA blocks the transfer has.
    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    /// The byte range of absolute block `index` (1-based) in a file of `size` bytes.
    pub fn block_range(index: u64, blksize: usize, size: usize) -> std::ops::Range<usize> {
        let start = ((index - 1) as usize).saturating_mul(blksize).min(size);
        start..(start + blksize).min(size)
    }

    /// The wire block number of an absolute index (wraps to 0 after 65535, as common
    /// clients expect).
    pub fn wire_block(index: u64) -> u16 {
        (index & 0xffff) as u16
    }

    /// Sends from `first` up to a full window past `acked`.
    fn send_from(&mut self, first: u64) -> Step {
        let last = (self.acked + self.window).min(self.total_blocks);
        if first > last {
            return Step::Wait;
        }
        self.sent_to = last;
        Step::Blocks(first..=last)
    }

    /// The first thing to send.
    pub fn start(&mut self) -> Step {
        if self.oack_pending {
            Step::Oack
        } else {
            self.send_from(self.acked + 1)
        }
    }

    /// An ACK arrived.
    pub fn on_ack(&mut self, block: u16) -> Step {
        if self.oack_pending {
            if block == 0 {
                self.oack_pending = false;
                self.retries = 0;
                return self.send_from(1);
            }
            return Step::Wait;
        }
        // Map the 16-bit number to an absolute block in [acked, sent_to].
        let Some(idx) = (self.acked..=self.sent_to).find(|i| Self::wire_block(*i) == block) else {
            return Step::Wait;
        };
        if idx == self.acked {
            if self.window > 1 && self.sent_to > self.acked {
                return self.send_from(self.acked + 1);
            }
            return Step::Wait;
        }
        self.acked = idx;
        self.retries = 0;
        if idx == self.total_blocks {
            return Step::Done;
        }
        self.send_from(self.sent_to + 1)
    }

    /// The retransmission timer fired.
    pub fn on_timeout(&mut self) -> Step {
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            return Step::Abort;
        }
        self.start()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Files {
        let mut f = Files::default();
        f.insert("undionly.kpxe", Bytes::from(vec![7u8; 1300]));
        f
    }

    #[test]
    fn packet_round_trips_and_errors() {
        let rrq = rrq_packet("undionly.kpxe", &[("blksize", "1468"), ("TSIZE", "0")]);
        match Packet::parse(&rrq).unwrap() {
            Packet::Rrq {
                file,
                mode,
                options,
            } => {
                assert_eq!(file, "undionly.kpxe");
                assert_eq!(mode, "octet");
                assert_eq!(options["tsize"], "0");
                assert_eq!(options["blksize"], "1468");
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(Packet::parse(&ack_packet(513)).unwrap(), Packet::Ack(513));
        assert_eq!(
            Packet::parse(&error_packet(ErrorCode::NotFound, "x")).unwrap(),
            Packet::Error {
                code: 1,
                message: "x".into()
            }
        );
        for bad in [
            &b""[..],
            b"\x00",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01file\x00octet\x00blksize\x00",
            b"\x00\x04\x00",
            b"\x00\x04\x00\x01\x00",
            b"\x00\x09",
            b"\x00\x01\xff\xfe\x00octet\x00",
        ] {
            assert!(Packet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admission_table() {
        let f = files();
        let refused = |bytes: &[u8], code: u16| match admit(bytes, &f) {
            Admission::Refuse { packet, .. } => {
                assert_eq!(&packet[..2], &[0, 5]);
                assert_eq!(
                    u16::from_be_bytes([packet[2], packet[3]]),
                    code,
                    "{bytes:?}"
                );
            }
            a => panic!("{bytes:?} admitted: {a:?}"),
        };
        refused(&rrq_packet("../undionly.kpxe", &[]), 2);
        refused(&rrq_packet("/undionly.kpxe", &[]), 2);
        refused(&rrq_packet("/etc/passwd", &[]), 2);
        refused(&rrq_packet("a/../../etc/passwd", &[]), 2);
        refused(&rrq_packet("..\\..\\boot.ini", &[]), 2);
        refused(&rrq_packet("pxelinux.cfg/default", &[]), 2);
        refused(&rrq_packet("nope.efi", &[]), 1);
        refused(b"\x00\x01undionly.kpxe\x00netascii\x00", 4);
        refused(b"\x00\x02x\x00octet\x00", 2);
        refused(&ack_packet(1), 4);
        refused(b"\x00\x01", 4);

        match admit(&rrq_packet("undionly.kpxe", &[]), &f) {
            Admission::Serve { params, oack, .. } => {
                assert_eq!(params, Params::default());
                assert_eq!(oack, None);
            }
            a => panic!("{a:?}"),
        }
        let rrq = rrq_packet(
            "undionly.kpxe",
            &[
                ("blksize", "100000"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "1000"),
                ("multicast", ""),
            ],
        );
        match admit(&rrq, &f) {
            Admission::Serve { params, oack, .. } => {
                assert_eq!(params.blksize, MAX_BLKSIZE);
                assert_eq!(params.windowsize, MAX_WINDOW);
                assert_eq!(params.timeout, Duration::from_secs(3));
                let Packet::Oack(o) = Packet::parse(&oack.unwrap()).unwrap() else {
                    panic!()
                };
                assert_eq!(o["tsize"], "1300");
                assert_eq!(o["blksize"], MAX_BLKSIZE.to_string());
                assert!(!o.contains_key("multicast"), "unknown options are dropped");
            }
            a => panic!("{a:?}"),
        }
        // Values out of range are ignored, not fatal.
        match admit(
            &rrq_packet("undionly.kpxe", &[("blksize", "4"), ("timeout", "0")]),
            &f,
        ) {
            Admission::Serve { params, oack, .. } => {
                assert_eq!(params, Params::default());
                assert_eq!(oack, None);
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn lockstep_transfer() {
        let p = Params::default();
        // 1300 bytes at 512: blocks of 512, 512, 276.
        let mut t = Transfer::new(1300, &p, false);
        assert_eq!(t.total_blocks(), 3);
        assert_eq!(t.start(), Step::Blocks(1..=1));
        assert_eq!(t.on_ack(1), Step::Blocks(2..=2));
        assert_eq!(t.on_ack(1), Step::Wait, "duplicate ACK ignored");
        assert_eq!(t.on_timeout(), Step::Blocks(2..=2));
        assert_eq!(t.on_ack(2), Step::Blocks(3..=3));
        assert_eq!(t.on_ack(3), Step::Done);
        assert_eq!(Transfer::block_range(3, 512, 1300), 1024..1300);
        // Exact multiple: a final empty block.
        let t = Transfer::new(1024, &p, false);
        assert_eq!(t.total_blocks(), 3);
        let mut t = Transfer::new(10, &p, false);
        assert_eq!(t.start(), Step::Blocks(1..=1));
        assert_eq!(t.on_ack(0), Step::Wait, "ACK 0 without OACK");
        assert_eq!(Transfer::block_range(3, 512, 1024), 1024..1024);
    }

    #[test]
    fn windowed_transfer_with_oack_and_loss() {
        let p = Params {
            blksize: 10,
            windowsize: 4,
            ..Params::default()
        };
        let mut t = Transfer::new(95, &p, true); // 10 blocks
        assert_eq!(t.start(), Step::Oack);
        assert_eq!(t.on_ack(5), Step::Wait);
        assert_eq!(t.on_ack(0), Step::Blocks(1..=4));
        assert_eq!(t.on_ack(2), Step::Blocks(5..=6), "window slides");
        assert_eq!(t.on_ack(3), Step::Blocks(7..=7));
        assert_eq!(
            t.on_ack(3),
            Step::Blocks(4..=7),
            "repeated ACK: gap, roll back"
        );
        assert_eq!(t.on_ack(7), Step::Blocks(8..=10));
        assert_eq!(t.on_ack(9), Step::Wait, "nothing left to send");
        assert_eq!(t.on_timeout(), Step::Blocks(10..=10));
        assert_eq!(t.on_ack(10), Step::Done);
    }

    #[test]
    fn retries_are_bounded_and_blocks_wrap() {
        let mut t = Transfer::new(10, &Params::default(), false);
        assert_eq!(t.start(), Step::Blocks(1..=1));
        for _ in 0..MAX_RETRIES {
            assert_eq!(t.on_timeout(), Step::Blocks(1..=1));
        }
        assert_eq!(t.on_timeout(), Step::Abort);
        assert_eq!(Transfer::wire_block(65535), 65535);
        assert_eq!(Transfer::wire_block(65536), 0);
        let p = Params {
            blksize: 8,
            ..Params::default()
        };
        let mut t = Transfer::new(8 * 70000, &p, false);
        t.start();
        for i in 1..=65536u64 {
            assert!(
                matches!(t.on_ack(Transfer::wire_block(i)), Step::Blocks(_)),
                "{i}"
            );
        }
        assert_eq!(t.on_ack(1), Step::Blocks(65538..=65538));
    }
}
