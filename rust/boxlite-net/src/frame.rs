//! QEMU's `-netdev stream` framing (each Ethernet frame as a 4-byte big-endian length then
//! the frame) and the smoltcp device that reads and writes it without copying per packet.

use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::task::{Context, Poll};

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest frame accepted from the stream (QEMU's own limit is 69632 bytes of
/// buffer; a virtio-net frame is at most 65535 + an Ethernet header).
pub(crate) const MAX_FRAME: usize = 65_535 + 14;

const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// Bytes read from the netdev stream, cut into frames in place.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes still to drop of an oversized frame.
    skip: usize,
}

impl FrameReader {
    /// A reader whose buffer holds `capacity` bytes, and always room for a frame more than
    /// the unfinished one it may hold.
    pub(crate) fn new(capacity: usize) -> FrameReader {
        FrameReader {
            buf: vec![0; capacity.max(2 * (4 + MAX_FRAME))],
            start: 0,
            end: 0,
            skip: 0,
        }
    }

    /// Reads what the stream has. `Ready(Ok(0))` is the end of the stream.
    pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut R,
    ) -> Poll<io::Result<usize>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < 4 + MAX_FRAME {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        match Pin::new(stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Feeds raw stream bytes (tests and fuzzing); returns how many were taken.
    #[cfg(test)]
    pub(crate) fn push(&mut self, data: &[u8]) -> usize {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = data.len().min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&data[..n]);
        self.end += n;
        n
    }

    /// The next complete frame, if the buffer holds one. Oversized frames are skipped.
    pub(crate) fn next_frame(&mut self) -> Option<&[u8]> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.end - self.start);
                self.start += n;
                self.skip -= n;
                if self.skip > 0 {
                    return None;
                }
            }
            let avail = &self.buf[self.start..self.end];
            let len = u32::from_be_bytes(*avail.first_chunk::<4>()?) as usize;
            if len > MAX_FRAME {
                tracing::warn!(len, "netdev: dropping an oversized frame");
                self.start += 4;
                self.skip = len;
                continue;
            }
            if avail.len() < 4 + len {
                return None;
            }
            let frame = self.start + 4..self.start + 4 + len;
            self.start = frame.end;
            return Some(&self.buf[frame]);
        }
    }
}

/// Framed bytes waiting to be written to the netdev stream.
#[derive(Debug)]
pub(crate) struct TxBuf {
    buf: Vec<u8>,
    sent: usize,
    /// Above this many unwritten bytes the stack stops producing frames.
    limit: usize,
}

