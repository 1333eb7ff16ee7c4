//! Wire framing: `len: u32 BE | channel: u32 BE | kind: u8 | payload`, where `len` counts
//! the channel, kind and payload bytes.

use crate::message::Message;

/// Bytes before the payload: length, channel, kind.
pub const HEADER_LEN: usize = 9;

/// Upper bound on one frame's payload; a peer announcing more is broken or hostile.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

const KIND_CONTROL: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_EOF: u8 = 2;
const KIND_CREDIT: u8 = 3;

/// Which byte stream of a channel a data, eof or credit frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamId {
    /// Host to guest: a process's stdin, or the tar stream of a copy-in or layer unpack.
    Stdin = 0,
    /// Guest to host: a process's stdout, or the tar stream of a copy-out.
    Stdout = 1,
    /// Guest to host: a process's stderr.
    Stderr = 2,
}

impl StreamId {
    fn from_byte(b: u8) -> Result<Self, FrameError> {
        match b {
            0 => Ok(Self::Stdin),
            1 => Ok(Self::Stdout),
            2 => Ok(Self::Stderr),
            other => Err(FrameError::BadStream(other)),
        }
    }
}

/// The content of one frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A request, reply or event, JSON-encoded on the wire.
    Control(Message),
    /// Bulk bytes of one stream.
    Data { stream: StreamId, data: Vec<u8> },
    /// The sender will send no more bytes on this stream.
    Eof { stream: StreamId },
    /// The receiver consumed `bytes` of this stream; the sender may send that many more.
    Credit { stream: StreamId, bytes: u32 },
}

/// One frame: a body on a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub channel: u32,
    pub body: Body,
}

/// A frame that cannot be decoded. The connection is unusable after one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    TooLarge(usize),
    TooShort(usize),
    BadKind(u8),
    BadStream(u8),
    BadJson(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the {MAX_PAYLOAD} limit"),
            Self::TooShort(n) => write!(f, "frame of {n} bytes is shorter than its header"),
            Self::BadKind(k) => write!(f, "unknown frame kind {k}"),
            Self::BadStream(s) => write!(f, "unknown stream id {s}"),
            Self::BadJson(e) => write!(f, "malformed control message: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The fixed-size start of a frame, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub channel: u32,
    pub kind: u8,
    /// Payload bytes that follow the header.
    pub payload_len: usize,
}

impl FrameHeader {
    /// Decodes and bounds-checks a header; read exactly `payload_len` bytes next.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < HEADER_LEN - 4 {
            return Err(FrameError::TooShort(len));
        }
        let payload_len = len - (HEADER_LEN - 4);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(payload_len));
        }
        let channel = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        Ok(Self {
            channel,
            kind: buf[8],
            payload_len,
        })
    }
}

impl Frame {
    pub fn control(channel: u32, message: Message) -> Self {
        Self {
            channel,
            body: Body::Control(message),
        }
    }

    pub fn data(channel: u32, stream: StreamId, data: Vec<u8>) -> Self {
        Self {
            channel,
            body: Body::Data { stream, data },
        }
    }

    pub fn eof(channel: u32, stream: StreamId) -> Self {
        Self {
            channel,
            body: Body::Eof { stream },
        }
    }

    pub fn credit(channel: u32, stream: StreamId, bytes: u32) -> Self {
        Self {
            channel,
            body: Body::Credit { stream, bytes },
        }
    }

