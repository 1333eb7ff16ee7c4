//! The QEMU engine: `qemu-system-<arch>` from the OS packages, one child process per VM.

pub mod qmp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Accel, DiskFormat, Engine, FsDevice, MemorySource, VmConfig, CONSOLE_LOG_LIMIT};
use crate::error::{BoxliteError, BoxliteResult};
use crate::process::{ChildOptions, GuardedChild};

/// Kernel parameters that shorten a boot under a software CPU and keep the console quiet
/// (measured in guest/README.md): no crypto self-tests at boot, no patching out of `lock`
/// prefixes (self-modifying code is slow under TCG), a panic ends the VM.
const BASE_KERNEL_ARGS: &[&str] = &[
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "loglevel=3",
    "cryptomgr.notests",
    "noreplace-smp",
];

#[derive(Debug, Clone)]
pub struct QemuEngine {
    binary: PathBuf,
}

impl QemuEngine {
    /// Finds the QEMU binary for this host's architecture (`$BOXLITE_QEMU` overrides).
    pub fn locate() -> BoxliteResult<Self> {
        let name = binary_name();
        if let Some(path) = std::env::var_os("BOXLITE_QEMU").filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(Self { binary: path })
            } else {
                Err(BoxliteError::engine_unavailable(
                    format!("BOXLITE_QEMU={} does not exist", path.display()),
                    format!("point it at a {name} binary or unset it"),
                ))
            };
        }
        find_in_path(name)
            .map(|binary| Self { binary })
            .ok_or_else(|| {
                BoxliteError::engine_unavailable(
                    format!("{name} not found in PATH"),
                    install_hint(),
                )
            })
    }

    /// An engine using exactly this binary.
    pub fn at(binary: PathBuf) -> Self {
        Self { binary }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The full argument list for `config` (public for tests and `boxlite info`).
    pub fn args(&self, config: &VmConfig) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        // The machine version is pinned: a saved state loads only into the same one, and the
        // `q35` alias moves with QEMU upgrades.
        let machine = match std::env::consts::ARCH {
            "aarch64" => "virt,memory-backend=mem",
            _ => "pc-q35-7.2,memory-backend=mem",
        };
        let cpu = match config.accel {
            Accel::Tcg => "max",
            Accel::Kvm | Accel::Hvf => "host",
        };
        // TCG's translation cache grows with what the guest runs (~52 MiB after a boot); 32 MiB
        // keeps an idle box's footprint down at no measurable boot cost (docs/benchmarks.md).
        let accel = match config.accel {
            Accel::Tcg => "tcg,tb-size=32",
            other => other.qemu_name(),
        };
        push(&["-name", &config.name]);
        push(&["-machine", machine, "-accel", accel, "-cpu", cpu]);
        let mib = config.memory.as_mib();
        push(&["-smp", &config.cpus.to_string(), "-m", &format!("{mib}M")]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&["-serial", "stdio"]);
        // QEMU confines itself: no new privileges, no spawning, no obsolete syscalls.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        args.push("-object".into());
        if config.volumes.is_empty() {
            args.push(memory_backend_arg(&config.memory_source, mib));
        } else {
            // vhost-user daemons map the guest's RAM: it must be shareable.
            args.push(format!("memory-backend-memfd,id=mem,size={mib}M,share=on").into());
        }
        if config.memory_source != MemorySource::Anonymous && config.volumes.is_empty() {
            // A device that cannot be saved would make the saved state useless.
            args.push("-only-migratable".into());
        }
        args.push("-kernel".into());
        args.push(config.kernel.clone().into());
        if let Some(initramfs) = &config.initramfs {
            args.push("-initrd".into());
            args.push(initramfs.clone().into());
        }
        let mut kernel_args: Vec<&str> = BASE_KERNEL_ARGS.to_vec();
        kernel_args.extend(config.kernel_args.iter().map(String::as_str));
        if !config.volumes.is_empty() {
            // The agent mounts them at `Configure`, before the box's namespaces exist.
            kernel_args.push("boxlite.volumes=1");
        }
        args.push("-append".into());
        args.push(kernel_args.join(" ").into());

        args.push("-device".into());
        args.push("virtio-serial-pci,id=vser0".into());
        args.push("-chardev".into());
        args.push(chardev_socket_arg(&config.agent_socket));
        args.push("-device".into());
        args.push(
            format!(
                "virtserialport,bus=vser0.0,chardev=agent,name={}",
                boxlite_proto::GUEST_PORT_NAME
            )
            .into(),
        );

        if let Some(net) = &config.network {
            let mut netdev = OsString::from("stream,id=net0,server=off,addr.type=unix,addr.path=");
            netdev.push(escape_commas(net.socket.as_os_str()));
            args.push("-netdev".into());
            args.push(netdev);
            args.push("-device".into());
            // No option ROM: the guest boots from -kernel, never from the network.
            args.push(format!("virtio-net-pci,netdev=net0,romfile=,mac={}", net.mac).into());
        }

        if let Some(qmp) = &config.qmp_socket {
            let mut arg = OsString::from("unix:");
            arg.push(escape_commas(qmp.as_os_str()));
            arg.push(",server=on,wait=off");
            args.push("-qmp".into());
            args.push(arg);
        }
        if config.incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }

        for (index, fs) in config.volumes.iter().enumerate() {
            args.extend(fs_device_args(index, fs));
        }

        for (index, disk) in config.disks.iter().enumerate() {
            let format = match disk.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            let cache = if disk.volatile { "unsafe" } else { "writeback" };
            let mut drive = OsString::from("file=");
            drive.push(escape_commas(disk.path.as_os_str()));
            // A full host filesystem is an I/O error the guest sees (and reports), not a VM
            // paused until someone frees space (QEMU's default).
            drive.push(format!(
                ",if=none,id=disk{index},format={format},cache={cache},discard=unmap,werror=report,rerror=report"
            ));
            args.push("-drive".into());
            args.push(drive);
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=disk{index}").into());
        }
        args
    }
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn spawn(&self, config: &VmConfig) -> BoxliteResult<GuardedChild> {
        let options = ChildOptions {
            log_path: config.console_log.clone(),
            log_limit: CONSOLE_LOG_LIMIT,
            die_with_parent: true,
            capture_stdout: false,
        };
        match &config.jail {
            Some(jail) => {
                let spec = super::jail::spec(&self.binary, config, jail)?;
                GuardedChild::spawn_jailed(&spec, &self.binary, &self.args(config), &options)
            }
            None => {
                let mut command = Command::new(&self.binary);
                command.args(self.args(config));
                Ok(GuardedChild::spawn(command, &options)?.0)
            }
        }
    }
}