impl TxBuf {
    pub(crate) fn new(limit: usize) -> TxBuf {
        TxBuf {
            buf: Vec::with_capacity(limit + 4 + MAX_FRAME),
            sent: 0,
            limit,
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        self.buf.len() - self.sent < self.limit
    }

    /// Appends a zeroed frame of `len` bytes for the caller to fill.
    fn frame(&mut self, len: usize) -> &mut [u8] {
        let at = self.buf.len();
        self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        self.buf.resize(at + 4 + len, 0);
        &mut self.buf[at + 4..]
    }

    /// Appends one frame of at most `max` bytes written by `f`, which returns its real length
    /// or `None` to drop it.
    pub(crate) fn push_with(&mut self, max: usize, f: impl FnOnce(&mut [u8]) -> Option<usize>) {
        let at = self.buf.len();
        self.buf.resize(at + 4 + max, 0);
        match f(&mut self.buf[at + 4..]) {
            Some(len) if len <= max => {
                self.buf[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
                self.buf.truncate(at + 4 + len);
            }
            _ => self.buf.truncate(at),
        }
    }

    /// Writes what it can. `Ready(Ok(n))`: `n` bytes went out (0 when nothing was waiting).
    pub(crate) fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut W,
    ) -> Poll<io::Result<usize>> {
        let mut total = 0;
        while self.sent < self.buf.len() {
            match Pin::new(&mut *stream).poll_write(cx, &self.buf[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.sent += n;
                    total += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if total == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.sent > self.limit / 2 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        Poll::Ready(Ok(total))
    }

    /// Everything written so far, unframed (tests).
    #[cfg(test)]
    pub(crate) fn take_frames(&mut self) -> Vec<Vec<u8>> {
        let mut r = FrameReader::new(0);
        let mut out = Vec::new();
        let data = self.buf.split_off(self.sent);
        self.buf.clear();
        self.sent = 0;
        for chunk in data.chunks(16 * 1024) {
            r.push(chunk);
            while let Some(f) = r.next_frame() {
                out.push(f.to_vec());
            }
        }
        out
    }
}

/// The smoltcp device: at most one received frame (borrowed from the [`FrameReader`]) and
/// the [`TxBuf`] for whatever the stack sends.
pub(crate) struct Dev<'a> {
    pub(crate) rx: Option<&'a [u8]>,
    pub(crate) tx: &'a mut TxBuf,
    pub(crate) mtu: usize,
}

pub(crate) struct RxTok<'a>(&'a [u8]);
pub(crate) struct TxTok<'a>(&'a mut TxBuf);

impl phy::Device for Dev<'_> {
    type RxToken<'b>
        = RxTok<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxTok<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let frame = self.rx.take()?;
        Some((RxTok(frame), TxTok(self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        self.tx.has_room().then_some(TxTok(self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HEADER;
        caps
    }
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(self.0.frame(len))
    }
}

/// The most UDP payload one frame carries at `mtu` (no IP fragmentation).
pub(crate) fn max_udp_payload(mtu: usize) -> usize {
    mtu.saturating_sub(IPV4_HEADER + UDP_HEADER)
}

/// Appends a UDP datagram `from` -> `to` as a frame from the gateway's MAC to `dst_mac`;
/// `fill` writes the payload into the slice it is given and returns its length, or `None`
/// to send nothing; a payload longer than [`max_udp_payload`] is dropped.
pub(crate) fn push_udp(
    tx: &mut TxBuf,
    mtu: usize,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    from: SocketAddrV4,
    to: SocketAddrV4,
    fill: impl FnOnce(&mut [u8]) -> Option<usize>,
) {
    let max_payload = max_udp_payload(mtu);
    let header = ETH_HEADER + IPV4_HEADER + UDP_HEADER;
    // One spare byte tells a datagram that fits from one that was cut short.
    tx.push_with(header + max_payload + 1, |buf| {
        let n = fill(&mut buf[header..])?;
        if n > max_payload {
            return None;
        }
        let frame = &mut buf[..header + n];
        let eth = EthernetRepr {
            src_addr: src_mac,
            dst_addr: dst_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let ip = Ipv4Repr {
            src_addr: *from.ip(),
            dst_addr: *to.ip(),
            next_header: IpProtocol::Udp,
            payload_len: UDP_HEADER + n,
            hop_limit: 64,
        };
        let udp = UdpRepr {
            src_port: from.port(),
            dst_port: to.port(),
        };
        let caps = ChecksumCapabilities::default();
        let mut eth_frame = EthernetFrame::new_unchecked(&mut *frame);
        eth.emit(&mut eth_frame);
        let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
        ip.emit(&mut ip_packet, &caps);
        let mut udp_packet = UdpPacket::new_unchecked(ip_packet.payload_mut());
        // The payload is already in place: emit only writes the header and checksum.
        udp.emit(
            &mut udp_packet,
            &IpAddress::Ipv4(*from.ip()),
            &IpAddress::Ipv4(*to.ip()),
            n,
            |_| {},
            &caps,
        );
        Some(header + n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn cuts_frames_across_reads() {
        let data = framed(&[b"hello", b"", b"world!"]);
        let mut r = FrameReader::new(0);
        let mut got = Vec::new();
        for b in &data {
            r.push(std::slice::from_ref(b));
            while let Some(f) = r.next_frame() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, vec![b"hello".to_vec(), vec![], b"world!".to_vec()]);
    }

    #[test]
    fn skips_oversized_frames() {
        let mut data = ((MAX_FRAME + 10) as u32).to_be_bytes().to_vec();
        data.extend(std::iter::repeat_n(0xAA, MAX_FRAME + 10));
        data.extend(framed(&[b"after"]));
        let mut r = FrameReader::new(0);
        let mut got = Vec::new();
        for chunk in data.chunks(1000) {
            r.push(chunk);
            while let Some(f) = r.next_frame() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, vec![b"after".to_vec()]);
    }

    #[test]
    fn udp_frames_parse_back() {
        let mut tx = TxBuf::new(1 << 20);
        let from: SocketAddrV4 = "192.168.127.1:53".parse().expect("addr");
        let to: SocketAddrV4 = "192.168.127.2:4444".parse().expect("addr");
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        push_udp(&mut tx, 1500, mac, mac, from, to, |b| {
            b[..3].copy_from_slice(b"abc");
            Some(3)
        });
        // Too big for the MTU: dropped.
        push_udp(&mut tx, 1500, mac, mac, from, to, |_| Some(1500));
        let frames = tx.take_frames();
        assert_eq!(frames.len(), 1);
        let eth = EthernetFrame::new_checked(&frames[0][..]).expect("eth");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ip");
        let caps = ChecksumCapabilities::default();
        let ipr = Ipv4Repr::parse(&ip, &caps).expect("ipv4 checksum");
        let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
        let r = UdpRepr::parse(
            &udp,
            &IpAddress::Ipv4(ipr.src_addr),
            &IpAddress::Ipv4(ipr.dst_addr),
            &caps,
        )
        .expect("udp checksum");
        assert_eq!((r.src_port, r.dst_port), (53, 4444));
        assert_eq!(udp.payload(), b"abc");
    }
}