    /// Appends the wire form of this frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        let kind = match &self.body {
            Body::Control(msg) => {
                // Serializing our own plain data types cannot fail.
                serde_json::to_writer(&mut *out, msg).expect("protocol message serializes");
                KIND_CONTROL
            }
            Body::Data { stream, data } => {
                out.push(*stream as u8);
                out.extend_from_slice(data);
                KIND_DATA
            }
            Body::Eof { stream } => {
                out.push(*stream as u8);
                KIND_EOF
            }
            Body::Credit { stream, bytes } => {
                out.push(*stream as u8);
                out.extend_from_slice(&bytes.to_be_bytes());
                KIND_CREDIT
            }
        };
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&self.channel.to_be_bytes());
        out[start + 8] = kind;
    }

    /// The wire form of this frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Builds a frame from a decoded header and its payload.
    pub fn decode(header: FrameHeader, mut payload: Vec<u8>) -> Result<Self, FrameError> {
        let stream_of = |p: &[u8]| -> Result<StreamId, FrameError> {
            StreamId::from_byte(*p.first().ok_or(FrameError::TooShort(p.len()))?)
        };
        let body = match header.kind {
            KIND_CONTROL => Body::Control(
                serde_json::from_slice(&payload).map_err(|e| FrameError::BadJson(e.to_string()))?,
            ),
            KIND_DATA => {
                let stream = stream_of(&payload)?;
                payload.remove(0);
                Body::Data {
                    stream,
                    data: payload,
                }
            }
            KIND_EOF => Body::Eof {
                stream: stream_of(&payload)?,
            },
            KIND_CREDIT => {
                let stream = stream_of(&payload)?;
                let raw: [u8; 4] = payload
                    .get(1..5)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(FrameError::TooShort(payload.len()))?;
                Body::Credit {
                    stream,
                    bytes: u32::from_be_bytes(raw),
                }
            }
            other => return Err(FrameError::BadKind(other)),
        };
        Ok(Self {
            channel: header.channel,
            body,
        })
    }

    /// Reads one frame from a blocking reader; `Ok(None)` at a clean end of stream.
    pub fn read_from(r: &mut impl std::io::Read) -> std::io::Result<Option<Self>> {
        let mut head = [0u8; HEADER_LEN];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let header = FrameHeader::decode(&head).map_err(invalid_data)?;
        let mut payload = vec![0u8; header.payload_len];
        r.read_exact(&mut payload)?;
        Self::decode(header, payload)
            .map(Some)
            .map_err(invalid_data)
    }
}