fn memory_backend_arg(source: &MemorySource, mib: u64) -> OsString {
    let (path, share) = match source {
        MemorySource::Anonymous => {
            return format!("memory-backend-ram,id=mem,size={mib}M").into();
        }
        MemorySource::SharedFile(path) => (path, "on"),
        MemorySource::PrivateFile(path) => (path, "off"),
    };
    let mut arg = OsString::from(format!(
        "memory-backend-file,id=mem,size={mib}M,share={share},mem-path="
    ));
    arg.push(escape_commas(path.as_os_str()));
    arg
}

/// A virtio-fs device whose daemon listens on `fs.socket`.
fn fs_device_args(index: usize, fs: &FsDevice) -> Vec<OsString> {
    let mut chardev = OsString::from(format!("socket,id=fs{index},path="));
    chardev.push(escape_commas(fs.socket.as_os_str()));
    vec![
        "-chardev".into(),
        chardev,
        "-device".into(),
        format!(
            "vhost-user-fs-pci,chardev=fs{index},tag={},romfile=",
            fs.tag
        )
        .into(),
    ]
}

fn chardev_socket_arg(path: &Path) -> OsString {
    let mut arg = OsString::from("socket,id=agent,path=");
    arg.push(escape_commas(path.as_os_str()));
    arg
}

/// QEMU option values separate fields with commas; a literal comma is written twice.
fn escape_commas(value: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn binary_name() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    }
}

