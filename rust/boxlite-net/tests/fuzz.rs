//! Property test of the packet path: whatever frames the guest sends (garbage, truncated,
//! well-formed with arbitrary fields, bad checksums, DNS junk), the stack neither panics nor
//! stops serving. The policy is restricted so no frame can reach anything but loopback.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{config, start, GUEST_MAC};
use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};

const DSTS: [[u8; 4]; 10] = [
    [192, 168, 127, 1],
    [192, 168, 127, 254],
    [192, 168, 127, 2],
    [192, 168, 127, 77],
    [10, 0, 0, 1],
    [203, 0, 113, 9],
    [127, 0, 0, 1],
    [224, 0, 0, 251],
    [255, 255, 255, 255],
    [0, 0, 0, 0],
];
const PORTS: [u16; 6] = [53, 80, 443, 22, 1, 65535];

#[derive(Debug, Clone)]
enum Spec {
    Raw(Vec<u8>),
    Arp {
        op: u16,
        target: usize,
        sender_guest: bool,
    },
    Tcp {
        dst: usize,
        src_guest: bool,
        sport: u16,
        dport: usize,
        flags: u8,
        seq: u32,
        ack: u32,
        win: u16,
        payload: Vec<u8>,
    },
    Udp {
        dst: usize,
        src_guest: bool,
        sport: u16,
        dport: usize,
        payload: Vec<u8>,
    },
    Icmp {
        dst: usize,
        payload: Vec<u8>,
    },
}

fn spec() -> impl Strategy<Value = Spec> {
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    let dns_junk = prop_oneof![
        bytes(80),
        (
            any::<u16>(),
            "[a-z]{1,10}(\\.[a-z]{1,8}){0,3}",
            any::<u16>(),
            proptest::collection::vec((0usize..40, any::<u8>()), 0..4),
            0usize..10
        )
            .prop_map(|(id, name, qtype, flips, cut)| {
                let mut q = common::dns_query(id, &name, qtype);
                for (i, b) in flips {
                    if let Some(x) = q.get_mut(i) {
                        *x = b;
                    }
                }
                q.truncate(q.len().saturating_sub(cut));
                q
            }),
    ];
    prop_oneof![
        bytes(120).prop_map(Spec::Raw),
        (any::<u16>(), 0..DSTS.len(), any::<bool>()).prop_map(|(op, target, sender_guest)| {
            Spec::Arp {
                op: op % 4,
                target,
                sender_guest,
            }
        }),
        (
            0..DSTS.len(),
            any::<bool>(),
            any::<u16>(),
            0..PORTS.len(),
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            bytes(64)
        )
            .prop_map(
                |(dst, src_guest, sport, dport, flags, seq, ack, win, payload)| Spec::Tcp {
                    dst,
                    src_guest,
                    sport,
                    dport,
                    flags,
                    seq,
                    ack,
                    win,
                    payload
                }
            ),
        (
            0..DSTS.len(),
            any::<bool>(),
            any::<u16>(),
            0..PORTS.len(),
            dns_junk
        )
            .prop_map(|(dst, src_guest, sport, dport, payload)| Spec::Udp {
                dst,
                src_guest,
                sport,
                dport,
                payload
            }),
        (0..DSTS.len(), bytes(64)).prop_map(|(dst, payload)| Spec::Icmp { dst, payload }),
    ]
}

fn src(guest: bool) -> Ipv4Addr {
    if guest {
        Ipv4Addr::new(192, 168, 127, 2)
    } else {
        Ipv4Addr::new(192, 168, 127, 99)
    }
}

fn ip_frame(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(boxlite_net::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + 20 + l4.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &ChecksumCapabilities::default());
    p.payload_mut().copy_from_slice(l4);
    buf
}

fn build(s: &Spec) -> Vec<u8> {
    match s {
        Spec::Raw(b) => b.clone(),
        Spec::Arp {
            op,
            target,
            sender_guest,
        } => {
            let mut f = common::arp_request(
                GUEST_MAC,
                src(*sender_guest),
                Ipv4Addr::from(DSTS[*target]),
                [0xff; 6],
            );
            f[20..22].copy_from_slice(&op.to_be_bytes());
            f
        }
        Spec::Tcp {
            dst,
            src_guest,
            sport,
            dport,
            flags,
            seq,
            ack,
            win,
            payload,
        } => {
            let (s, d) = (src(*src_guest), Ipv4Addr::from(DSTS[*dst]));
            let mut l4 = vec![0u8; 20 + payload.len()];
            let mut t = TcpPacket::new_unchecked(&mut l4[..]);
            t.set_src_port(*sport);
            t.set_dst_port(PORTS[*dport]);
            t.set_seq_number(smoltcp::wire::TcpSeqNumber(*seq as i32));
            t.set_ack_number(smoltcp::wire::TcpSeqNumber(*ack as i32));
            t.set_header_len(20);
            t.set_fin(flags & 1 != 0);
            t.set_syn(flags & 2 != 0);
            t.set_rst(flags & 4 != 0);
            t.set_psh(flags & 8 != 0);
            t.set_ack(flags & 16 != 0);
            t.set_window_len(*win);
            t.payload_mut().copy_from_slice(payload);
            t.fill_checksum(&IpAddress::Ipv4(s), &IpAddress::Ipv4(d));
            ip_frame(s, d, IpProtocol::Tcp, &l4)
        }
        Spec::Udp {
            dst,
            src_guest,
            sport,
            dport,
            payload,
        } => {
            let (s, d) = (src(*src_guest), Ipv4Addr::from(DSTS[*dst]));
            let mut l4 = vec![0u8; 8 + payload.len()];
            let repr = UdpRepr {
                src_port: *sport,
                dst_port: PORTS[*dport],
            };
            repr.emit(
                &mut UdpPacket::new_unchecked(&mut l4[..]),
                &IpAddress::Ipv4(s),
                &IpAddress::Ipv4(d),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
            ip_frame(s, d, IpProtocol::Udp, &l4)
        }
        Spec::Icmp { dst, payload } => {
            // Echo request header with whatever checksum the bytes make.
            let mut l4 = vec![8, 0, 0, 0, 0, 1, 0, 1];
            l4.extend_from_slice(payload);
            ip_frame(src(true), Ipv4Addr::from(DSTS[*dst]), IpProtocol::Icmp, &l4)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_frames_never_break_the_stack(
        specs in proptest::collection::vec(spec(), 1..40),
        cut in proptest::collection::vec((any::<bool>(), 0usize..60, (0usize..60, any::<u8>())), 40),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (mut g, _counters, task) = start(config(&["host.boxlite.internal", "*.example.com"]), vec![]);
            let mut stream = Vec::new();
            for (s, (truncate, at, (flip_at, flip))) in specs.iter().zip(cut) {
                let mut f = build(s);
                if truncate {
                    f.truncate(at.min(f.len()));
                } else if let Some(x) = f.get_mut(flip_at) {
                    // Sometimes breaks a checksum, sometimes a header field.
                    *x ^= flip;
                }
                stream.extend_from_slice(&(f.len() as u32).to_be_bytes());
                stream.extend_from_slice(&f);
            }
            g.write_raw(&stream).await;
            g.drain_for(Duration::from_millis(50)).await;
            // Still serving: DNS answers.
            let (rc, addrs) = g.dns("host.boxlite.internal", 1).await;
            assert_eq!((rc, addrs), (0, vec![Ipv4Addr::new(192, 168, 127, 254)]));
            drop(g);
            let r = task.await;
            assert!(matches!(r, Ok(Ok(()))), "stack ended with {r:?}");
        });
    }
}
