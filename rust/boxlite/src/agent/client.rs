//! A multiplexed connection to one guest agent.
//!
//! A reader task decodes frames and routes them to per-channel queues; a writer task batches
//! outgoing frames onto the socket. The guest is untrusted: anything the protocol does not allow
//! ends the connection (a malformed or oversized frame, a frame on a channel that was never
//! opened, more data than its credit allows, a flood of control messages on one channel); a late
//! frame for a channel we already finished is dropped.
//!
//! Nothing here waits on the guest without a limit unless the caller asks for it: requests give
//! up after [`REQUEST_TIMEOUT`] without a sign of progress, and a request too large for one frame
//! is refused before anything is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxlite_proto::{
    Body, Frame, FrameHeader, Message, StreamId, HEADER_LEN, MAX_DATA_CHUNK, MAX_PAYLOAD,
    STREAM_WINDOW,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::error::{BoxliteError, BoxliteResult};

/// What arrives on a channel.
#[derive(Debug)]
pub(crate) enum ChannelEvent {
    Message(Message),
    Data(StreamId, Vec<u8>),
    Eof(StreamId),
}

/// How long a request may go without any sign of progress from the guest (a reply, an event,
/// output, or credit for our input) before the host gives up on it: the default deadline of every
/// host call that has no deadline of its own (`metrics`, `Configure`, starting a command, each
/// step of a copy). Documented in docs/python.md.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Control messages and end-of-stream marks one channel may carry. A request has at most a
/// handful (`Started`, `Exited`, two `Eof`s); a guest sending more is flooding us.
const CONTROL_EVENTS_PER_CHANNEL: u32 = 64;

#[derive(Debug)]
struct Sink {
    events: mpsc::UnboundedSender<ChannelEvent>,
    flow: Arc<Flow>,
}

/// Flow-control state of one channel, shared by the reader task and the channel's users.
#[derive(Debug)]
struct Flow {
    /// Credit the guest gave us for our stdin bytes.
    stdin_window: Semaphore,
    /// Bytes received per guest stream, and bytes the guest may send in all (the window plus
    /// every credit we gave): a guest that sends more than it was allowed is cut off, however
    /// fast we read.
    received: [AtomicU64; 3],
    allowed: [AtomicU64; 3],
    /// Control messages and end-of-stream marks received so far.
    control_events: AtomicU32,
}

#[derive(Debug)]
struct Shared {
    writer: mpsc::UnboundedSender<Frame>,
    /// Set by [`AgentClient::quiesce`]: nothing more may be sent.
    sealed: AtomicBool,
    channels: Mutex<HashMap<u32, Sink>>,
    next_channel: AtomicU32,
    closed: watch::Sender<Option<String>>,
}

impl Shared {
    fn close(&self, reason: String) {
        self.closed.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
        // Dropping every sink ends every channel's event stream; closing the credit semaphores
        // wakes every sender waiting for a window that will never open again.
        if let Ok(mut channels) = self.channels.lock() {
            for sink in channels.values() {
                sink.flow.stdin_window.close();
            }
            channels.clear();
        }
    }

    fn send(&self, frame: Frame) -> BoxliteResult<()> {
        if self.sealed.load(Ordering::SeqCst) {
            return Err(BoxliteError::connection_lost("the box is being paused"));
        }
        self.send_sealed(frame)
    }

    /// Sends even on a sealed connection (the `Quiesce` request itself).
    fn send_sealed(&self, frame: Frame) -> BoxliteResult<()> {
        self.writer.send(frame).map_err(|_| self.lost())
    }

    fn lost(&self) -> BoxliteError {
        let reason = self
            .closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        BoxliteError::connection_lost(reason)
    }
}

