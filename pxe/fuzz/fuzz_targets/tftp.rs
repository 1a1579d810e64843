//! Any datagram into the TFTP request handler, then the rest of the input as a stream of
//! ACKs/timeouts into the transfer state machine: never a panic, never a block outside the
//! file or beyond the window.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_pxe::tftp::{self, Admission, Files, Packet, Step, Transfer};

fuzz_target!(|data: &[u8]| {
    let (head, tail) = data.split_at(data.len().min(512));
    let _ = Packet::parse(head);
    let mut files = Files::default();
    files.insert("undionly.kpxe", Bytes::from(vec![0u8; 5000]));
    files.insert("ipxe.efi", Bytes::new());
    match tftp::admit(head, &files) {
        Admission::Refuse { packet, .. } => {
            assert!(matches!(Packet::parse(&packet), Ok(Packet::Error { .. })));
        }
        Admission::Serve {
            data: file,
            params,
            oack,
            file: name,
        } => {
            assert!(tftp::check_file_name(&name).is_ok());
            assert!((tftp::MIN_BLKSIZE..=tftp::MAX_BLKSIZE).contains(&params.blksize));
            assert!((1..=tftp::MAX_WINDOW).contains(&params.windowsize));
            let mut t = Transfer::new(file.len() as u64, &params, oack.is_some());
            let total = t.total_blocks();
            let mut step = t.start();
            for pair in tail.chunks(2) {
                if let Step::Blocks(r) = &step {
                    assert!(*r.start() >= 1 && *r.end() <= total && r.start() <= r.end());
                    assert!(r.end() - r.start() < u64::from(params.windowsize));
                    let br = Transfer::block_range(*r.end(), params.blksize, file.len());
                    assert!(br.end <= file.len());
                }
                if matches!(step, Step::Done | Step::Abort) {
                    break;
                }
                step = if pair.len() == 2 {
                    t.on_ack(u16::from_be_bytes([pair[0], pair[1]]))
                } else {
                    t.on_timeout()
                };
            }
        }
    }
});
