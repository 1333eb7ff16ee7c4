//! Options of the runtime and of one box, validated before anything is done.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{BoxliteError, BoxliteResult};
use crate::units::{Bytes, Seconds};

/// How a runtime is set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxliteOptions {
    /// Where boxes, images and state live. Default: `$BOXLITE_HOME`, else `~/.boxlite`.
    pub home_dir: PathBuf,
    /// How long a guest may take from engine start to its agent reporting ready.
    pub boot_timeout: Seconds,
    /// How long a graceful stop may take before the engine is killed.
    pub stop_timeout: Seconds,
    /// The guest bundle shipped with the installed package, searched after
    /// `$BOXLITE_GUEST_DIR` and before `<home>/guest`.
    pub guest_dir: Option<PathBuf>,
    /// The `boxlite-shim` binary shipped with the installed package.
    pub shim_path: Option<PathBuf>,
    /// Boxes booting at once; more wait their turn (a burst queues instead of thrashing).
    /// Default: the number of host CPUs.
    pub max_concurrent_boots: usize,
    /// Registries: transport, TLS, credentials, and which are searched for short names
    /// (before Docker Hub). Merged with `$BOXLITE_REGISTRIES` and `<home>/registries.json`.
    #[serde(default)]
    pub image_registries: Vec<crate::images::ImageRegistry>,
    /// Start new boxes from memory templates when one fits (made in the background after the
    /// first box of each image and shape). Default: on, unless `BOXLITE_TEMPLATES=0`.
    #[serde(default = "templates_default")]
    pub templates: bool,
}

fn templates_default() -> bool {
    std::env::var("BOXLITE_TEMPLATES").map_or(true, |v| v != "0")
}

impl BoxliteOptions {
    pub fn with_home(home_dir: impl Into<PathBuf>) -> Self {
        Self {
            home_dir: home_dir.into(),
            ..Self::default()
        }
    }
}

impl Default for BoxliteOptions {
    fn default() -> Self {
        Self {
            home_dir: default_home(),
            boot_timeout: Seconds::from_secs(60),
            stop_timeout: Seconds::from_secs(10),
            guest_dir: None,
            shim_path: None,
            max_concurrent_boots: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            image_registries: Vec::new(),
            templates: templates_default(),
        }
    }
}

/// `$BOXLITE_HOME`, else `~/.boxlite`, else `./.boxlite` when there is no home at all.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("BOXLITE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".boxlite"))
        .unwrap_or_else(|| PathBuf::from(".boxlite"))
}

/// What one box is made of: the one model of a box, validated here and stored in the state
/// database. Fields added by later releases default when an older record is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxOptions {
    /// An OCI image layout directory (`index.json`, `blobs/`) to boot from.
    pub rootfs_path: Option<PathBuf>,
    /// An image reference (`alpine`, `python:slim`, `registry:5000/app@sha256:...`).
    pub image: Option<String>,
    /// A unique, human name for the box.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory: Bytes,
    /// Default working directory of commands (else the image's).
    pub working_dir: Option<String>,
    /// Added to the image's environment; commands may add more.
    pub env: Vec<(String, String)>,
    /// Default user of commands (else the image's).
    pub user: Option<String>,
    /// The box's disk size; never smaller than the image (the guest filesystem grows to it).
    pub disk_size: Option<Bytes>,
    /// Replaces the image's ENTRYPOINT in the box's default command (and drops its CMD).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD in the box's default command.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// The default command runs under a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Outbound network access (enabled, to the whole internet, by default).
    #[serde(default)]
    pub network: NetworkOptions,
    /// Guest TCP ports published on the host.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Host folders mounted in the box (virtio-fs). Host paths are canonical once created.
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// How the box's commands are confined inside the guest (capabilities, seccomp);
    /// Docker's defaults unless the caller changes them.
    #[serde(default)]
    pub sandbox: boxlite_proto::GuestSandbox,
    /// Remove the box (disk and record) when it stops.
    pub auto_remove: bool,
    /// Keep the VM running after the creating process exits; any process with the same
    /// home can `get` it later. Needs `auto_remove` off (a detached box outlives its handle).
    pub detach: bool,
}