#[derive(Debug)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The connection to one agent. Clones share it; it closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct AgentClient {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl AgentClient {
    /// Starts serving `stream`; the receiver yields the guest's `Ready` message.
    pub fn start(stream: UnixStream) -> (Self, oneshot::Receiver<Message>) {
        let (read_half, write_half) = stream.into_split();
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            writer: writer_tx,
            sealed: AtomicBool::new(false),
            channels: Mutex::new(HashMap::new()),
            next_channel: AtomicU32::new(1),
            closed,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let reader = tokio::spawn(read_loop(read_half, Arc::downgrade(&shared), ready_tx));
        let writer = tokio::spawn(write_loop(write_half, writer_rx, Arc::downgrade(&shared)));
        (
            Self {
                shared,
                _tasks: Arc::new(Tasks(vec![reader, writer])),
            },
            ready_rx,
        )
    }

    /// Opens a channel with `request` as its first message. A request that does not fit in one
    /// frame is an `InvalidArgument` error and nothing is sent.
    pub fn open(&self, request: Message) -> BoxliteResult<Channel> {
        self.open_channel(request, false)
    }

    /// Makes `Quiesce` the last frame sent on this connection and waits for the agent's
    /// `Done`: afterwards the agent has read everything sent and sends nothing more, so the
    /// VM can be saved with no frame cut in two. Every later send fails.
    pub async fn quiesce(&self, limit: Duration) -> BoxliteResult<()> {
        self.shared.sealed.store(true, Ordering::SeqCst);
        let mut channel = self.open_channel(Message::Quiesce, true)?;
        match channel.recv_within(limit, "Quiesce").await? {
            ChannelEvent::Message(Message::Done) => Ok(()),
            other => Err(BoxliteError::protocol(format!(
                "unexpected reply to Quiesce: {}",
                bounded(&format!("{other:?}"), 200)
            ))),
        }
    }

    /// Whether [`quiesce`](Self::quiesce) sealed the connection.
    pub fn is_sealed(&self) -> bool {
        self.shared.sealed.load(Ordering::SeqCst)
    }

    fn open_channel(&self, request: Message, sealed: bool) -> BoxliteResult<Channel> {
        check_request_size(&request)?;
        let id = self.shared.next_channel.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow {
            stdin_window: Semaphore::new(STREAM_WINDOW as usize),
            received: Default::default(),
            allowed: std::array::from_fn(|_| AtomicU64::new(u64::from(STREAM_WINDOW))),
            control_events: AtomicU32::new(0),
        });
        {
            let mut channels = self
                .shared
                .channels
                .lock()
                .map_err(|_| self.shared.lost())?;
            if self.shared.closed.borrow().is_some() {
                return Err(self.shared.lost());
            }
            channels.insert(
                id,
                Sink {
                    events: events_tx,
                    flow: flow.clone(),
                },
            );
        }
        let handle = ChannelHandle {
            id,
            shared: self.shared.clone(),
            flow,
        };
        if sealed {
            self.shared.send_sealed(Frame::control(id, request))?;
        } else {
            handle.send_message(request)?;
        }
        Ok(Channel {
            handle,
            events: events_rx,
        })
    }

    /// Sends `request` and returns the final reply (a guest `Error` becomes `Err`), giving up
    /// after [`REQUEST_TIMEOUT`] without progress.
    pub async fn request(&self, request: Message) -> BoxliteResult<Message> {
        self.request_within(request, REQUEST_TIMEOUT).await
    }

    /// Like [`request`](Self::request), giving up after `limit` without progress.
    pub async fn request_within(
        &self,
        request: Message,
        limit: Duration,
    ) -> BoxliteResult<Message> {
        match self.reply_within(request, limit).await? {
            Message::Error { kind, message } => Err(BoxliteError::protocol(format!(
                "guest error ({kind:?}): {}",
                bounded(&message, MESSAGE_LIMIT)
            ))),
            reply => Ok(reply),
        }
    }

    /// Sends `request` and returns the final reply as it is (a guest `Error` included), giving
    /// up after `limit` without progress.
    pub async fn reply_within(&self, request: Message, limit: Duration) -> BoxliteResult<Message> {
        let what = message_name(&request);
        let mut channel = self.open(request)?;
        loop {
            match channel.recv_within(limit, &what).await? {
                ChannelEvent::Message(reply) => return Ok(reply),
                ChannelEvent::Data(stream, data) => channel.handle.credit(stream, data.len()),
                ChannelEvent::Eof(_) => {}
            }
        }
    }

    /// Why the connection ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed.borrow().clone()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        let mut closed = self.shared.closed.subscribe();
        let _ = closed.wait_for(Option::is_some).await;
    }

    pub fn close(&self, reason: &str) {
        self.shared.close(reason.to_string());
    }
}

/// The sending side of one channel; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ChannelHandle {
    id: u32,
    shared: Arc<Shared>,
    flow: Arc<Flow>,
}

