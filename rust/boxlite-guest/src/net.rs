//! The box's network inside the guest: the interface set up with ioctls (the kernel has
//! neither a DHCP client nor `IP_PNP`), the hostname, and the box root's resolver files.
//! The kernel needs `failover`, `net_failover` and `virtio_net` loaded first.

use std::fmt::Write as _;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use boxlite_proto::net::GuestNetwork;

use crate::sys;

/// How long the interface may take to appear once its driver is loaded.
const INTERFACE_WAIT: Duration = Duration::from_secs(3);

/// Brings `setup.interface` up with its address, netmask and MTU, and adds the default route
/// via `setup.gateway`. An existing default route is kept. `up` is the link as this VM already
/// brought it up (a template's, or the box's own before a pause): the same link only gets
/// its MAC set.
pub fn configure(setup: &GuestNetwork, up: Option<&GuestNetwork>) -> io::Result<()> {
    let name = if_name(&setup.interface)?;
    let what = |e: io::Error, step: &str| {
        io::Error::new(e.kind(), format!("{step} of {}: {e}", setup.interface))
    };
    // SAFETY: plain syscall; the result is checked and owned.
    let fd =
        sys::cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket() returned a fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let start = Instant::now();
    loop {
        let mut req = ifreq(&name);
        match ioctl(&sock, libc::SIOCGIFINDEX, &mut req) {
            Ok(()) => break,
            Err(e)
                if e.raw_os_error() == Some(libc::ENODEV) && start.elapsed() < INTERFACE_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(what(e, "finding the interface")),
        }
    }
    // A VM restored from a template has the template's address; the host's network sends
    // to this box's own, and the device filters on it.
    let mut req = ifreq(&name);
    ioctl(&sock, libc::SIOCGIFHWADDR, &mut req).map_err(|e| what(e, "reading the MAC"))?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let current = unsafe { req.ifr_ifru.ifru_hwaddr };
    let wanted = setup.mac.map(|b| b as libc::c_char);
    if current.sa_data[..6] != wanted {
        let mut hwaddr = current;
        hwaddr.sa_family = libc::ARPHRD_ETHER;
        hwaddr.sa_data[..6].copy_from_slice(&wanted);
        let mut req = ifreq(&name);
        req.ifr_ifru.ifru_hwaddr = hwaddr;
        ioctl(&sock, libc::SIOCSIFHWADDR, &mut req).map_err(|e| what(e, "setting the MAC"))?;
    }
    if up.is_some_and(|up| same_link(up, setup)) {
        return Ok(());
    }
    if setup.mtu != 0 && setup.mtu != 1500 {
        let mut req = ifreq(&name);
        req.ifr_ifru.ifru_mtu = libc::c_int::from(setup.mtu);
        ioctl(&sock, libc::SIOCSIFMTU, &mut req).map_err(|e| what(e, "setting the MTU"))?;
    }
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_addr = sockaddr(setup.address);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req).map_err(|e| what(e, "setting the address"))?;
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_netmask = sockaddr(setup.netmask());
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req).map_err(|e| what(e, "setting the netmask"))?;
    let mut req = ifreq(&name);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req).map_err(|e| what(e, "reading the flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req).map_err(|e| what(e, "bringing it up"))?;

    // SAFETY: an all-zero rtentry is valid (no device, no metric, ...).
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(setup.gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    let mut dev = name;
    route.rt_dev = dev.as_mut_ptr();
    match ioctl(&sock, libc::SIOCADDRT, &mut route) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
            Err(what(e, "adding the default route"))
        }
        _ => Ok(()),
    }
}

/// Whether a link brought up as `a` already is `b`, its MAC aside.
fn same_link(a: &GuestNetwork, b: &GuestNetwork) -> bool {
    (&a.interface, a.address, a.prefix_len, a.gateway, a.mtu)
        == (&b.interface, b.address, b.prefix_len, b.gateway, b.mtu)
}