impl Default for BoxOptions {
    /// The published package's defaults: 1 CPU, 1 GiB, removed when stopped, not detached.
    fn default() -> Self {
        Self {
            rootfs_path: None,
            image: None,
            name: None,
            cpus: 1,
            memory: Bytes::from_mib(1024),
            working_dir: None,
            env: Vec::new(),
            user: None,
            disk_size: None,
            entrypoint: None,
            cmd: None,
            tty: false,
            network: NetworkOptions::default(),
            ports: Vec::new(),
            volumes: Vec::new(),
            sandbox: Default::default(),
            auto_remove: true,
            detach: false,
        }
    }
}

/// A box's network: off (the guest has no interface at all), or on with an allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOptions {
    pub enabled: bool,
    /// Where the box may connect: host names, `*.wildcard` names, IPs and CIDRs; empty means
    /// the public internet. The host's own loopback is reachable only as
    /// `host.boxlite.internal`, and only when listed.
    #[serde(default)]
    pub allow_net: Vec<String>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_net: Vec::new(),
        }
    }
}

impl NetworkOptions {
    /// From the published API's words: `mode` "enabled" or "disabled".
    pub fn from_mode(mode: &str, allow_net: Vec<String>) -> BoxliteResult<Self> {
        let enabled = match mode {
            "enabled" => true,
            "disabled" => false,
            other => {
                return Err(BoxliteError::invalid(
                    "network",
                    format!("invalid network mode {other:?}: expected \"enabled\" or \"disabled\""),
                ))
            }
        };
        Ok(Self { enabled, allow_net })
    }

    pub fn mode(&self) -> &'static str {
        if self.enabled {
            "enabled"
        } else {
            "disabled"
        }
    }

    pub fn disabled() -> Self {
        Self {
            enabled: false,
            allow_net: Vec::new(),
        }
    }
}

/// The transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    Tcp,
    Udp,
}