impl ChannelHandle {
    pub fn send_message(&self, message: Message) -> BoxliteResult<()> {
        self.shared.send(Frame::control(self.id, message))
    }

    /// Sends bytes on the stdin stream, waiting for credit as long as it takes (a command's stdin:
    /// the command decides when it reads).
    pub async fn send_stdin(&self, data: &[u8]) -> BoxliteResult<()> {
        self.send_stdin_within(data, None).await
    }

    /// Sends bytes on the stdin stream, waiting at most `stall` for each chunk's credit when
    /// given (a copy: the agent itself reads, so a window that stays shut means it is stuck).
    pub async fn send_stdin_within(
        &self,
        data: &[u8],
        stall: Option<Duration>,
    ) -> BoxliteResult<()> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            let acquire = self.flow.stdin_window.acquire_many(chunk.len() as u32);
            let acquired = match stall {
                Some(limit) => tokio::time::timeout(limit, acquire).await.map_err(|_| {
                    BoxliteError::protocol(format!(
                        "the guest agent took no input for {} s",
                        limit.as_secs()
                    ))
                })?,
                None => acquire.await,
            };
            let permit = acquired.map_err(|_| self.shared.lost())?;
            permit.forget();
            self.shared
                .send(Frame::data(self.id, StreamId::Stdin, chunk.to_vec()))?;
        }
        Ok(())
    }

    pub fn send_eof(&self, stream: StreamId) -> BoxliteResult<()> {
        self.shared.send(Frame::eof(self.id, stream))
    }

    /// Returns credit for `len` bytes of a guest stream that were consumed.
    pub fn credit(&self, stream: StreamId, len: usize) {
        if len == 0 {
            return;
        }
        // Counted before the credit goes out: the guest can only use it after.
        self.flow.allowed[stream as usize].fetch_add(len as u64, Ordering::Relaxed);
        let _ = self.shared.send(Frame::credit(self.id, stream, len as u32));
    }

    pub fn lost(&self) -> BoxliteError {
        self.shared.lost()
    }
}

/// One open channel: its sending handle and its incoming events.
#[derive(Debug)]
pub(crate) struct Channel {
    pub handle: ChannelHandle,
    events: mpsc::UnboundedReceiver<ChannelEvent>,
}

impl Channel {
    /// The next event; an error once the connection is gone. Waits as long as it takes: use it
    /// only where the guest may legitimately stay silent (a running command).
    pub async fn recv(&mut self) -> BoxliteResult<ChannelEvent> {
        self.events.recv().await.ok_or_else(|| self.handle.lost())
    }

    /// The next event, or a `GuestProtocol` error when none comes within `limit`. `what` names
    /// the request in the message.
    pub async fn recv_within(
        &mut self,
        limit: Duration,
        what: &str,
    ) -> BoxliteResult<ChannelEvent> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(event) => event,
            Err(_) => Err(BoxliteError::protocol(format!(
                "the guest agent did not answer {what} within {} s",
                limit.as_secs()
            ))),
        }
    }
}

/// The protocol name of a message (`exec`, `copy_out`, ...), for messages.
pub(crate) fn message_name(message: &Message) -> String {
    serde_json::to_value(message)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "a request".into())
}

/// Counts bytes without keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Refuses a request whose frame would exceed [`MAX_PAYLOAD`]: the peer would have to drop the
/// connection (and every other request on it) to get rid of it.
pub(crate) fn check_request_size(request: &Message) -> BoxliteResult<()> {
    let mut counter = Counter(0);
    if serde_json::to_writer(&mut counter, request).is_err() {
        return Err(BoxliteError::Internal("a request did not serialize".into()));
    }
    let size = counter.0;
    if size <= MAX_PAYLOAD {
        return Ok(());
    }
    let (field, what) = match request {
        Message::Exec(_) => (
            "exec",
            "the command (program, arguments and environment together)",
        ),
        Message::CopyIn { .. } | Message::CopyOut { .. } => ("path", "the path"),
        _ => ("request", "the request"),
    };
    Err(BoxliteError::invalid(
        field,
        format!(
            "{what} encodes to {size} bytes, over the {MAX_PAYLOAD}-byte (1 MiB) limit of one \
             request; pass large data through stdin or a file (write_file, copy_in)"
        ),
    ))
}

impl Drop for Channel {
    fn drop(&mut self) {
        if let Ok(mut channels) = self.handle.shared.channels.lock() {
            channels.remove(&self.handle.id);
        }
    }
}

