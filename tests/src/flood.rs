//! Pieces of the flooding agent (`sluice-flood`, run under `sluice run` by
//! `tests/tests/proxy_flood.rs`): HTTP/2 frames written by hand (a real client library refuses
//! to send the malformed sequences a flood needs: endless CONTINUATION frames, a stream reset
//! right after its HEADERS), a frame reader that only classifies what the server sent, the TLS
//! client configuration an agent in a sandbox uses, and percentiles.

use std::path::Path;
use std::sync::Arc;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// `CANCEL`, the error code of a client's RST_STREAM in the rapid-reset attack.
pub const CANCEL: u32 = 0x8;

/// The largest frame payload a peer must accept without a SETTINGS change.
pub const MAX_FRAME: usize = 16_384;

/// One frame: 9-byte header, then `payload` (at most 2^24 - 1 bytes; longer payloads are cut).
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(0xff_ffff);
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(0xff_ffff).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
    out
}

/// The client's opening: preface, SETTINGS (push off, a large window), and a connection
/// WINDOW_UPDATE so the server never waits on the flood to read responses.
pub fn client_opening() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    let mut settings = Vec::new();
    settings.extend_from_slice(&[0x00, 0x02, 0, 0, 0, 0]); // ENABLE_PUSH = 0
    settings.extend_from_slice(&[0x00, 0x04, 0x7f, 0xff, 0xff, 0xff]); // INITIAL_WINDOW_SIZE
    out.extend(frame(SETTINGS, 0, 0, &settings));
    out.extend(frame(WINDOW_UPDATE, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    out
}

/// An HPACK integer with an `prefix`-bit prefix; `first` holds the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// One header as an HPACK "literal without indexing, new name" (no Huffman): nothing enters the
/// dynamic table, so every block decodes the same whatever came before.
pub fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// A request's header block: the four pseudo-headers.
pub fn request_block(method: &str, authority: &str, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    hpack_literal(&mut out, ":method", method.as_bytes());
    hpack_literal(&mut out, ":scheme", b"https");
    hpack_literal(&mut out, ":authority", authority.as_bytes());
    hpack_literal(&mut out, ":path", path.as_bytes());
    out
}

/// `block` as HEADERS then CONTINUATION frames of at most [`MAX_FRAME`] bytes, END_HEADERS on
/// the last, END_STREAM on the HEADERS frame when `end_stream`.
pub fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + block.len() / MAX_FRAME * 9 + 18);
    let chunks: Vec<&[u8]> = if block.is_empty() { vec![&[][..]] } else { block.chunks(MAX_FRAME).collect() };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let mut flags = if i == last { END_HEADERS } else { 0 };
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        out.extend(frame(if i == 0 { HEADERS } else { CONTINUATION }, flags, stream, chunk));
    }
    out
}

/// What a server sent on an HTTP/2 connection, classified frame by frame.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    pub headers: u64,
    pub rst_streams: u64,
    /// SETTINGS frames without ACK (each needs an ACK from the client).
    pub settings_to_ack: u64,
    pub pings: Vec<[u8; 8]>,
    /// `(error code, last stream id, debug data)` of a GOAWAY.
    pub goaway: Option<(u32, u32, String)>,
}

/// Reads whole frames from the front of `buf` (consumed) into `seen`.
pub fn read_frames(buf: &mut Vec<u8>, seen: &mut Seen) {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + 9) {
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let Some(payload) = buf.get(at + 9..at + 9 + len) else { break };
        match kind {
            HEADERS => seen.headers += 1,
            RST_STREAM => seen.rst_streams += 1,
            SETTINGS if flags & ACK == 0 => seen.settings_to_ack += 1,
            PING if flags & ACK == 0 => {
                if let Ok(data) = <[u8; 8]>::try_from(payload) {
                    seen.pings.push(data);
                }
            }
            GOAWAY if payload.len() >= 8 => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                seen.goaway = Some((code, last, debug));
            }
            _ => {}
        }
        at += 9 + len;
    }
    buf.drain(..at);
}

/// The name of an HTTP/2 error code, for reports.
pub fn error_name(code: u32) -> String {
    match code {
        0x0 => "NO_ERROR".into(),
        0x1 => "PROTOCOL_ERROR".into(),
        0x2 => "INTERNAL_ERROR".into(),
        0x3 => "FLOW_CONTROL_ERROR".into(),
        0x6 => "FRAME_SIZE_ERROR".into(),
        0x7 => "REFUSED_STREAM".into(),
        0x8 => "CANCEL".into(),
        0x9 => "COMPRESSION_ERROR".into(),
        0xb => "ENHANCE_YOUR_CALM".into(),
        other => format!("0x{other:x}"),
    }
}

/// A rustls client configuration trusting the bundle a sandbox points `SSL_CERT_FILE` at (the
/// sluice CA is in it), offering `alpn`.
pub fn client_config(bundle: &Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(bundle).map_err(|e| format!("reading {}: {e}", bundle.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", bundle.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The `p`-th percentile (0–100, nearest rank) of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[u64], p: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * p as usize).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_layout() {
        let f = frame(RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
        assert_eq!(f, [0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8]);
    }

    #[test]
    fn hpack_integers_follow_rfc7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 10);
        assert_eq!(out, [10]);
        out.clear();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
        out.clear();
        hpack_int(&mut out, 0, 7, 127);
        assert_eq!(out, [127, 0]);
    }

    #[test]
    fn literal_header_is_rfc7541_c2_2() {
        // C.2.2 without indexing: ":path: /sample/path" with a literal name here.
        let mut out = Vec::new();
        hpack_literal(&mut out, "custom-key", b"custom-header");
        let mut want = vec![0x00, 0x0a];
        want.extend_from_slice(b"custom-key");
        want.push(0x0d);
        want.extend_from_slice(b"custom-header");
        assert_eq!(out, want);
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let block = vec![b'a'; MAX_FRAME * 2 + 5];
        let frames = header_frames(1, &block, true);
        let mut buf = frames.clone();
        let mut kinds = Vec::new();
        while buf.len() >= 9 {
            let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            kinds.push((buf[3], buf[4], len));
            buf.drain(..9 + len);
        }
        assert_eq!(
            kinds,
            vec![(HEADERS, END_STREAM, MAX_FRAME), (CONTINUATION, 0, MAX_FRAME), (CONTINUATION, END_HEADERS, 5)]
        );
    }

    #[test]
    fn reader_classifies_and_keeps_partial_frames() {
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0xbu32.to_be_bytes());
        goaway.extend_from_slice(b"too_many_continuations");
        let mut buf = frame(SETTINGS, 0, 0, &[]);
        buf.extend(frame(SETTINGS, ACK, 0, &[]));
        buf.extend(frame(HEADERS, END_HEADERS, 1, b"x"));
        buf.extend(frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        buf.extend(frame(GOAWAY, 0, 0, &goaway));
        let tail = frame(RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
        buf.extend_from_slice(&tail[..5]);
        let mut seen = Seen::default();
        read_frames(&mut buf, &mut seen);
        assert_eq!(seen.settings_to_ack, 1);
        assert_eq!(seen.headers, 1);
        assert_eq!(seen.pings, vec![[1, 2, 3, 4, 5, 6, 7, 8]]);
        assert_eq!(seen.goaway, Some((0xb, 5, "too_many_continuations".into())));
        assert_eq!(buf, tail[..5]);
        buf.extend_from_slice(&tail[5..]);
        read_frames(&mut buf, &mut seen);
        assert_eq!(seen.rst_streams, 1);
        assert!(buf.is_empty());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
