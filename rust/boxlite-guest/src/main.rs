//! The boxlite guest agent: PID 1 of every box VM.
//!
//! Boot: mount the pseudo filesystems, load the listed kernel modules, mount the box disk,
//! open the `boxlite.agent` virtio-serial port, say `Ready`, then serve the host's requests
//! (see `boxlite-proto`). Run with the hidden `__boxlite_tar` subcommand it is instead the
//! chrooted tar helper the agent spawns for copies and layer unpacking; run as `boxlite-init`
//! (PID 1 of a fresh pid namespace) it is the box init (`boxinit.rs`).

mod agent;
mod boxinit;
mod cmdline;
mod exec;
mod identity;
mod log;
mod metrics;
mod modules;
mod mounts;
mod net;
mod port;
mod reaper;
mod sandbox;
mod seccomp;
mod session;
mod sys;
mod tarfs;
mod user;
mod volumes;
mod warm;
mod workers;

use std::path::Path;
use std::time::Duration;

use boxlite_proto::GUEST_PORT_NAME;

use crate::log::log;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(exec::TAR_SUBCOMMAND) {
        std::process::exit(tarfs::helper_main(args.get(2..).unwrap_or(&[])));
    }
    if args.len() == 1 && args[0] == boxinit::ARGV0 && std::process::id() == 1 {
        boxinit::init_main();
    }
    if std::process::id() != 1 {
        eprintln!(
            "boxlite-guest is the init process of a boxlite VM and only runs as PID 1 \
             (the runtime puts it in the guest's initramfs)"
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| log!("panic: {info}")));
    // Non-dumpable: only a holder of CAP_SYS_PTRACE may trace the agent or read its memory
    // and descriptors through /proc. Exec children share this memory until they execute,
    // while already visible inside the box (see exec.rs).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // A panic escaping boot would end PID 1 and panic the kernel; power off cleanly instead.
    let _ = std::panic::catch_unwind(boot_and_serve);
    agent::power_off();
}

fn boot_and_serve() {
    mounts::early();
    log!(
        "boxlite-guest {} starting (uptime {} ms)",
        env!("CARGO_PKG_VERSION"),
        sys::uptime_ms()
    );
    let loaded = modules::load_all(Path::new("/etc/boxlite/modules"), Path::new("/lib/modules"));
    let cfg = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    for w in &cfg.warnings {
        log!("{w}");
    }
    mounts::loopback_up();
    let (mounts, root_error) = match mounts::mount_root(&cfg) {
        Ok(m) => (m, None),
        Err(e) => {
            log!("box root: {e}");
            (Vec::new(), Some(e))
        }
    };
    log!(
        "{loaded} modules loaded, root {} ({:?} mode), uptime {} ms",
        if root_error.is_none() {
            "mounted"
        } else {
            "NOT mounted"
        },
        cfg.mode,
        sys::uptime_ms()
    );
    let reaper = reaper::Reaper::start();
    // The box's namespaces are built once `Ready` is out (see Agent::serve).
    let box_init = (root_error.is_none() && cfg.mode == cmdline::Mode::Box)
        .then(|| boxinit::BoxInit::new(reaper.clone()));
    // With volumes, the box init waits for `Configure` to mount them first.
    let defer_box_init = cfg.volumes;
    let port = match port::open_port(GUEST_PORT_NAME, Duration::from_secs(10)) {
        Ok(p) => p,
        Err(e) => {
            log!("cannot open the agent port: {e}");
            return;
        }
    };
    let outbox = match port.try_clone().and_then(port::Outbox::start) {
        Ok(o) => o,
        Err(e) => {
            log!("cannot start the port writer: {e}");
            return;
        }
    };
    agent::Agent::new(outbox, reaper, root_error, mounts, box_init, defer_box_init).serve(port)
}
