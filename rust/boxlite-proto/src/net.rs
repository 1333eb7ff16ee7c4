//! How the guest agent sets up a box's network: the host computes a [`GuestNetwork`] (from the
//! network stack's fixed addresses) and sends it; the agent applies it with ioctls (the guest
//! kernel has no DHCP client and no `IP_PNP`) and writes `/etc/resolv.conf` and `/etc/hosts`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One box's guest-side network setup. Absent (`None` where it is carried) means the box has
/// no network: `eth0` is left down and only loopback exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The guest interface to configure, normally `eth0`.
    pub interface: String,
    /// The interface's MAC address, as given to QEMU's `virtio-net-pci` device.
    pub mac: [u8; 6],
    /// The guest's address on the virtual link.
    pub address: Ipv4Addr,
    /// The link's prefix length (24 for a /24).
    pub prefix_len: u8,
    /// The default gateway: the host-side network stack.
    pub gateway: Ipv4Addr,
    /// Name servers for `/etc/resolv.conf`, in order.
    pub dns: Vec<Ipv4Addr>,
    /// The interface MTU in bytes (1500 unless the host stack says otherwise).
    pub mtu: u16,
    /// Extra `/etc/hosts` lines: a name and its address (e.g. `host.boxlite.internal`).
    pub hosts: Vec<(String, Ipv4Addr)>,
}

impl GuestNetwork {
    /// The netmask for [`prefix_len`](Self::prefix_len) (`/24` -> `255.255.255.0`).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = match self.prefix_len {
            0 => 0,
            n if n >= 32 => u32::MAX,
            n => u32::MAX << (32 - n),
        };
        Ipv4Addr::from(bits)
    }

    /// The MAC address as text, `52:54:00:12:34:56`.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestNetwork {
        GuestNetwork {
            interface: "eth0".into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            address: Ipv4Addr::new(192, 168, 127, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(192, 168, 127, 1),
            dns: vec![Ipv4Addr::new(192, 168, 127, 1)],
            mtu: 1500,
            hosts: vec![(
                "host.boxlite.internal".into(),
                Ipv4Addr::new(192, 168, 127, 254),
            )],
        }
    }

    #[test]
    fn netmask_and_mac() {
        let mut g = sample();
        assert_eq!(g.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(g.mac_string(), "52:54:00:12:34:56");
        g.prefix_len = 0;
        assert_eq!(g.netmask(), Ipv4Addr::UNSPECIFIED);
        g.prefix_len = 32;
        assert_eq!(g.netmask(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn json_round_trip() {
        let g = sample();
        let text = serde_json::to_string(&g).expect("serialize");
        assert!(text.contains("\"192.168.127.2\""), "{text}");
        let back: GuestNetwork = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, g);
    }
}
