//! The host<->guest protocol of boxlite.
//!
//! One byte stream (a virtio-serial port in the guest, a unix socket on the host) carries
//! many independent *channels*. The host opens a channel by sending a request [`Message`] on
//! a channel id it has not used before; every later frame of that request uses the same id.
//! Channel 0 belongs to the connection itself (the guest's [`Message::Ready`]).
//!
//! Bulk bytes (stdio, tar streams) travel as [`Body::Data`] frames, never as JSON, and are
//! flow-controlled per stream with credits: a sender may have at most [`STREAM_WINDOW`] bytes
//! unacknowledged; the receiver returns [`Body::Credit`] as its consumer takes the bytes. A slow
//! reader of one exec therefore never stalls the others sharing the connection.

mod frame;
pub mod message;
pub mod net;

pub use frame::{Body, Frame, FrameError, FrameHeader, StreamId, HEADER_LEN, MAX_PAYLOAD};
pub use message::{
    ErrorKind, ExecRequest, ExecTrace, ExitStatus, GuestLimits, GuestMetrics, GuestSandbox,
    GuestSetup, GuestVolume, Message, NetworkStats, SetupAfter, TtySize, GUEST_PORT_NAME,
    PROTOCOL_VERSION, VOLUME_ERROR_PREFIX,
};
pub use net::GuestNetwork;

/// Bytes a sender may have in flight on one stream before it must wait for credit.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// The largest data chunk a sender puts in one frame.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
