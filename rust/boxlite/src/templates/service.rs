//! A runtime's use of templates: which one a new box may start from, making missing ones in
//! the background, retiring bad ones.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::key::{engine_version, normalized_args, HashCache, KeyInputs, TEMPLATE_FORMAT};
use super::store::{Lookup, Template, TemplateStore};
use crate::error::BoxliteResult;
use crate::process::{ChildOptions, GuardedChild};
use crate::shim::template::TemplateJob;
use crate::vm::VmEnv;
use crate::vmm::qemu::QemuEngine;
use crate::vmm::VmConfig;

/// Bytes of template-build output kept (`<home>/templates/build.log`).
pub(crate) const BUILD_LOG_LIMIT: u64 = 256 * 1024;

#[derive(Debug)]
pub(crate) struct Templates {
    store: TemplateStore,
    /// Template makers this runtime started: `close` waits for them.
    builds: Mutex<Vec<GuardedChild>>,
    /// Keys whose files this process has read in full and found intact.
    verified: Arc<Mutex<HashSet<String>>>,
}

impl Templates {
    pub fn open(home: &Path) -> BoxliteResult<Self> {
        let store = TemplateStore::new(home)?;
        std::fs::create_dir_all(store.root().join("jobs"))
            .map_err(|e| crate::error::BoxliteError::io("creating the template job area", e))?;
        Ok(Self {
            store,
            builds: Mutex::new(Vec::new()),
            verified: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    pub fn store(&self) -> &TemplateStore {
        &self.store
    }

    /// The key inputs of a box of this VM shape, image and disk (hashes files: blocking).
    pub fn key_inputs(
        templates_root: &Path,
        env: &VmEnv,
        vm: &VmConfig,
        image: &str,
        base_disk: &Path,
        disk_size: u64,
    ) -> std::io::Result<KeyInputs> {
        let hashes = HashCache::new(templates_root);
        let digests = hashes.digests(&[&env.qemu, &env.bundle.kernel, &env.bundle.initramfs])?;
        let engine = QemuEngine::at(env.qemu.clone());
        Ok(KeyInputs {
            format: TEMPLATE_FORMAT,
            engine_version: hashes
                .remembered(&env.qemu, "version", || engine_version(&env.qemu))?,
            engine_sha256: digests[0].clone(),
            engine_args: normalized_args(&engine, vm),
            kernel_sha256: digests[1].clone(),
            initramfs_sha256: digests[2].clone(),
            protocol: boxlite_proto::PROTOCOL_VERSION,
            image: image.to_string(),
            base_disk: base_disk.to_path_buf(),
            disk_size,
        })
    }

    /// The template to start a box of `key` from, if one is in service and intact. A bad one
    /// is retired (and remade later). Its RAM file is read in full once per process, in the
    /// background; boxes started meanwhile rely on the stamp check every use makes.
    pub fn usable(&self, key: &str) -> Option<Template> {
        match self.store.lookup(key) {
            Lookup::Found(template) => {
                self.verify_in_background(&template);
                Some(*template)
            }
            Lookup::Missing => None,
            Lookup::Invalid(reason) => {
                tracing::warn!(%key, %reason, "retiring a template that failed its checks");
                self.store.retire(key);
                None
            }
        }
    }

    pub fn retire(&self, key: &str) {
        self.store.retire(key);
    }

    fn verify_in_background(&self, template: &Template) {
        let key = template.manifest.key.clone();
        {
            let Ok(mut verified) = self.verified.lock() else {
                return;
            };
            if !verified.insert(key.clone()) {
                return;
            }
        }
        let template = template.clone();
        let store = self.store.clone();
        let verified = self.verified.clone();
        std::thread::spawn(move || {
            if let Err(reason) = template.verify_contents() {
                tracing::warn!(%key, %reason, "retiring a template whose contents changed");
                store.retire(&key);
                if let Ok(mut verified) = verified.lock() {
                    verified.remove(&key);
                }
            }
        });
    }

    /// Starts making the template of `job` in a background process (detached: a short-lived
    /// caller such as the CLI still gets its template); at most one per key, across processes.
    pub fn build_in_background(&self, shim: &Path, job: &TemplateJob) {
        if let Err(e) = self.spawn_build(shim, job) {
            tracing::warn!(error = %e, "could not start making a template");
        }
    }

    fn spawn_build(&self, shim: &Path, job: &TemplateJob) -> BoxliteResult<()> {
        let jobs = self.store.root().join("jobs");
        let path = jobs.join(format!("{}.json", ulid::Ulid::new()));
        let json = serde_json::to_vec_pretty(job)
            .map_err(|e| crate::error::BoxliteError::Internal(format!("template job: {e}")))?;
        crate::fsutil::write_atomically(&path, &json)?;
        let mut command = Command::new(shim);
        command.arg("--template").arg(&path);
        let options = ChildOptions {
            log_path: self.store.root().join("build.log"),
            log_limit: BUILD_LOG_LIMIT,
            die_with_parent: false,
            capture_stdout: false,
        };
        let (child, _) = GuardedChild::spawn(command, &options)?;
        if let Ok(mut builds) = self.builds.lock() {
            builds.retain(|b| !b.has_exited());
            builds.push(child);
        }
        Ok(())
    }

    /// Waits up to `limit` for the template makers this runtime started.
    pub async fn wait_for_builds(&self, limit: Duration) {
        let builds: Vec<GuardedChild> = match self.builds.lock() {
            Ok(mut builds) => builds.drain(..).collect(),
            Err(_) => return,
        };
        let all = futures_util::future::join_all(builds.iter().map(|b| b.wait()));
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("a template is still being made; it finishes on its own");
        }
    }
}
