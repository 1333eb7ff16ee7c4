//! A multiplexed connection to one guest agent.
//!
//! A reader task decodes frames and routes them to per-channel queues; a writer task batches
//! outgoing frames onto the socket. The guest is untrusted: a frame on an unknown channel is
//! dropped, and a guest that sends more than its credit allows is cut off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use boxlite_proto::{
    Body, Frame, FrameHeader, Message, StreamId, HEADER_LEN, MAX_DATA_CHUNK, STREAM_WINDOW,
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

/// Unconsumed bytes the guest may have queued on one stream before it is cut off; a chunk of
/// slack allows for a credit that is still on its way.
const GUEST_QUEUE_LIMIT: u64 = STREAM_WINDOW as u64 + MAX_DATA_CHUNK as u64;

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
    /// Bytes received per guest stream and not yet credited back.
    queued: [AtomicU64; 3],
}

#[derive(Debug)]
struct Shared {
    writer: mpsc::UnboundedSender<Frame>,
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
        // Dropping every sink ends every channel's event stream.
        if let Ok(mut channels) = self.channels.lock() {
            channels.clear();
        }
    }

    fn send(&self, frame: Frame) -> BoxliteResult<()> {
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

    /// Opens a channel with `request` as its first message.
    pub fn open(&self, request: Message) -> BoxliteResult<Channel> {
        let id = self.shared.next_channel.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow {
            stdin_window: Semaphore::new(STREAM_WINDOW as usize),
            queued: Default::default(),
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
        handle.send_message(request)?;
        Ok(Channel {
            handle,
            events: events_rx,
        })
    }

    /// Sends `request` and returns the final reply (a guest `Error` becomes `Err`).
    pub async fn request(&self, request: Message) -> BoxliteResult<Message> {
        let mut channel = self.open(request)?;
        loop {
            match channel.recv().await? {
                ChannelEvent::Message(Message::Error { kind, message }) => {
                    return Err(BoxliteError::protocol(format!(
                        "guest error ({kind:?}): {message}"
                    )))
                }
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

    /// Sends bytes on the stdin stream, waiting for credit as needed.
    pub async fn send_stdin(&self, data: &[u8]) -> BoxliteResult<()> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            let closed = self.shared.lost();
            let permit = self
                .flow
                .stdin_window
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| closed)?;
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
        self.flow.queued[stream as usize].fetch_sub(len as u64, Ordering::Relaxed);
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
    /// The next event; an error once the connection is gone.
    pub async fn recv(&mut self) -> BoxliteResult<ChannelEvent> {
        self.events.recv().await.ok_or_else(|| self.handle.lost())
    }
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
                (body, _) => break format!("unexpected frame on channel 0: {body:?}"),
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

/// Hands one frame to its channel; `Err` on a protocol violation that ends the connection.
fn route(shared: &Shared, frame: Frame) -> Result<(), String> {
    let channels = shared
        .channels
        .lock()
        .map_err(|_| "channel table poisoned".to_string())?;
    let Some(sink) = channels.get(&frame.channel) else {
        // A late frame for a channel we already finished: harmless.
        return Ok(());
    };
    let event = match frame.body {
        Body::Control(message) => ChannelEvent::Message(message),
        Body::Data {
            stream: StreamId::Stdin,
            ..
        } => return Err("guest sent data on stdin".into()),
        Body::Data { stream, data } => {
            let queued =
                sink.flow.queued[stream as usize].fetch_add(data.len() as u64, Ordering::Relaxed);
            if queued + data.len() as u64 > GUEST_QUEUE_LIMIT {
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
    reader: &mut tokio::net::unix::OwnedReadHalf,
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
        if let Some(shared) = shared.upgrade() {
            shared.close(format!("writing to the guest: {e}"));
        }
    }
}

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
        let mut head = [0u8; HEADER_LEN];
        guest.read_exact(&mut head).await.unwrap();
        let header = FrameHeader::decode(&head).unwrap();
        let mut payload = vec![0; header.payload_len];
        guest.read_exact(&mut payload).await.unwrap();
        Frame::decode(header, payload).unwrap()
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
        for _ in 0..(GUEST_QUEUE_LIMIT as usize / MAX_DATA_CHUNK + 1) {
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
}
