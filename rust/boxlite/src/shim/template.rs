//! Making a template: `boxlite-shim --template <job.json>`, started in the background by the
//! runtime after the first cold box of a key. Boots the box's shape with its RAM in a file,
//! lets the agent settle (`PrepareTemplate`: sync, nothing random derived yet), stops the VM
//! and saves its device state, then seals the files and puts them in service.
//!
//! The VM is never continued after the save and never shut down: any guest write after the
//! stop would change the disk under every box started from it.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use boxlite_proto::Message;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

use crate::agent::REQUEST_TIMEOUT;
use crate::disks::{create_clone_prototype, create_overlay};
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::templates::{
    AgentInfo, KeyInputs, Template, TemplateStore, CLONE_FILE, OVERLAY_FILE, RAM_FILE, STATE_FILE,
};
use crate::units::{Bytes, Seconds};
use crate::vm::{launch, RamInState};
use crate::vmm::qemu::QemuEngine;
use crate::vmm::{JailConfig, MemorySource, VmConfig};

/// What to make: the shape of the first box of a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TemplateJob {
    pub qemu: PathBuf,
    pub home: PathBuf,
    pub inputs: KeyInputs,
    /// The box's VM config; its per-box paths are replaced with the template's own.
    pub vm: VmConfig,
    pub boot_timeout: Seconds,
}

