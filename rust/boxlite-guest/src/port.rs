//! The virtio-serial port: finding it, reading frames, the single writer, credit windows.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use boxlite_proto::{Frame, FrameError, FrameHeader, StreamId, HEADER_LEN, MAX_DATA_CHUNK};

use crate::log::log;
use crate::sys;

pub const PORTS_DIR: &str = "/sys/class/virtio-ports";

/// The device node of the virtio-serial port called `name`, by scanning `ports_dir`
/// (`/sys/class/virtio-ports/<dev>/name`).
pub fn find_port(ports_dir: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(ports_dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end_matches(['\n', '\0']) == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Waits up to `limit` for the port to show up (its driver may still be probing), then opens
/// it read-write.
pub fn open_port(name: &str, limit: Duration) -> io::Result<File> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port(Path::new(PORTS_DIR), name) {
            // The device node can lag behind sysfs by a moment.
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
            {
                Ok(f) => return Ok(f),
                Err(e) if start.elapsed() >= limit => return Err(e),
                Err(_) => {}
            }
        } else if start.elapsed() >= limit {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name:?} in {PORTS_DIR}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Blocks until a host is connected to the port. The virtio console driver reports POLLHUP
/// while no host is connected; reads then return EOF at once, so there is nothing to wait on
/// but the flag itself.
pub fn wait_for_host(fd: RawFd) {
    loop {
        let mut fds = [sys::pollfd(fd, libc::POLLIN)];
        match sys::poll(&mut fds, Some(Duration::ZERO)) {
            Ok(_) if fds[0].revents & libc::POLLHUP == 0 => return,
            Ok(_) => {}
            Err(e) => {
                log!("poll on the port: {e}");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What one read from the port produced.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    /// The host went away (clean end or a truncated frame).
    Eof,
    /// A frame that could not be decoded; its bytes were consumed when the header was sane.
    Bad {
        channel: u32,
        kind: u8,
        error: FrameError,
    },
    Failed(io::Error),
}

/// Reads the next frame. Unlike [`Frame::read_from`] this keeps a bad frame's channel and
/// skips oversized payloads, so the reader can reply to or survive one.
pub fn read_frame(r: &mut impl Read) -> Incoming {
    let mut head = [0u8; HEADER_LEN];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Incoming::Eof,
        Err(e) => return Incoming::Failed(e),
    }
    let channel = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let kind = head[8];
    let header = match FrameHeader::decode(&head) {
        Ok(h) => h,
        Err(error) => {
            if let FrameError::TooLarge(n) = error {
                if let Err(e) = io::copy(&mut r.take(n as u64), &mut io::sink()) {
                    return Incoming::Failed(e);
                }
            }
            return Incoming::Bad {
                channel,
                kind,
                error,
            };
        }
    };
    let mut payload = vec![0u8; header.payload_len];
    match r.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Incoming::Eof,
        Err(e) => return Incoming::Failed(e),
    }
    match Frame::decode(header, payload) {
        Ok(f) => Incoming::Frame(f),
        Err(error) => Incoming::Bad {
            channel,
            kind,
            error,
        },
    }
}

/// Send credit for one outgoing stream: how many more bytes the host accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    available: u64,
}

impl Window {
    pub fn new(initial: u32) -> Self {
        Self {
            available: initial as u64,
        }
    }

    /// A window that never runs out (output nobody sends credit for).
    pub fn unlimited() -> Self {
        Self {
            available: u64::MAX,
        }
    }

    pub fn grant(&mut self, bytes: u32) {
        self.available = self.available.saturating_add(bytes as u64);
    }

    /// How much the next read may take: the window, capped at one frame's worth.
    pub fn next_chunk(&self) -> usize {
        self.available.min(MAX_DATA_CHUNK as u64) as usize
    }

    pub fn is_open(&self) -> bool {
        self.available > 0
    }

    /// Records `bytes` as sent; never goes below zero.
    pub fn consume(&mut self, bytes: usize) {
        self.available = self.available.saturating_sub(bytes as u64);
    }
}

enum Out {
    Bytes { generation: u64, bytes: Vec<u8> },
    Flush(mpsc::Sender<()>),
}

/// The single writer of the port: frames are queued (never blocking the caller) and a
/// thread writes them in batches. Frames of an old connection generation are dropped.
pub struct Outbox {
    tx: mpsc::Sender<Out>,
    generation: Arc<AtomicU64>,
    /// Set while the VM is being saved: nothing at all is written (see [`Outbox::hold`]).
    held: Arc<AtomicBool>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("generation", &self.generation())
            .finish()
    }
}

/// Small frames are gathered into one `write(2)` of up to this much (the virtio console
/// driver takes at most 32 KiB per call anyway); bigger frames are written as they are.
const BATCH: usize = 32 * 1024;

impl Outbox {
    pub fn start(mut port: File) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Out>();
        let generation = Arc::new(AtomicU64::new(0));
        let current = generation.clone();
        let held = Arc::new(AtomicBool::new(false));
        let holding = held.clone();
        std::thread::Builder::new()
            .name("port-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                let mut acks = Vec::new();
                let mut write = |bytes: &[u8]| {
                    if let Err(e) = port.write_all(bytes) {
                        log!("writing to the port: {e}");
                    }
                };
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    while let Some(out) = next.take() {
                        match out {
                            Out::Bytes { generation, bytes } => {
                                if generation != current.load(Ordering::SeqCst)
                                    || holding.load(Ordering::SeqCst)
                                {
                                    // A frame for a host that is gone, or while the VM is
                                    // being saved.
                                } else if bytes.len() >= BATCH / 2 {
                                    if !batch.is_empty() {
                                        write(&batch);
                                        batch.clear();
                                    }
                                    write(&bytes);
                                } else {
                                    batch.extend_from_slice(&bytes);
                                    if batch.len() >= BATCH {
                                        write(&batch);
                                        batch.clear();
                                    }
                                }
                            }
                            Out::Flush(ack) => acks.push(ack),
                        }
                        next = rx.try_recv().ok();
                    }
                    if !batch.is_empty() {
                        write(&batch);
                        batch.clear();
                    }
                    for ack in acks.drain(..) {
                        let _ = ack.send(());
                    }
                }
            })?;
        Ok(Arc::new(Self {
            tx,
            generation,
            held,
        }))
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Starts a new connection generation: frames queued for older ones are dropped.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stops all output until [`Outbox::release`], and starts a new generation so that what
    /// was queued for the current one is never sent: the host saving the VM reads nothing
    /// after the reply it is waiting for, and the VM restored later talks to a new host.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        self.next_generation();
    }

    /// Lets output flow again (frames of the current generation only).
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Queues `frame` for the connection generation `generation`.
    pub fn send(&self, generation: u64, frame: &Frame) {
        self.send_encoded(generation, frame.encode());
    }

    /// Queues an already encoded frame (see [`DataFrame`]).
    pub fn send_encoded(&self, generation: u64, bytes: Vec<u8>) {
        let _ = self.tx.send(Out::Bytes { generation, bytes });
    }

    /// Waits (up to `limit`) until everything queued so far has been written.
    pub fn flush(&self, limit: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Out::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(limit).is_ok()
    }
}