fn invalid_data(e: FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ExecRequest, Message};

    fn round_trip(frame: Frame) {
        let bytes = frame.encode();
        let decoded = Frame::read_from(&mut bytes.as_slice()).unwrap().unwrap();
        assert_eq!(decoded, frame);
    }

    #[test]
    fn every_body_round_trips() {
        round_trip(Frame::control(0, Message::Ping));
        round_trip(Frame::control(
            7,
            Message::Exec(ExecRequest::new("sh", ["-c", "true"])),
        ));
        round_trip(Frame::data(3, StreamId::Stdout, b"hello".to_vec()));
        round_trip(Frame::data(3, StreamId::Stderr, Vec::new()));
        round_trip(Frame::eof(u32::MAX, StreamId::Stdin));
        round_trip(Frame::credit(9, StreamId::Stdout, 65536));
    }

    #[test]
    fn frames_concatenate_on_one_stream() {
        let mut wire = Vec::new();
        Frame::data(1, StreamId::Stdout, b"a".to_vec()).encode_into(&mut wire);
        Frame::eof(1, StreamId::Stdout).encode_into(&mut wire);
        let mut r = wire.as_slice();
        assert!(matches!(
            Frame::read_from(&mut r).unwrap().unwrap().body,
            Body::Data { .. }
        ));
        assert!(matches!(
            Frame::read_from(&mut r).unwrap().unwrap().body,
            Body::Eof { .. }
        ));
        assert!(Frame::read_from(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_and_malformed_frames_are_rejected() {
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 6).to_be_bytes());
        assert_eq!(
            FrameHeader::decode(&head),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
        head[..4].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(FrameHeader::decode(&head), Err(FrameError::TooShort(2)));

        let header = FrameHeader {
            channel: 1,
            kind: 9,
            payload_len: 0,
        };
        assert_eq!(Frame::decode(header, vec![]), Err(FrameError::BadKind(9)));
        let header = FrameHeader {
            channel: 1,
            kind: KIND_DATA,
            payload_len: 1,
        };
        assert_eq!(
            Frame::decode(header, vec![7]),
            Err(FrameError::BadStream(7))
        );
        let header = FrameHeader {
            channel: 1,
            kind: KIND_CREDIT,
            payload_len: 2,
        };
        assert!(matches!(
            Frame::decode(header, vec![1, 0]),
            Err(FrameError::TooShort(_))
        ));
        let header = FrameHeader {
            channel: 1,
            kind: KIND_CONTROL,
            payload_len: 3,
        };
        assert!(matches!(
            Frame::decode(header, b"{x}".to_vec()),
            Err(FrameError::BadJson(_))
        ));
    }

    #[test]
    fn truncated_payload_is_an_error_not_a_clean_end() {
        let mut bytes = Frame::data(1, StreamId::Stdout, b"hello".to_vec()).encode();
        bytes.truncate(bytes.len() - 2);
        assert!(Frame::read_from(&mut bytes.as_slice()).is_err());
    }

    /// Reads frames from `wire` until the end or the first error, as a peer would.
    fn read_all(wire: &[u8]) -> Vec<Frame> {
        let mut r = wire;
        let mut out = Vec::new();
        while let Ok(Some(frame)) = Frame::read_from(&mut r) {
            out.push(frame);
        }
        out
    }

    fn any_frame() -> impl proptest::strategy::Strategy<Value = Frame> {
        use proptest::prelude::*;
        let stream = prop_oneof![
            Just(StreamId::Stdin),
            Just(StreamId::Stdout),
            Just(StreamId::Stderr)
        ];
        let message = prop_oneof![
            Just(Message::Ping),
            Just(Message::Pong),
            Just(Message::Done),
            any::<i32>().prop_map(|signal| Message::Signal { signal }),
            any::<u32>().prop_map(|pid| Message::Started { pid }),
            ".{0,40}".prop_map(|path| Message::CopyOut { path }),
            (".{0,20}", proptest::collection::vec(".{0,20}", 0..4))
                .prop_map(|(p, a)| Message::Exec(ExecRequest::new(p, a))),
        ];
        prop_oneof![
            (any::<u32>(), message).prop_map(|(c, m)| Frame::control(c, m)),
            (
                any::<u32>(),
                stream.clone(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(c, s, d)| Frame::data(c, s, d)),
            (any::<u32>(), stream.clone()).prop_map(|(c, s)| Frame::eof(c, s)),
            (any::<u32>(), stream, any::<u32>()).prop_map(|(c, s, b)| Frame::credit(c, s, b)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let _ = read_all(&wire);
            if let Ok(head) = <[u8; HEADER_LEN]>::try_from(wire.get(..HEADER_LEN).unwrap_or(&[])) {
                if let Ok(header) = FrameHeader::decode(&head) {
                    proptest::prop_assert!(header.payload_len <= MAX_PAYLOAD);
                    let payload = wire[HEADER_LEN..].iter().copied().take(header.payload_len).collect();
                    let _ = Frame::decode(header, payload);
                }
            }
        }

        #[test]
        fn every_frame_round_trips(frames in proptest::collection::vec(any_frame(), 1..6)) {
            let mut wire = Vec::new();
            for frame in &frames {
                frame.encode_into(&mut wire);
            }
            proptest::prop_assert_eq!(read_all(&wire), frames);
        }

        #[test]
        fn mutated_streams_never_panic_nor_overread(
            frames in proptest::collection::vec(any_frame(), 1..6),
            flips in proptest::collection::vec((0usize..600, proptest::num::u8::ANY), 1..6),
            cut in 0usize..50,
        ) {
            let mut wire = Vec::new();
            for frame in &frames {
                frame.encode_into(&mut wire);
            }
            for (at, byte) in flips {
                if let Some(b) = wire.get_mut(at) {
                    *b = byte;
                }
            }
            wire.truncate(wire.len().saturating_sub(cut));
            // What decodes is bounded by the bytes there were: no frame is made up.
            let decoded = read_all(&wire);
            proptest::prop_assert!(decoded.len() <= wire.len() / HEADER_LEN);
            for frame in decoded {
                if let Body::Data { data, .. } = frame.body {
                    proptest::prop_assert!(data.len() < wire.len());
                }
            }
        }

        #[test]
        fn a_header_never_announces_more_than_the_cap(len in proptest::num::u32::ANY, channel in proptest::num::u32::ANY, kind in proptest::num::u8::ANY) {
            let mut head = [0u8; HEADER_LEN];
            head[..4].copy_from_slice(&len.to_be_bytes());
            head[4..8].copy_from_slice(&channel.to_be_bytes());
            head[8] = kind;
            match FrameHeader::decode(&head) {
                Ok(h) => {
                    proptest::prop_assert!(h.payload_len <= MAX_PAYLOAD);
                    proptest::prop_assert_eq!(h.payload_len + HEADER_LEN - 4, len as usize);
                    proptest::prop_assert_eq!(h.channel, channel);
                }
                Err(FrameError::TooLarge(n)) => proptest::prop_assert!(n > MAX_PAYLOAD),
                Err(FrameError::TooShort(n)) => proptest::prop_assert!(n < HEADER_LEN - 4),
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }
    }
}
