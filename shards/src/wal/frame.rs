//! The frame: how one record is laid out on disk, and nothing else.
//!
//! ```text
//! len u32 LE | crc32 u32 LE | kind u8 | lsn u64 LE | payload (len - 9 bytes)
//! ```
//! `len` counts `kind + lsn + payload`; the CRC (IEEE, `crc32fast`) covers the same bytes. A zero
//! `len` never starts a frame: it is the end-of-data marker left by preallocation.
//!
//! This module only encodes and decodes bytes: it knows nothing about segments, continuity or
//! files, and it must never panic on bytes read from disk.

use super::Lsn;

/// Bytes before the payload: `len` + `crc` + `kind` + `lsn`.
pub const FRAME_OVERHEAD: usize = 4 + 4 + 1 + 8;
/// Bytes covered by `len` besides the payload: `kind` + `lsn`.
const BODY_HEADER: usize = 1 + 8;

/// Appends one encoded frame to `buf`.
pub fn encode(buf: &mut Vec<u8>, kind: u8, lsn: Lsn, payload: &[u8]) {
    // Callers bound payloads by the segment size (itself < 4 GiB), so the cast cannot truncate.
    let len = (BODY_HEADER + payload.len()) as u32;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Encoded size of a frame carrying `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> usize {
    FRAME_OVERHEAD + payload_len
}

/// A frame that decoded and passed its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub lsn: Lsn,
    pub payload: &'a [u8],
    /// Total encoded size, header included.
    pub encoded_len: usize,
}

/// What sits at one offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame with a matching CRC.
    Frame(Frame<'a>),
    /// A zero `len`, or fewer than four bytes left: no frame was ever started here.
    End,
    /// Something that is not a valid frame: a torn write or corruption.
    Bad(BadFrame),
}

/// Why the bytes at an offset are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// `len` is below the minimum body size.
    LengthTooSmall(u32),
    /// `len` runs past the end of the segment.
    LengthPastEnd { len: u32, available: u64 },
    /// The header is cut by the end of the segment.
    TruncatedHeader,
    /// The CRC does not match.
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::LengthTooSmall(len) => {
                write!(f, "frame length {len} is below the minimum of 9")
            }
            BadFrame::LengthPastEnd { len, available } => write!(
                f,
                "frame length {len} runs past the end of the segment ({available} bytes left)"
            ),
            BadFrame::TruncatedHeader => write!(f, "frame header cut by the end of the segment"),
            BadFrame::Checksum { stored, computed } => write!(
                f,
                "crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        }
    }
}

/// Decodes whatever starts at `offset` of `bytes`.
pub fn decode(bytes: &[u8], offset: usize) -> Decoded<'_> {
    let rest = match bytes.get(offset..) {
        Some(rest) => rest,
        None => return Decoded::End,
    };
    if rest.len() < 4 {
        return Decoded::End;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if len == 0 {
        return Decoded::End;
    }
    if rest.len() < FRAME_OVERHEAD {
        return Decoded::Bad(BadFrame::TruncatedHeader);
    }
    if (len as usize) < BODY_HEADER {
        return Decoded::Bad(BadFrame::LengthTooSmall(len));
    }
    let available = (rest.len() - 8) as u64;
    if u64::from(len) > available {
        return Decoded::Bad(BadFrame::LengthPastEnd { len, available });
    }
    let stored = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let body = &rest[8..8 + len as usize];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Decoded::Bad(BadFrame::Checksum { stored, computed });
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&body[1..9]);
    Decoded::Frame(Frame {
        kind: body[0],
        lsn: u64::from_le_bytes(lsn),
        payload: &body[9..],
        encoded_len: 8 + len as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 42, b"hello");
        encode(&mut buf, 1, 43, b"");
        assert_eq!(buf.len(), frame_len(5) + frame_len(0));
        let Decoded::Frame(a) = decode(&buf, 0) else {
            panic!("first frame")
        };
        assert_eq!((a.kind, a.lsn, a.payload), (7, 42, &b"hello"[..]));
        let Decoded::Frame(b) = decode(&buf, a.encoded_len) else {
            panic!("second frame")
        };
        assert_eq!((b.kind, b.lsn, b.payload), (1, 43, &b""[..]));
        assert_eq!(decode(&buf, a.encoded_len + b.encoded_len), Decoded::End);
    }

    #[test]
    fn layout_is_the_documented_one() {
        let mut buf = Vec::new();
        encode(&mut buf, 0xAB, 0x0102_0304_0506_0708, b"xy");
        assert_eq!(&buf[0..4], &11u32.to_le_bytes());
        assert_eq!(&buf[4..8], &crc32fast::hash(&buf[8..]).to_le_bytes());
        assert_eq!(buf[8], 0xAB);
        assert_eq!(&buf[9..17], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&buf[17..], b"xy");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 3, 9, b"payload bytes");
        for bit in 0..buf.len() * 8 {
            let mut flipped = buf.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            match decode(&flipped, 0) {
                Decoded::Frame(f) => panic!("bit {bit} flipped but decoded {f:?}"),
                Decoded::End | Decoded::Bad(_) => {}
            }
        }
    }

    #[test]
    fn zeros_and_short_tails_are_the_end() {
        assert_eq!(decode(&[0; 64], 0), Decoded::End);
        assert_eq!(decode(&[1, 2, 3], 0), Decoded::End);
        assert_eq!(decode(&[], 5), Decoded::End);
        assert!(matches!(
            decode(&[20, 0, 0, 0, 1, 1], 0),
            Decoded::Bad(BadFrame::TruncatedHeader)
        ));
    }
}