/// Sends stdout and stderr to `path` (appended; started afresh once over its limit).
fn log_to(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let too_big =
        std::fs::metadata(path).is_ok_and(|m| m.len() > crate::templates::BUILD_LOG_LIMIT);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(!too_big)
        .write(true)
        .truncate(too_big)
        .open(path)?;
    for target in [1, 2] {
        // SAFETY: dup2 onto our own stdio descriptors.
        if unsafe { libc::dup2(file.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `boxlite-shim --template <job.json>`: makes the template, reports on stderr (the build
/// log), removes the job file.
pub(crate) fn main(job_path: Option<PathBuf>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let Some(job_path) = job_path else {
        eprintln!("usage: boxlite-shim --template TEMPLATE_JOB_JSON");
        return ExitCode::from(2);
    };
    let job = std::fs::read(&job_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<TemplateJob>(&bytes).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&job_path);
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            eprintln!("template job {}: {e}", job_path.display());
            return ExitCode::FAILURE;
        }
    };
    // The maker outlives a short-lived caller (the CLI), so it writes its own log rather than
    // a pipe that could close under it.
    if let Err(e) = log_to(&job.home.join("templates").join("build.log")) {
        eprintln!("template: cannot open the build log: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("template: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let key = job.inputs.key();
    match runtime.block_on(make(&job)) {
        Ok(Some(template)) => {
            eprintln!(
                "template {key}: made in {} ms at {}",
                template.manifest.build_ms,
                template.dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("template {key}: made by another process");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("template {key}: failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the job's template unless another process is making it or it exists; `None` then.
pub(crate) async fn make(job: &TemplateJob) -> BoxliteResult<Option<Template>> {
    let store = TemplateStore::new(&job.home)?;
    let key = job.inputs.key();
    let Some(build) = store.begin_build(&key)? else {
        return Ok(None);
    };
    let started = Instant::now();
    let dir = build.dir().to_path_buf();
    let sockets = crate::vm::socket_dir(&dir, &format!("template-{key}"))?;
    let result = boot_and_save(job, &dir, &sockets).await;
    // Everything but the template's own files goes, whatever happened.
    for leftover in ["agent.sock", "qmp.sock", "net.sock"] {
        let _ = std::fs::remove_file(sockets.join(leftover));
    }
    if sockets != dir {
        let _ = std::fs::remove_dir(&sockets);
    }
    let _ = std::fs::remove_dir_all(dir.join("jail"));
    let agent = result?;
    let _ = std::fs::remove_file(dir.join("console.log"));
    create_clone_prototype(
        &build.final_dir().join(OVERLAY_FILE),
        &dir.join(CLONE_FILE),
        job.inputs.disk_size,
    )
    .await?;
    reclaim_ownership(&dir)?;
    let template = build.commit(
        job.inputs.clone(),
        agent,
        started.elapsed().as_millis() as u64,
    )?;
    Ok(Some(template))
}

async fn boot_and_save(job: &TemplateJob, dir: &Path, sockets: &Path) -> BoxliteResult<AgentInfo> {
    let overlay = dir.join(OVERLAY_FILE);
    create_overlay(
        &job.inputs.base_disk,
        &overlay,
        Some(Bytes::from_bytes(job.inputs.disk_size)),
    )
    .await?;
    let mut vm = job.vm.clone();
    vm.name = format!("boxlite-template-{}", &job.inputs.key()[..12]);
    vm.disks[0].path = overlay;
    vm.agent_socket = sockets.join("agent.sock");
    vm.qmp_socket = Some(sockets.join("qmp.sock"));
    vm.console_log = dir.join("console.log");
    vm.memory_source = MemorySource::SharedFile(dir.join(RAM_FILE));
    vm.incoming = false;
    // The template's network device needs a peer while it runs; the guest's interface is
    // down until a box configures it, so nothing is sent.
    let net_peer = match &mut vm.network {
        Some(net) => {
            net.socket = sockets.join("net.sock");
            let _ = std::fs::remove_file(&net.socket);
            Some(
                UnixListener::bind(&net.socket)
                    .ctx(|| format!("listening on {}", net.socket.display()))?,
            )
        }
        None => None,
    };
    vm.jail = vm.jail.take().map(|box_jail| JailConfig {
        root: dir.join("jail"),
        engine_binds: box_jail.engine_binds,
        id_key: format!("template-{}", job.inputs.key()),
        rw_dirs: std::iter::once(dir.to_path_buf())
            .chain((sockets != dir).then(|| sockets.to_path_buf()))
            .collect(),
        ro_paths: vec![job.inputs.base_disk.clone()],
        rw_files: Vec::new(),
    });
    let drain = net_peer.map(|listener| tokio::spawn(discard_frames(listener)));
    // The link every box of the template gets (its MAC aside), up before the save.
    let link = match &vm.network {
        Some(net) => Some(boxlite_net::guest_network(
            &boxlite_net::NetworkConfig::new(parse_mac(&net.mac)?),
        )),
        None => None,
    };

    let engine = QemuEngine::at(job.qemu.clone());
    let running = launch(&engine, &vm, job.boot_timeout).await?;
    let outcome = async {
        let Message::Ready {
            version,
            agent_version,
            ..
        } = &running.ready
        else {
            return Err(BoxliteError::protocol(
                "the template's agent did not say Ready",
            ));
        };
        let agent = AgentInfo {
            protocol: *version,
            agent_version: agent_version.clone(),
        };
        match running
            .client
            .reply_within(
                Message::PrepareTemplate { link: link.clone() },
                REQUEST_TIMEOUT,
            )
            .await?
        {
            Message::Done => {}
            other => {
                return Err(BoxliteError::protocol(format!(
                    "unexpected reply to PrepareTemplate: {other:?}"
                )))
            }
        }
        let mut qmp = running.qmp.ok_or_else(|| {
            BoxliteError::Internal("the template VM has no control socket".into())
        })?;
        // The agent connection stays open (and quiet) across the save: a box restored from
        // the template finds it as it was and speaks first.
        let state_path = dir.join(STATE_FILE);
        let state = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&state_path)
            .ctx(|| format!("creating {}", state_path.display()))?;
        crate::vm::save_state(&mut qmp, &state, &state_path, RamInState::Excluded).await?;
        let _ = qmp.quit().await;
        Ok(agent)
    }
    .await;
    running.child.kill_and_wait().await;
    if let Some(drain) = drain {
        drain.abort();
    }
    outcome
}

fn parse_mac(text: &str) -> BoxliteResult<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| BoxliteError::invalid("mac", format!("{text:?} is not a MAC")))?;
    }
    if parts.next().is_some() {
        return Err(BoxliteError::invalid(
            "mac",
            format!("{text:?} is not a MAC"),
        ));
    }
    Ok(mac)
}

async fn discard_frames(listener: UnixListener) {
    if let Ok((mut stream, _)) = listener.accept().await {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    }
}

/// The jailed engine wrote the files as its own id; they become the home owner's again
/// before they are sealed, so no engine id can change their modes later.
fn reclaim_ownership(dir: &Path) -> BoxliteResult<()> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .ctx(|| format!("taking back {}", path.display()))
    };
    chown(dir)?;
    for name in [RAM_FILE, STATE_FILE, OVERLAY_FILE] {
        chown(&dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_from_their_text() {
        assert_eq!(
            parse_mac("02:b0:0a:ff:00:1c").unwrap(),
            [0x02, 0xb0, 0x0a, 0xff, 0x00, 0x1c]
        );
        for bad in [
            "",
            "02:b0:0a:ff:00",
            "02:b0:0a:ff:00:1c:00",
            "zz:b0:0a:ff:00:1c",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