/// A data frame filled in place: the bytes are read straight behind the frame header
/// instead of being copied into a frame afterwards (a copy costs under a software CPU).
#[derive(Debug)]
pub struct DataFrame {
    bytes: Vec<u8>,
}

impl DataFrame {
    pub fn new(channel: u32, stream: StreamId, capacity: usize) -> Self {
        // The encoding of an empty data frame is its header plus the stream byte; the data
        // follows, and the length prefix (which counts everything after itself) is patched.
        let mut bytes = Frame::data(channel, stream, Vec::new()).encode();
        bytes.reserve_exact(capacity);
        Self { bytes }
    }

    /// Fills the data part with one `read(2)` of up to `max` bytes from `fd`.
    pub fn read_from(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let spare = self.bytes.spare_capacity_mut();
        let max = max.min(spare.len());
        let ptr = spare.as_mut_ptr();
        loop {
            // SAFETY: read(2) writes at most `max` bytes into the spare capacity, which is
            // then marked initialized with exactly the count it returned.
            let n = unsafe { libc::read(fd, ptr.cast(), max) };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: see above.
                unsafe { self.bytes.set_len(self.bytes.len() + n) };
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// The finished wire bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = (self.bytes.len() - 4) as u32;
        self.bytes[..4].copy_from_slice(&len.to_be_bytes());
        // Queued frames are bounded by the window in bytes, not in count: do not let many
        // small ones each pin a whole chunk of capacity.
        if self.bytes.capacity() > 2 * self.bytes.len() + 1024 {
            self.bytes.shrink_to_fit();
        }
        self.bytes
    }
}

/// The raw descriptor of the port, for [`wait_for_host`].
pub fn raw(port: &File) -> RawFd {
    port.as_raw_fd()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use boxlite_proto::{Body, Message, STREAM_WINDOW};

    #[test]
    fn window_accounting() {
        let mut w = Window::new(STREAM_WINDOW);
        assert_eq!(w.next_chunk(), MAX_DATA_CHUNK);
        for _ in 0..(STREAM_WINDOW as usize / MAX_DATA_CHUNK) {
            assert!(w.is_open());
            let n = w.next_chunk();
            w.consume(n);
        }
        assert!(!w.is_open());
        assert_eq!(w.next_chunk(), 0);
        w.grant(100);
        assert_eq!(w.next_chunk(), 100);
        w.consume(60);
        assert_eq!(w.next_chunk(), 40);
        w.consume(1000);
        assert!(!w.is_open());
        let mut u = Window::unlimited();
        u.grant(u32::MAX);
        u.consume(MAX_DATA_CHUNK);
        assert_eq!(u.next_chunk(), MAX_DATA_CHUNK);
    }

    #[test]
    fn reads_good_and_bad_frames() {
        let mut wire = Vec::new();
        Frame::control(5, Message::Ping).encode_into(&mut wire);
        // An unknown message type: JSON that does not decode.
        let mut bad = Frame::control(6, Message::Ping).encode();
        let json = br#"{"type":"format_disk"}"#;
        bad.truncate(HEADER_LEN);
        bad.extend_from_slice(json);
        let len = (bad.len() - 4) as u32;
        bad[..4].copy_from_slice(&len.to_be_bytes());
        wire.extend_from_slice(&bad);
        Frame::data(7, StreamId::Stdin, b"x".to_vec()).encode_into(&mut wire);
        let mut r = wire.as_slice();
        assert!(matches!(read_frame(&mut r), Incoming::Frame(f) if f.channel == 5));
        assert!(matches!(
            read_frame(&mut r),
            Incoming::Bad {
                channel: 6,
                kind: 0,
                error: FrameError::BadJson(_)
            }
        ));
        match read_frame(&mut r) {
            Incoming::Frame(Frame {
                channel: 7,
                body: Body::Data { data, .. },
            }) => assert_eq!(data, b"x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_frame(&mut r), Incoming::Eof));
    }

    #[test]
    fn data_frames_built_in_place_match_the_codec() {
        let (r, w) = sys::pipe().unwrap();
        sys::write(w.as_raw_fd(), b"hello world").unwrap();
        let mut f = DataFrame::new(9, StreamId::Stderr, 64);
        assert_eq!(f.read_from(r.as_raw_fd(), 5).unwrap(), 5);
        let bytes = f.finish();
        assert_eq!(
            bytes,
            Frame::data(9, StreamId::Stderr, b"hello".to_vec()).encode()
        );
    }

    #[test]
    fn finds_port_by_name() {
        let dir = std::env::temp_dir().join(format!("boxlite-guest-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (dev, name) in [("vport0p0", "other\n"), ("vport0p1", "boxlite.agent\n")] {
            std::fs::create_dir_all(dir.join(dev)).unwrap();
            std::fs::write(dir.join(dev).join("name"), name).unwrap();
        }
        assert_eq!(
            find_port(&dir, "boxlite.agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port(&dir, "nope"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