impl PortProtocol {
    pub fn parse(text: &str) -> BoxliteResult<Self> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(BoxliteError::invalid(
                "ports",
                format!(
                    "protocol {other:?} must be \"tcp\" (or \"udp\", which is not supported yet)"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A guest port published on the host: connections to `host_ip:host_port` reach
/// `guest_port` in the box. `host_port` 0 takes a free port (see the box's info).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub host_ip: std::net::IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: PortProtocol,
}

impl PortSpec {
    /// `host_port` -> `guest_port` over TCP on the host's loopback (`127.0.0.1`).
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        Self {
            host_ip: DEFAULT_PORT_HOST_IP,
            host_port,
            guest_port,
            protocol: PortProtocol::Tcp,
        }
    }
}

/// Published ports listen on the host's loopback unless told otherwise.
pub const DEFAULT_PORT_HOST_IP: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn validate_network(network: &NetworkOptions, ports: &[PortSpec]) -> BoxliteResult<()> {
    if !network.enabled && !network.allow_net.is_empty() {
        return Err(BoxliteError::invalid(
            "network",
            "allow_net is given but the network is disabled; enable it or drop allow_net",
        ));
    }
    for entry in &network.allow_net {
        entry
            .parse::<boxlite_net::AllowEntry>()
            .map_err(|e| BoxliteError::invalid("allow_net", e.to_string()))?;
    }
    if !network.enabled && !ports.is_empty() {
        return Err(BoxliteError::invalid(
            "ports",
            "published ports need the network: enable it or drop the ports",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for port in ports {
        if port.protocol == PortProtocol::Udp {
            return Err(BoxliteError::Unsupported(
                "UDP port publishing (publish TCP ports)".into(),
            ));
        }
        if port.guest_port == 0 {
            return Err(BoxliteError::invalid(
                "ports",
                "a guest port must be 1 to 65535",
            ));
        }
        if port.host_port != 0 && !seen.insert((port.host_ip, port.host_port)) {
            return Err(BoxliteError::invalid(
                "ports",
                format!("{}:{} is published twice", port.host_ip, port.host_port),
            ));
        }
    }
    Ok(())
}

/// A host folder in the box: `host_path` (a directory) mounted at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub host_path: PathBuf,
    pub guest_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Box paths a volume may not cover: the box init mounts its own /proc, /sys and /dev
/// there, and a volume over `/` would replace the image.
const RESERVED_GUEST_PATHS: &[&str] = &["/proc", "/sys", "/dev"];

impl VolumeSpec {
    pub fn new(
        host_path: impl Into<PathBuf>,
        guest_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        Self {
            host_path: host_path.into(),
            guest_path: guest_path.into(),
            read_only,
        }
    }

    /// The host folder as it is now: must exist and be a directory (errors name it).
    pub fn check_host_path(&self) -> BoxliteResult<()> {
        match std::fs::metadata(&self.host_path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(BoxliteError::invalid(
                "volumes",
                format!("host path {} is not a directory", self.host_path.display()),
            )),
            Err(e) => Err(BoxliteError::invalid(
                "volumes",
                format!(
                    "host path {} cannot be used: {e}; create the folder or fix the path",
                    self.host_path.display()
                ),
            )),
        }
    }

    fn validate(&self) -> BoxliteResult<()> {
        self.check_host_path()?;
        validate_box_path("volumes", &self.guest_path)?;
        let guest = std::path::Path::new(&self.guest_path);
        if guest
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(BoxliteError::invalid(
                "volumes",
                format!("guest path {:?} must not contain '..'", self.guest_path),
            ));
        }
        let reserved =
            guest.parent().is_none() || RESERVED_GUEST_PATHS.iter().any(|r| guest.starts_with(r));
        if reserved {
            return Err(BoxliteError::invalid(
                "volumes",
                format!(
                    "guest path {:?} is reserved (/, /proc, /sys and /dev belong to the box); mount the folder elsewhere",
                    self.guest_path
                ),
            ));
        }
        Ok(())
    }
}

fn validate_volumes(volumes: &[VolumeSpec]) -> BoxliteResult<()> {
    let mut seen = std::collections::HashSet::new();
    for volume in volumes {
        volume.validate()?;
        let normal: PathBuf = std::path::Path::new(&volume.guest_path)
            .components()
            .collect();
        if !seen.insert(normal) {
            return Err(BoxliteError::invalid(
                "volumes",
                format!("guest path {:?} is mounted twice", volume.guest_path),
            ));
        }
    }
    Ok(())
}

/// The smallest guest that boots the agent with room for a command.
pub const MIN_MEMORY: Bytes = Bytes::from_mib(128);

impl BoxOptions {
    /// Checks every field against this host; the error names the field and the fix.
    pub fn validate(&self) -> BoxliteResult<()> {
        match (&self.rootfs_path, &self.image) {
            (None, None) => {
                return Err(BoxliteError::invalid(
                    "rootfs_path",
                    "give an OCI image layout directory (rootfs_path) or an image",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(BoxliteError::invalid(
                    "image",
                    "give either image or rootfs_path, not both",
                ))
            }
            (None, Some(image)) => {
                crate::images::Reference::parse(image)?;
            }
            _ => {}
        }
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        if self.cpus == 0 || self.cpus > host_cpus {
            return Err(BoxliteError::invalid(
                "cpus",
                format!(
                    "{} is out of range: this host has {host_cpus} CPUs, use 1 to {host_cpus}",
                    self.cpus
                ),
            ));
        }
        if self.memory < MIN_MEMORY {
            return Err(BoxliteError::invalid(
                "memory",
                format!("{} is below the minimum of {MIN_MEMORY}", self.memory),
            ));
        }
        if let Some(host) = crate::sys::host_memory() {
            if self.memory > host {
                return Err(BoxliteError::invalid(
                    "memory",
                    format!("{} is more than this host's {host}", self.memory),
                ));
            }
        }
        if let Some(dir) = &self.working_dir {
            validate_box_path("working_dir", dir)?;
        }
        validate_env("env", &self.env)?;
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        for (field, argv) in [("entrypoint", &self.entrypoint), ("cmd", &self.cmd)] {
            if let Some(argv) = argv {
                validate_argv(field, argv)?;
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.contains('\0') {
                return Err(BoxliteError::invalid(
                    "user",
                    "give a user name or uid, optionally with :group or :gid",
                ));
            }
        }
        validate_network(&self.network, &self.ports)?;
        validate_volumes(&self.volumes)?;
        if self.detach && self.auto_remove {
            return Err(BoxliteError::invalid(
                "detach",
                "a detached box must outlive its handle: set auto_remove=False (or auto_delete=0)",
            ));
        }
        if let Some(size) = self.disk_size {
            if size < Bytes::from_mib(256) {
                return Err(BoxliteError::invalid(
                    "disk_size",
                    format!("{size} is below the minimum of 256 MiB"),
                ));
            }
        }
        Ok(())
    }
}

impl BoxOptions {
    /// Resolves each volume's host path once (symlinks, `..`), so that later starts use the
    /// folder that was checked. Call after `validate`.
    pub fn canonicalize_volumes(&mut self) -> BoxliteResult<()> {
        for volume in &mut self.volumes {
            volume.host_path = std::fs::canonicalize(&volume.host_path).map_err(|e| {
                BoxliteError::invalid(
                    "volumes",
                    format!("host path {}: {e}", volume.host_path.display()),
                )
            })?;
        }
        Ok(())
    }
}

/// A path inside the box: absolute, no NUL.
pub(crate) fn validate_box_path(field: &str, path: &str) -> BoxliteResult<()> {
    if !path.starts_with('/') {
        return Err(BoxliteError::invalid(
            field,
            format!("{path:?} must be an absolute path inside the box"),
        ));
    }
    if path.contains('\0') {
        return Err(BoxliteError::invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

/// Words of a command line: no NUL bytes (they cannot cross `execve`).
pub(crate) fn validate_argv(field: &str, argv: &[String]) -> BoxliteResult<()> {
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(BoxliteError::invalid(
            field,
            "arguments cannot contain NUL bytes",
        ));
    }
    Ok(())
}

/// Environment names must be non-empty and free of `=` and NUL; values free of NUL.
pub(crate) fn validate_env(field: &str, env: &[(String, String)]) -> BoxliteResult<()> {
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(BoxliteError::invalid(
                field,
                format!("variable name {key:?} must be non-empty and contain no '=' or NUL"),
            ));
        }
        if value.contains('\0') {
            return Err(BoxliteError::invalid(
                field,
                format!("value of {key} contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_name(name: &str) -> BoxliteResult<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(ok_char)
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !valid {
        return Err(BoxliteError::invalid(
            "name",
            format!("{name:?}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_box() -> BoxOptions {
        BoxOptions {
            rootfs_path: Some("/x".into()),
            memory: Bytes::from_mib(256),
            ..BoxOptions::default()
        }
    }

    #[test]
    fn defaults_validate() {
        layout_box().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(BoxOptions, &str)> = vec![
            (BoxOptions::default(), "rootfs_path"),
            (
                BoxOptions {
                    image: Some("a".into()),
                    ..layout_box()
                },
                "image",
            ),
            (
                BoxOptions {
                    cpus: 0,
                    ..layout_box()
                },
                "cpus",
            ),
            (
                BoxOptions {
                    cpus: 100_000,
                    ..layout_box()
                },
                "cpus",
            ),
            (
                BoxOptions {
                    memory: Bytes::from_mib(64),
                    ..layout_box()
                },
                "memory",
            ),
            (
                BoxOptions {
                    memory: Bytes::from_gib(1 << 20),
                    ..layout_box()
                },
                "memory",
            ),
            (
                BoxOptions {
                    working_dir: Some("tmp".into()),
                    ..layout_box()
                },
                "working_dir",
            ),
            (
                BoxOptions {
                    env: vec![("A=B".into(), "1".into())],
                    ..layout_box()
                },
                "env",
            ),
            (
                BoxOptions {
                    env: vec![("A\0".into(), "1".into())],
                    ..layout_box()
                },
                "env",
            ),
            (
                BoxOptions {
                    env: vec![("".into(), "1".into())],
                    ..layout_box()
                },
                "env",
            ),
            (
                BoxOptions {
                    name: Some("-bad".into()),
                    ..layout_box()
                },
                "name",
            ),
            (
                BoxOptions {
                    name: Some("a b".into()),
                    ..layout_box()
                },
                "name",
            ),
            (
                BoxOptions {
                    cmd: Some(vec!["a\0b".into()]),
                    ..layout_box()
                },
                "cmd",
            ),
            (
                BoxOptions {
                    entrypoint: Some(vec!["\0".into()]),
                    ..layout_box()
                },
                "entrypoint",
            ),
            (
                BoxOptions {
                    user: Some(String::new()),
                    ..layout_box()
                },
                "user",
            ),
            (
                BoxOptions {
                    detach: true,
                    ..layout_box()
                },
                "detach",
            ),
            (
                BoxOptions {
                    network: NetworkOptions {
                        enabled: true,
                        allow_net: vec!["http://example.com".into()],
                    },
                    ..layout_box()
                },
                "allow_net",
            ),
            (
                BoxOptions {
                    network: NetworkOptions {
                        enabled: false,
                        allow_net: vec!["example.com".into()],
                    },
                    ..layout_box()
                },
                "network",
            ),
            (
                BoxOptions {
                    network: NetworkOptions::disabled(),
                    ports: vec![PortSpec::tcp(8080, 80)],
                    ..layout_box()
                },
                "ports",
            ),
            (
                BoxOptions {
                    ports: vec![PortSpec::tcp(8080, 80), PortSpec::tcp(8080, 81)],
                    ..layout_box()
                },
                "ports",
            ),
            (
                BoxOptions {
                    ports: vec![PortSpec::tcp(8080, 0)],
                    ..layout_box()
                },
                "ports",
            ),
        ];
        for (options, field) in cases {
            let err = options.validate().unwrap_err();
            match err {
                BoxliteError::InvalidArgument { field: f, .. } => assert_eq!(f, field),
                other => panic!("{field}: unexpected {other}"),
            }
        }
    }

    #[test]
    fn volumes_are_checked_and_canonicalized() {
        let dir = std::env::temp_dir().join(format!("boxlite-vol-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let with = |host: &std::path::Path, guest: &str| BoxOptions {
            volumes: vec![VolumeSpec::new(host, guest, false)],
            ..layout_box()
        };
        let bad = [
            with(&dir.join("missing"), "/data"),
            with(&file, "/data"),
            with(&dir, "data"),
            with(&dir, "/"),
            with(&dir, "/proc"),
            with(&dir, "/sys/x"),
            with(&dir, "/dev"),
            with(&dir, "/a/../proc"),
            BoxOptions {
                volumes: vec![
                    VolumeSpec::new(&dir, "/data", false),
                    VolumeSpec::new(&dir, "/data/", true),
                ],
                ..layout_box()
            },
        ];
        for options in bad {
            match options.validate().unwrap_err() {
                BoxliteError::InvalidArgument { field, .. } => assert_eq!(field, "volumes"),
                other => panic!("{options:?}: unexpected {other}"),
            }
        }
        let mut good = with(&dir.join("sub/.."), "/data");
        good.validate().unwrap();
        good.canonicalize_volumes().unwrap();
        assert_eq!(
            good.volumes[0].host_path,
            std::fs::canonicalize(&dir).unwrap()
        );
        with(&dir, "/devices").validate().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn udp_ports_are_unsupported_and_good_networks_pass() {
        let udp = BoxOptions {
            ports: vec![PortSpec {
                protocol: PortProtocol::Udp,
                ..PortSpec::tcp(53, 53)
            }],
            ..layout_box()
        };
        assert_eq!(udp.validate().unwrap_err().kind(), "unsupported");
        BoxOptions {
            network: NetworkOptions {
                enabled: true,
                allow_net: vec![
                    "pypi.org".into(),
                    "*.github.com".into(),
                    "10.0.0.0/8".into(),
                    "1.2.3.4".into(),
                    "host.boxlite.internal".into(),
                ],
            },
            ports: vec![
                PortSpec::tcp(0, 80),
                PortSpec::tcp(0, 81),
                PortSpec::tcp(8080, 8080),
            ],
            ..layout_box()
        }
        .validate()
        .unwrap();
        assert_eq!(PortProtocol::parse("TCP").unwrap(), PortProtocol::Tcp);
        assert!(PortProtocol::parse("sctp").is_err());
    }

    #[test]
    fn defaults_follow_the_published_package() {
        let d = BoxOptions::default();
        assert_eq!((d.cpus, d.memory.as_mib()), (1, 1024));
        assert!(d.auto_remove && !d.detach && !d.tty);
        let detached = BoxOptions {
            detach: true,
            auto_remove: false,
            ..layout_box()
        };
        detached.validate().unwrap();
    }

    #[test]
    fn records_of_the_previous_release_read_with_defaults() {
        let old = r#"{"rootfs_path":"img","image":null,"name":"legacy","cpus":1,"memory":268435456,"working_dir":"/tmp","env":[["A","1"]],"user":null,"disk_size":null,"auto_remove":false,"detach":false}"#;
        let options: BoxOptions = serde_json::from_str(old).unwrap();
        assert_eq!(options.entrypoint, None);
        assert_eq!(options.cmd, None);
        assert!(!options.tty);
        assert_eq!(options.memory.as_mib(), 256);
    }

    #[test]
    fn home_follows_the_environment() {
        // Only checks the shape: the variable may or may not be set by the caller.
        assert!(!default_home().as_os_str().is_empty());
    }
}