/// Sets the kernel's host name (the box's UTS namespace is the VM's).
pub fn set_hostname(name: &str) -> io::Result<()> {
    let name = sanitize_hostname(name);
    // SAFETY: the pointer and length describe `name`'s bytes.
    sys::cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// Writes `etc/resolv.conf`, `etc/hosts` and `etc/hostname` under `root` (the box's root):
/// DNS through the gateway, `localhost`, the host name and, when the host provides it,
/// `host.boxlite.internal`. Without a network, resolv.conf names no server (lookups fail at
/// once). A symlink, or a file with other links, is replaced, never written through; a plain
/// file is rewritten in place (cheaper than a new file and a rename: a box started from a
/// template does this on its way to its first command), and left alone when it already
/// says the same.
pub fn write_resolver_files(
    root: &Path,
    hostname: &str,
    setup: Option<&GuestNetwork>,
) -> io::Result<()> {
    let etc = root.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a directory", etc.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&etc)?,
        Err(e) => return Err(e),
    }
    let hostname = sanitize_hostname(hostname);
    replace_file(&etc, "resolv.conf", &resolv_conf(setup))?;
    replace_file(&etc, "hosts", &hosts(&hostname, setup))?;
    replace_file(&etc, "hostname", &format!("{hostname}\n"))
}

/// The text of `/etc/resolv.conf`.
pub fn resolv_conf(setup: Option<&GuestNetwork>) -> String {
    let mut s = String::from("# Written by boxlite at boot.\n");
    match setup {
        Some(net) if !net.dns.is_empty() => {
            for ns in &net.dns {
                let _ = writeln!(s, "nameserver {ns}");
            }
        }
        _ => s.push_str("# This box has no network.\n"),
    }
    s
}

/// The text of `/etc/hosts`.
pub fn hosts(hostname: &str, setup: Option<&GuestNetwork>) -> String {
    let mut s = String::from("# Written by boxlite at boot.\n127.0.0.1\tlocalhost\n");
    s.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
    let own = setup.map_or(Ipv4Addr::new(127, 0, 1, 1), |n| n.address);
    let _ = writeln!(s, "{own}\t{hostname}");
    for (name, addr) in setup.map(|n| n.hosts.as_slice()).unwrap_or_default() {
        let _ = writeln!(s, "{addr}\t{name}");
    }
    s
}

/// A valid host name from a box's name or id: letters, digits, '-' and '.', at most 63
/// characters; anything else becomes '-'.
pub fn sanitize_hostname(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let trimmed = cleaned.trim_matches(|c| c == '-' || c == '.');
    if trimmed.is_empty() {
        "boxlite".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Replaces `dir/name` with `text` by renaming a fresh file over it.
fn replace_file(dir: &Path, name: &str, text: &str) -> io::Result<()> {
    use std::io::Write as _;
    if rewrite_in_place(&dir.join(name), text)? {
        return Ok(());
    }
    let tmp = dir.join(format!(".{name}.boxlite-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))
}

/// Rewrites `path` if it is a regular file with one link (false if it is anything else).
fn rewrite_in_place(path: &Path, text: &str) -> io::Result<bool> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};
    let plain = |m: &std::fs::Metadata| m.file_type().is_file() && m.nlink() == 1;
    if !std::fs::symlink_metadata(path).is_ok_and(|m| plain(&m)) {
        return Ok(false);
    }
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Ok(false);
    };
    // What was opened, not what was looked at (a box process may have swapped it).
    let meta = file.metadata()?;
    if !plain(&meta) {
        return Ok(false);
    }
    if meta.len() == text.len() as u64 {
        let mut current = Vec::with_capacity(text.len());
        file.read_to_end(&mut current)?;
        if current == text.as_bytes() {
            return Ok(true);
        }
    }
    file.set_len(0)?;
    file.write_all_at(text.as_bytes(), 0)?;
    Ok(true)
}

fn if_name(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b as libc::c_char;
    }
    Ok(out)
}