async fn read_loop(
    mut reader: tokio::net::unix::OwnedReadHalf,
    shared: std::sync::Weak<Shared>,
    ready: oneshot::Sender<Message>,
) {
    let mut ready = Some(ready);
    let reason = loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the box's VM or its supervisor exited".to_string(),
            Err(e) => break e,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if frame.channel == 0 {
            match (frame.body, ready.take()) {
                (Body::Control(message @ Message::Ready { .. }), Some(tx)) => {
                    let _ = tx.send(message);
                    continue;
                }
                // The box's supervisor says why it ends the connection (its agent failed).
                (Body::Control(Message::Error { message, .. }), None) => {
                    break bounded(&message, MESSAGE_LIMIT)
                }
                (body, _) => break format!("unexpected frame on channel 0: {}", describe(&body)),
            }
        }
        if let Err(violation) = route(&shared, frame) {
            break violation;
        }
    };
    if let Some(shared) = shared.upgrade() {
        tracing::debug!(%reason, "agent connection closed");
        shared.close(reason);
    }
}

/// Characters of a peer's text quoted in our messages.
pub(crate) const MESSAGE_LIMIT: usize = 1000;

/// `text` cut to at most `limit` characters, with `...` when cut.
pub(crate) fn bounded(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// A frame body for a message: a control message in full (bounded), data by its size only.
fn describe(body: &Body) -> String {
    match body {
        Body::Data { stream, data } => format!("{} bytes of {stream:?} data", data.len()),
        other => bounded(&format!("{other:?}"), 200),
    }
}

/// Hands one frame to its channel; `Err` on a protocol violation that ends the connection.
fn route(shared: &Shared, frame: Frame) -> Result<(), String> {
    let channels = shared
        .channels
        .lock()
        .map_err(|_| "channel table poisoned".to_string())?;
    let Some(sink) = channels.get(&frame.channel) else {
        if frame.channel >= shared.next_channel.load(Ordering::Relaxed) {
            // Replies to requests that were never made: forged.
            return Err(format!(
                "guest sent {} on channel {}, which was never opened",
                describe(&frame.body),
                frame.channel
            ));
        }
        // A late frame for a channel we already finished: harmless.
        return Ok(());
    };
    if matches!(frame.body, Body::Control(_) | Body::Eof { .. }) {
        let seen = sink.flow.control_events.fetch_add(1, Ordering::Relaxed);
        if seen >= CONTROL_EVENTS_PER_CHANNEL {
            return Err(format!(
                "guest flooded channel {} with control messages",
                frame.channel
            ));
        }
    }
    let event = match frame.body {
        Body::Control(message) => ChannelEvent::Message(message),
        Body::Data {
            stream: StreamId::Stdin,
            ..
        } => return Err("guest sent data on stdin".into()),
        Body::Data { stream, data } => {
            let received = sink.flow.received[stream as usize]
                .fetch_add(data.len() as u64, Ordering::Relaxed)
                + data.len() as u64;
            if received > sink.flow.allowed[stream as usize].load(Ordering::Relaxed) {
                return Err(format!(
                    "guest overran its {stream:?} credit on channel {}",
                    frame.channel
                ));
            }
            ChannelEvent::Data(stream, data)
        }
        Body::Eof { stream } => ChannelEvent::Eof(stream),
        Body::Credit {
            stream: StreamId::Stdin,
            bytes,
        } => {
            let available = sink.flow.stdin_window.available_permits() as u64;
            if available + u64::from(bytes) > u64::from(STREAM_WINDOW) {
                return Err("guest granted more stdin credit than the window".into());
            }
            sink.flow.stdin_window.add_permits(bytes as usize);
            return Ok(());
        }
        Body::Credit { .. } => return Err("guest sent credit for an output stream".into()),
    };
    // The consumer may be gone (a dropped Execution); its frames are dropped with it.
    let _ = sink.events.send(event);
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_frame(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<Frame>, String> {
    let mut head = [0u8; HEADER_LEN];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading from the guest: {e}")),
    }
    let header = FrameHeader::decode(&head).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; header.payload_len];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(|e| format!("reading from the guest: {e}"))?;
    Frame::decode(header, payload)
        .map(Some)
        .map_err(|e| e.to_string())
}

async fn write_loop(
    writer: tokio::net::unix::OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Frame>,
    shared: std::sync::Weak<Shared>,
) {
    if let Err(e) = write_frames(writer, frames).await {
        // A peer that closed its end may have said why just before (an error frame still on
        // its way to the reader): that is a better reason than a broken pipe.
        let Some(mut closed) = shared.upgrade().map(|s| s.closed.subscribe()) else {
            return;
        };
        let _ = tokio::time::timeout(WRITE_FAILURE_GRACE, closed.wait_for(Option::is_some)).await;
        if let Some(shared) = shared.upgrade() {
            shared.close(format!("writing to the guest: {e}"));
        }
    }
}

/// How long a failed write waits for the reader to learn why the peer went away.
const WRITE_FAILURE_GRACE: Duration = Duration::from_millis(500);

/// Writes queued frames until the queue closes, batching what is already waiting into one
/// write.
pub(crate) async fn write_frames(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Frame>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256 * 1024);
    while let Some(frame) = frames.recv().await {
        buf.clear();
        frame.encode_into(&mut buf);
        while buf.len() < 256 * 1024 {
            match frames.try_recv() {
                Ok(frame) => frame.encode_into(&mut buf),
                Err(_) => break,
            }
        }
        writer.write_all(&buf).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted guest on the other end of a socket pair.
    async fn pair() -> (AgentClient, oneshot::Receiver<Message>, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        let (client, ready) = AgentClient::start(host);
        (client, ready, guest)
    }

    async fn guest_read(guest: &mut UnixStream) -> Frame {
        read_frame(guest).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn ready_then_request_reply() {
        let (client, ready, mut guest) = pair().await;
        let hello = Message::Ready {
            version: 1,
            agent_version: "t".into(),
            uptime_ms: 5,
            root_error: None,
        };
        guest
            .write_all(&Frame::control(0, hello.clone()).encode())
            .await
            .unwrap();
        assert_eq!(ready.await.unwrap(), hello);

        let reply = tokio::spawn({
            let client = client.clone();
            async move { client.request(Message::Ping).await }
        });
        let frame = guest_read(&mut guest).await;
        assert_eq!(frame.body, Body::Control(Message::Ping));
        guest
            .write_all(&Frame::control(frame.channel, Message::Pong).encode())
            .await
            .unwrap();
        assert_eq!(reply.await.unwrap().unwrap(), Message::Pong);
    }

    #[tokio::test]
    async fn a_guest_that_ignores_credit_is_cut_off() {
        let (client, _ready, mut guest) = pair().await;
        let mut channel = client.open(Message::Ping).unwrap();
        let id = guest_read(&mut guest).await.channel;
        let chunk = vec![0u8; MAX_DATA_CHUNK];
        let mut wire = Vec::new();
        for _ in 0..(STREAM_WINDOW as usize / MAX_DATA_CHUNK + 1) {
            Frame::data(id, StreamId::Stdout, chunk.clone()).encode_into(&mut wire);
        }
        guest.write_all(&wire).await.unwrap();
        loop {
            match channel.recv().await {
                Ok(_) => continue,
                Err(e) => {
                    assert!(e.to_string().contains("overran"), "{e}");
                    break;
                }
            }
        }
        assert!(client.open(Message::Ping).is_err());
    }

    #[tokio::test]
    async fn guest_disconnect_fails_pending_requests() {
        let (client, _ready, guest) = pair().await;
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.request(Message::Metrics).await }
        });
        tokio::task::yield_now().await;
        drop(guest);
        let err = pending.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                BoxliteError::Guest(crate::error::GuestError::ConnectionLost { .. })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stdin_waits_for_credit() {
        let (client, _ready, mut guest) = pair().await;
        let channel = client.open(Message::Ping).unwrap();
        let id = guest_read(&mut guest).await.channel;
        let handle = channel.handle.clone();
        let big = vec![1u8; STREAM_WINDOW as usize + 10];
        let sender = tokio::spawn(async move { handle.send_stdin(&big).await });
        let mut received = 0usize;
        while received < STREAM_WINDOW as usize {
            if let Body::Data { data, .. } = guest_read(&mut guest).await.body {
                received += data.len();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!sender.is_finished(), "sent past the window without credit");
        guest
            .write_all(&Frame::credit(id, StreamId::Stdin, 10).encode())
            .await
            .unwrap();
        sender.await.unwrap().unwrap();
        drop(channel);
    }

    fn ready() -> Frame {
        Frame::control(
            0,
            Message::Ready {
                version: 1,
                agent_version: "t".into(),
                uptime_ms: 5,
                root_error: None,
            },
        )
    }

    #[tokio::test]
    async fn a_request_over_the_frame_cap_is_refused_before_sending() {
        let (client, _ready, mut guest) = pair().await;
        let huge = Message::Exec(boxlite_proto::ExecRequest::new(
            "echo",
            ["a".repeat(MAX_PAYLOAD)],
        ));
        let err = client.open(huge).unwrap_err();
        assert!(
            matches!(&err, BoxliteError::InvalidArgument { field, reason } if field == "exec" && reason.contains("1048576-byte (1 MiB) limit")),
            "{err}"
        );
        // Nothing went out, and the connection still works.
        let _channel = client.open(Message::Ping).unwrap();
        assert_eq!(
            guest_read(&mut guest).await.body,
            Body::Control(Message::Ping)
        );
        assert!(client.closed_reason().is_none());
    }

    #[tokio::test]
    async fn a_reply_on_a_channel_never_opened_ends_the_connection() {
        let (client, _ready, mut guest) = pair().await;
        guest.write_all(&ready().encode()).await.unwrap();
        let mut channel = client.open(Message::Ping).unwrap();
        let id = guest_read(&mut guest).await.channel;
        guest
            .write_all(&Frame::control(id + 100, Message::Pong).encode())
            .await
            .unwrap();
        let err = channel.recv().await.unwrap_err();
        assert!(err.to_string().contains("never opened"), "{err}");
        // A late frame for a finished channel is not a violation.
        let (client, _ready, mut guest) = pair().await;
        let channel = client.open(Message::Ping).unwrap();
        let id = guest_read(&mut guest).await.channel;
        drop(channel);
        guest
            .write_all(&Frame::control(id, Message::Pong).encode())
            .await
            .unwrap();
        let mut next = client.open(Message::Ping).unwrap();
        let next_id = guest_read(&mut guest).await.channel;
        guest
            .write_all(&Frame::control(next_id, Message::Pong).encode())
            .await
            .unwrap();
        assert!(matches!(
            next.recv().await.unwrap(),
            ChannelEvent::Message(Message::Pong)
        ));
    }

    #[tokio::test]
    async fn a_flood_of_control_messages_ends_the_connection() {
        let (client, _ready, mut guest) = pair().await;
        let mut channel = client.open(Message::Ping).unwrap();
        let id = guest_read(&mut guest).await.channel;
        let mut wire = Vec::new();
        for _ in 0..=CONTROL_EVENTS_PER_CHANNEL {
            Frame::control(id, Message::Started { pid: 1 }).encode_into(&mut wire);
        }
        guest.write_all(&wire).await.unwrap();
        let err = loop {
            match channel.recv().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("flooded"), "{err}");
    }

    #[tokio::test]
    async fn the_supervisors_goodbye_fails_every_pending_call_with_its_reason() {
        let (client, ready_rx, mut guest) = pair().await;
        guest.write_all(&ready().encode()).await.unwrap();
        ready_rx.await.unwrap();
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.request(Message::Metrics).await }
        });
        let channel = client.open(Message::Ping).unwrap();
        let writer = channel.handle.clone();
        let stdin = tokio::spawn(async move {
            writer
                .send_stdin(&vec![0u8; STREAM_WINDOW as usize + 1])
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let goodbye = Message::Error {
            kind: boxlite_proto::ErrorKind::Io,
            message: "the guest agent did not answer a heartbeat".into(),
        };
        guest
            .write_all(&Frame::control(0, goodbye).encode())
            .await
            .unwrap();
        for err in [
            pending.await.unwrap().unwrap_err(),
            stdin.await.unwrap().unwrap_err(),
        ] {
            assert!(
                matches!(&err, BoxliteError::Guest(crate::error::GuestError::ConnectionLost { reason }) if reason.contains("heartbeat")),
                "{err}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_the_guest_ignores_times_out() {
        let (client, _ready, _guest) = pair().await;
        let started = tokio::time::Instant::now();
        let err = client.request(Message::Metrics).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("did not answer metrics within 30 s"),
            "{err}"
        );
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
        // Only the request failed: the connection stays.
        assert!(client.closed_reason().is_none());
    }
}