fn install_hint() -> &'static str {
    if cfg!(target_os = "macos") {
        "install QEMU (`brew install qemu`)"
    } else if std::env::consts::ARCH == "aarch64" {
        "install the qemu-system-arm package (`apt-get install qemu-system-arm`)"
    } else {
        "install the qemu-system-x86 package (`apt-get install qemu-system-x86`)"
    }
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Bytes;
    use crate::vmm::DiskAttachment;

    /// The engine's arguments for `config` as one line, for `contains` checks.
    fn joined_args(engine: &QemuEngine, config: &VmConfig) -> String {
        engine
            .args(config)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn config() -> VmConfig {
        VmConfig {
            name: "boxlite-test".into(),
            kernel: "/b/vmlinuz".into(),
            initramfs: Some("/b/initramfs.cpio".into()),
            kernel_args: vec!["boxlite.root=/dev/vda".into()],
            cpus: 2,
            memory: Bytes::from_mib(512),
            disks: vec![DiskAttachment {
                path: "/h/a,b.qcow2".into(),
                format: DiskFormat::Qcow2,
                volatile: false,
            }],
            agent_socket: "/h/agent.sock".into(),
            console_log: "/h/console.log".into(),
            accel: Accel::Tcg,
            network: None,
            jail: None,
            memory_source: MemorySource::Anonymous,
            qmp_socket: None,
            incoming: false,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn volumes_share_memory_and_add_one_device_each() {
        let engine = QemuEngine {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        let mut config = config();
        config.qmp_socket = Some("/h/qmp.sock".into());
        config.volumes = vec![
            FsDevice {
                tag: "vol0".into(),
                socket: "/h/f,s0.sock".into(),
            },
            FsDevice {
                tag: "vol1".into(),
                socket: "/h/fs1.sock".into(),
            },
        ];
        let joined = joined_args(&engine, &config);
        assert!(joined.contains("-object memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(!joined.contains("memory-backend-ram"));
        assert!(joined.contains("-chardev socket,id=fs0,path=/h/f,,s0.sock"));
        assert!(joined.contains("-device vhost-user-fs-pci,chardev=fs0,tag=vol0,romfile="));
        assert!(joined.contains("-device vhost-user-fs-pci,chardev=fs1,tag=vol1,romfile="));
        assert!(joined.contains("noreplace-smp boxlite.root=/dev/vda boxlite.volumes=1"));
        assert!(!joined.contains("-only-migratable"));
    }

    #[test]
    fn command_line_has_only_the_devices_a_box_uses() {
        let engine = QemuEngine {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        let args: Vec<String> = engine
            .args(&config())
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,tb-size=32 -cpu max"));
        assert!(joined.contains("-smp 2 -m 512M"));
        assert!(joined.contains("-nodefaults"));
        assert!(joined.contains("file=/h/a,,b.qcow2,if=none,id=disk0,format=qcow2,cache=writeback"));
        assert!(joined.contains("werror=report,rerror=report"));
        assert!(joined.contains("socket,id=agent,path=/h/agent.sock"));
        assert!(joined.contains("name=boxlite.agent"));
        assert!(joined.contains("console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests noreplace-smp boxlite.root=/dev/vda"));
        assert!(
            !joined.contains("netdev"),
            "no network device without a network"
        );
        assert_eq!(args.iter().filter(|a| *a == "-device").count(), 3);
        assert!(joined.contains("-machine pc-q35-7.2,memory-backend=mem"));
        assert!(joined.contains("-object memory-backend-ram,id=mem,size=512M"));
        assert!(!joined.contains("-qmp") && !joined.contains("-incoming"));
        assert!(!joined.contains("-only-migratable"));
    }

    #[test]
    fn templates_and_their_boxes_share_a_ram_file() {
        let engine = QemuEngine {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        let mut config = config();
        config.memory_source = MemorySource::SharedFile("/t/r,am".into());
        config.qmp_socket = Some("/h/qmp.sock".into());
        let joined = joined_args(&engine, &config);
        assert!(joined
            .contains("-object memory-backend-file,id=mem,size=512M,share=on,mem-path=/t/r,,am"));
        assert!(joined.contains("-only-migratable"));
        assert!(joined.contains("-qmp unix:/h/qmp.sock,server=on,wait=off"));
        config.memory_source = MemorySource::PrivateFile("/t/ram".into());
        config.incoming = true;
        let joined = joined_args(&engine, &config);
        assert!(joined.contains("share=off,mem-path=/t/ram"));
        assert!(joined.contains("-incoming defer"));
    }

    #[test]
    fn a_network_is_a_stream_netdev_without_option_rom() {
        let engine = QemuEngine {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        let mut config = config();
        config.network = Some(crate::vmm::NetDevice {
            socket: "/h/n,et.sock".into(),
            mac: "52:54:00:12:34:56".into(),
        });
        let joined: Vec<String> = engine
            .args(&config)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = joined.join(" ");
        assert!(joined
            .contains("-netdev stream,id=net0,server=off,addr.type=unix,addr.path=/h/n,,et.sock"));
        assert!(
            joined.contains("-device virtio-net-pci,netdev=net0,romfile=,mac=52:54:00:12:34:56")
        );
    }
}