fn ifreq(name: &[libc::c_char; libc::IFNAMSIZ]) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = *name;
    req
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the structure `request` reads or writes, valid for the call.
    sys::cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> GuestNetwork {
        GuestNetwork {
            interface: "eth0".into(),
            mac: [0x52, 0x54, 0, 0, 0, 1],
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

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "boxlite-guest-net-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&d).expect("tempdir");
        d
    }

    #[test]
    fn file_contents() {
        let net = setup();
        assert_eq!(
            resolv_conf(Some(&net)),
            "# Written by boxlite at boot.\nnameserver 192.168.127.1\n"
        );
        assert!(!resolv_conf(None).contains("nameserver"));
        let h = hosts("mybox", Some(&net));
        assert!(h.contains("127.0.0.1\tlocalhost\n"), "{h}");
        assert!(h.contains("192.168.127.2\tmybox\n"), "{h}");
        assert!(
            h.contains("192.168.127.254\thost.boxlite.internal\n"),
            "{h}"
        );
        let h = hosts("mybox", None);
        assert!(
            h.contains("127.0.1.1\tmybox\n") && !h.contains("boxlite.internal"),
            "{h}"
        );
    }

    #[test]
    fn a_link_is_the_same_whatever_its_mac() {
        let a = setup();
        let b = GuestNetwork {
            mac: [2, 0, 0, 0, 0, 9],
            hosts: Vec::new(),
            ..setup()
        };
        assert!(same_link(&a, &b));
        let c = GuestNetwork {
            mtu: 1400,
            ..setup()
        };
        assert!(!same_link(&a, &c));
        let d = GuestNetwork {
            address: Ipv4Addr::new(10, 0, 0, 2),
            ..setup()
        };
        assert!(!same_link(&a, &d));
    }

    #[test]
    fn hostnames_are_sanitized() {
        assert_eq!(sanitize_hostname("web_1 (test)"), "web-1--test");
        assert_eq!(sanitize_hostname("__"), "boxlite");
        assert_eq!(sanitize_hostname(&"a".repeat(100)).len(), 63);
        assert_eq!(sanitize_hostname("01HZX.box"), "01HZX.box");
    }

    #[test]
    fn writes_files_and_replaces_symlinks() {
        let root = tempdir("files");
        // No etc yet: created.
        write_resolver_files(&root, "box1", None).expect("write");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).expect("read"),
            "box1\n"
        );
        // A symlinked resolv.conf is replaced, its target left alone.
        let target = root.join("elsewhere");
        std::fs::write(&target, "keep").expect("target");
        std::fs::remove_file(root.join("etc/resolv.conf")).expect("rm");
        std::os::unix::fs::symlink(&target, root.join("etc/resolv.conf")).expect("symlink");
        write_resolver_files(&root, "box1", Some(&setup())).expect("rewrite");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        let meta = std::fs::symlink_metadata(root.join("etc/resolv.conf")).expect("meta");
        assert!(meta.is_file());
        assert!(std::fs::read_to_string(root.join("etc/resolv.conf"))
            .expect("read")
            .contains("nameserver 192.168.127.1"));
        // A plain file is rewritten in place (same inode); a hard-linked one is replaced.
        let hosts = root.join("etc/hosts");
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&hosts);
        write_resolver_files(&root, "box2", Some(&setup())).expect("rewrite");
        assert_eq!(inode(&hosts), before);
        assert!(std::fs::read_to_string(&hosts)
            .unwrap()
            .contains("\tbox2\n"));
        let shared = root.join("shared-hostname");
        std::fs::hard_link(root.join("etc/hostname"), &shared).expect("link");
        write_resolver_files(&root, "box3", Some(&setup())).expect("rewrite");
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "box2\n");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "box3\n"
        );
        // A longer text shrinks back cleanly.
        write_resolver_files(&root, &"x".repeat(60), None).expect("long");
        write_resolver_files(&root, "b", None).expect("short");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "b\n"
        );
        // An etc that is a symlink is refused.
        let other = tempdir("etc-link");
        std::os::unix::fs::symlink(&target, other.join("etc")).expect("symlink");
        assert!(write_resolver_files(&other, "b", None).is_err());
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn sockaddr_encoding() {
        let sa = sockaddr(Ipv4Addr::new(192, 168, 127, 2));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // Port (2 bytes) then the address in network order.
        assert_eq!(
            &sa.sa_data[2..6],
            &[192u8 as libc::c_char, 168u8 as libc::c_char, 127, 2]
        );
        assert!(if_name("eth0").is_ok());
        assert!(if_name("").is_err());
        assert!(if_name("a-very-long-interface-name").is_err());
    }
}
