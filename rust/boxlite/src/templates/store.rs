//! Where templates live in a home, and the rules that keep them immutable.
//!
//! ```text
//! <home>/templates/
//!   builds/<build>/{ram, state, overlay.qcow2, clone.qcow2, template.json}
//!                                                                immutable once renamed here
//!   builds/.tmp-<key>-<build>/                                   being made (or left by a crash)
//!   index/<key>                                                  the build serving a key (mutable)
//!   locks/<key>.lock                                             held while a key's template is made
//!   hashes.json                                                  digest cache of engine/bundle files
//! ```
//!
//! Boxes' disks name a build's `overlay.qcow2` by absolute path, so a build directory is never
//! moved: retiring a template removes its index entry and its memory files, and the directory
//! goes only when no box disk refers to it any more (`gc`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::digest::{file_digest, sparse_digest, FileStamp};
use super::key::{KeyInputs, TEMPLATE_FORMAT};
use crate::error::{BoxliteError, BoxliteResult, IoContext};
use crate::fsutil::{sync_dir, write_atomically, FileLock, LockMode};

pub(crate) const RAM_FILE: &str = "ram";
pub(crate) const STATE_FILE: &str = "state";
pub(crate) const OVERLAY_FILE: &str = "overlay.qcow2";
/// An empty overlay on the final `overlay.qcow2`: a box's disk is a copy of it (no `qemu-img`
/// run per box).
pub(crate) const CLONE_FILE: &str = "clone.qcow2";
/// The files a template is made of (besides its manifest), each sealed with its mode.
const SEALED_FILES: [(&str, u32); 4] = [
    (RAM_FILE, 0o666),
    (STATE_FILE, 0o444),
    (OVERLAY_FILE, 0o444),
    (CLONE_FILE, 0o444),
];
const MANIFEST_FILE: &str = "template.json";
const TMP_PREFIX: &str = ".tmp-";

/// What the agent said when the template's VM booted: a box restored from it never says it
/// again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AgentInfo {
    pub protocol: u32,
    pub agent_version: String,
}

/// One file of a template and how to tell it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileRecord {
    pub sha256: String,
    pub stamp: FileStamp,
}

/// `template.json`: written last, so a build directory without it is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TemplateManifest {
    pub format: u32,
    pub key: String,
    pub inputs: KeyInputs,
    pub agent: AgentInfo,
    /// RFC 3339.
    pub created: String,
    /// Milliseconds the template's VM took from spawn to the saved state.
    pub build_ms: u64,
    pub files: BTreeMap<String, FileRecord>,
}

/// A template that passed its checks.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub dir: PathBuf,
    pub manifest: TemplateManifest,
}

impl Template {
    pub fn ram(&self) -> PathBuf {
        self.dir.join(RAM_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join(OVERLAY_FILE)
    }
    /// The disk a new box copies.
    pub fn clone_disk(&self) -> PathBuf {
        self.dir.join(CLONE_FILE)
    }

    /// Reads every allocated byte of every file and compares digests (~0.1 s for 1 GiB RAM).
    pub fn verify_contents(&self) -> Result<(), String> {
        for (name, record) in &self.manifest.files {
            let path = self.dir.join(name);
            let digest = if name == RAM_FILE {
                sparse_digest(&path)
            } else {
                file_digest(&path)
            }
            .map_err(|e| format!("{name}: {e}"))?;
            if digest != record.sha256 {
                return Err(format!("{name}: content changed"));
            }
        }
        Ok(())
    }
}

/// The outcome of looking a key up.
#[derive(Debug)]
pub(crate) enum Lookup {
    Missing,
    Found(Box<Template>),
    /// Present but not usable; the reason is for logs and `boxlite images`.
    Invalid(String),
}

/// The templates of one home.
#[derive(Debug, Clone)]
pub(crate) struct TemplateStore {
    root: PathBuf,
}

/// What `TemplateStore::gc` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TemplateGc {
    pub removed: usize,
    pub bytes_freed: u64,
}

impl TemplateStore {
    pub fn new(home: &Path) -> BoxliteResult<Self> {
        let root = home.join("templates");
        for sub in ["builds", "index", "locks"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index_entry(&self, key: &str) -> PathBuf {
        self.root.join("index").join(key)
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    fn builds(&self) -> PathBuf {
        self.root.join("builds")
    }

    /// The template serving `key`, checked cheaply: manifest, key, every file's stamp, and the
    /// digests of the small files. The RAM file's content is checked by `verify_contents`.
    pub fn lookup(&self, key: &str) -> Lookup {
        let build = match std::fs::read_to_string(self.index_entry(key)) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
            Err(e) => return Lookup::Invalid(format!("index entry unreadable: {e}")),
        };
        if !is_plain_name(&build) {
            return Lookup::Invalid(format!("index entry names {build:?}"));
        }
        let dir = self.builds().join(&build);
        match read_manifest(&dir) {
            Ok(manifest) => match check_cheaply(&dir, key, &manifest) {
                Ok(()) => Lookup::Found(Box::new(Template { dir, manifest })),
                Err(reason) => Lookup::Invalid(reason),
            },
            Err(reason) => Lookup::Invalid(reason),
        }
    }

    /// Starts making the template of `key` unless another process is at it (then `None`: the
    /// caller boots cold and does not wait).
    pub fn begin_build(&self, key: &str) -> BoxliteResult<Option<TemplateBuild>> {
        let Some(lock) = FileLock::try_acquire(&self.lock_path(key), LockMode::Exclusive)? else {
            return Ok(None);
        };
        // Someone may have finished it while we looked.
        if matches!(self.lookup(key), Lookup::Found(_)) {
            return Ok(None);
        }
        self.remove_leftovers(key);
        let build = ulid::Ulid::new().to_string().to_lowercase();
        let dir = self.builds().join(format!("{TMP_PREFIX}{key}-{build}"));
        std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Some(TemplateBuild {
            store: self.clone(),
            key: key.to_string(),
            build,
            dir,
            _lock: lock,
            committed: false,
        }))
    }

    /// Takes `key`'s template out of service: new boxes boot cold (and make a new one). Its
    /// memory files go at once; its overlay stays while boxes' disks rest on it.
    pub fn retire(&self, key: &str) {
        let entry = self.index_entry(key);
        if let Ok(build) = std::fs::read_to_string(&entry) {
            let _ = std::fs::remove_file(&entry);
            let build = build.trim();
            if is_plain_name(build) {
                let dir = self.builds().join(build);
                let _ = std::fs::remove_file(dir.join(MANIFEST_FILE));
                let _ = std::fs::remove_file(dir.join(RAM_FILE));
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
            }
        }
    }

    /// Every template in service, by key (for `boxlite images` and GC).
    pub fn list(&self) -> Vec<(String, Lookup)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("index")) else {
            return Vec::new();
        };
        let mut keys: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| is_plain_name(name))
            .collect();
        keys.sort();
        keys.into_iter()
            .map(|key| {
                let lookup = self.lookup(&key);
                (key, lookup)
            })
            .collect()
    }

    /// Removes templates `keep` rejects (their image is gone), build directories no index
    /// entry names and no box disk rests on (`in_use`: overlay paths read from boxes' disks),
    /// and leftovers of builds whose process died.
    pub fn gc(
        &self,
        in_use: &BTreeSet<PathBuf>,
        keep: impl Fn(&TemplateManifest) -> bool,
    ) -> TemplateGc {
        let mut report = TemplateGc::default();
        for (key, lookup) in self.list() {
            match lookup {
                Lookup::Found(template) if keep(&template.manifest) => {}
                _ => self.retire(&key),
            }
        }
        let serving: BTreeSet<String> = std::fs::read_dir(self.root.join("index"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|s| s.trim().to_string())
            .collect();
        let Ok(entries) = std::fs::read_dir(self.builds()) else {
            return report;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let removable = if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
                let key = rest.rsplit_once('-').map(|(key, _)| key).unwrap_or(rest);
                !FileLock::is_held(&self.lock_path(key))
            } else {
                !serving.contains(&name) && !in_use.contains(&dir.join(OVERLAY_FILE))
            };
            if removable {
                report.bytes_freed += allocated_bytes(&dir);
                if std::fs::remove_dir_all(&dir).is_ok() {
                    report.removed += 1;
                }
            }
        }
        report
    }

    /// The overlay of every build directory (in service or kept for boxes).
    pub fn overlays(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.builds())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .map(|e| e.path().join(OVERLAY_FILE))
            .filter(|p| p.is_file())
            .collect()
    }

    /// Removes build directories a crashed maker of `key` left (the caller holds its lock).
    fn remove_leftovers(&self, key: &str) {
        let prefix = format!("{TMP_PREFIX}{key}-");
        if let Ok(entries) = std::fs::read_dir(self.builds()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// A template being made, in its temporary directory, under its key's lock. Dropped without
/// `commit`, it removes its directory.
#[derive(Debug)]
pub(crate) struct TemplateBuild {
    store: TemplateStore,
    key: String,
    build: String,
    dir: PathBuf,
    _lock: FileLock,
    committed: bool,
}

impl TemplateBuild {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory the build will have once committed (boxes' disks name this path).
    pub fn final_dir(&self) -> PathBuf {
        self.store.builds().join(&self.build)
    }

    /// Seals the files, records their digests and stamps, moves the build into place and
    /// makes it the one serving its key.
    pub fn commit(
        mut self,
        inputs: KeyInputs,
        agent: AgentInfo,
        build_ms: u64,
    ) -> BoxliteResult<Template> {
        use std::os::unix::fs::PermissionsExt;
        let mut files = BTreeMap::new();
        for (name, mode) in SEALED_FILES {
            let path = self.dir.join(name);
            let file = std::fs::File::open(&path).ctx(|| format!("opening {}", path.display()))?;
            file.sync_all()
                .ctx(|| format!("syncing {}", path.display()))?;
            // The engine of a box opens the RAM file for writing even though it maps it
            // privately (QEMU 7.2): the stamp, checked before every use, catches any write.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .ctx(|| format!("sealing {}", path.display()))?;
            let sha256 = if name == RAM_FILE {
                sparse_digest(&path)
            } else {
                file_digest(&path)
            }
            .ctx(|| format!("hashing {}", path.display()))?;
            let stamp = FileStamp::of(&path).ctx(|| format!("reading {}", path.display()))?;
            files.insert(name.to_string(), FileRecord { sha256, stamp });
        }
        let manifest = TemplateManifest {
            format: TEMPLATE_FORMAT,
            key: self.key.clone(),
            inputs,
            agent,
            created: crate::units::rfc3339(std::time::SystemTime::now()),
            build_ms,
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BoxliteError::Internal(format!("template manifest: {e}")))?;
        write_atomically(&self.dir.join(MANIFEST_FILE), &json)?;
        let final_dir = self.final_dir();
        std::fs::rename(&self.dir, &final_dir)
            .ctx(|| format!("moving the template into {}", final_dir.display()))?;
        self.committed = true;
        sync_dir(&self.store.builds());
        write_atomically(&self.store.index_entry(&self.key), self.build.as_bytes())?;
        Ok(Template {
            dir: final_dir,
            manifest,
        })
    }
}

impl Drop for TemplateBuild {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_manifest(dir: &Path) -> Result<TemplateManifest, String> {
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).map_err(|e| format!("manifest: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("manifest unreadable: {e}"))
}

fn check_cheaply(dir: &Path, key: &str, manifest: &TemplateManifest) -> Result<(), String> {
    if manifest.format != TEMPLATE_FORMAT {
        return Err(format!(
            "format {} (this build makes {TEMPLATE_FORMAT})",
            manifest.format
        ));
    }
    if manifest.key != key || manifest.inputs.key() != key {
        return Err("made for another key".into());
    }
    for (name, _) in SEALED_FILES {
        let Some(record) = manifest.files.get(name) else {
            return Err(format!("{name} not recorded"));
        };
        let path = dir.join(name);
        let stamp = FileStamp::of(&path).map_err(|e| format!("{name}: {e}"))?;
        if stamp != record.stamp {
            return Err(format!("{name} was modified after the template was made"));
        }
        if name != RAM_FILE {
            let digest = file_digest(&path).map_err(|e| format!("{name}: {e}"))?;
            if digest != record.sha256 {
                return Err(format!("{name}: content changed"));
            }
        }
    }
    Ok(())
}

/// A single path component of our own making (index entries are read back from disk).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(image: &str) -> KeyInputs {
        KeyInputs {
            format: TEMPLATE_FORMAT,
            engine_version: "QEMU emulator version 7.2.22".into(),
            engine_sha256: "e".into(),
            engine_args: vec![],
            kernel_sha256: "k".into(),
            initramfs_sha256: "i".into(),
            protocol: 2,
            image: image.into(),
            base_disk: "/base".into(),
            disk_size: 1 << 30,
        }
    }

    fn agent() -> AgentInfo {
        AgentInfo {
            protocol: 2,
            agent_version: "0.1.0".into(),
        }
    }

    fn make(store: &TemplateStore, inputs: &KeyInputs) -> Template {
        let build = store.begin_build(&inputs.key()).unwrap().unwrap();
        let ram = std::fs::File::create(build.dir().join(RAM_FILE)).unwrap();
        ram.set_len(64 << 20).unwrap();
        std::fs::write(build.dir().join(STATE_FILE), b"device state").unwrap();
        std::fs::write(build.dir().join(OVERLAY_FILE), b"QFI\xfb overlay").unwrap();
        std::fs::write(build.dir().join(CLONE_FILE), b"QFI\xfb clone").unwrap();
        build.commit(inputs.clone(), agent(), 10).unwrap()
    }

    #[test]
    fn a_committed_template_is_found_and_verified() {
        let home = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(home.path()).unwrap();
        let inputs = inputs("sha256:a");
        let key = inputs.key();
        assert!(matches!(store.lookup(&key), Lookup::Missing));
        let made = make(&store, &inputs);
        let Lookup::Found(found) = store.lookup(&key) else {
            panic!("not found")
        };
        assert_eq!(found.dir, made.dir);
        found.verify_contents().unwrap();
        // Only one process makes a key's template at a time, and a made one is not remade.
        assert!(store.begin_build(&key).unwrap().is_none());
        let leftovers: Vec<_> = std::fs::read_dir(home.path().join("templates/builds"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn any_change_invalidates() {
        let home = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(home.path()).unwrap();
        let inputs = inputs("sha256:b");
        let key = inputs.key();
        let made = make(&store, &inputs);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A write to the RAM file (the one file engines may open writable).
        use std::io::{Seek, Write};
        let mut ram = std::fs::OpenOptions::new()
            .write(true)
            .open(made.ram())
            .unwrap();
        ram.seek(std::io::SeekFrom::Start(4096)).unwrap();
        ram.write_all(b"tampered").unwrap();
        drop(ram);
        let Lookup::Invalid(reason) = store.lookup(&key) else {
            panic!("still valid")
        };
        assert!(reason.contains("ram"), "{reason}");
        assert!(made.verify_contents().unwrap_err().contains("ram"));
        store.retire(&key);
        assert!(matches!(store.lookup(&key), Lookup::Missing));
        // A retired template's overlay stays while a box disk rests on it.
        let in_use = BTreeSet::from([made.overlay()]);
        assert_eq!(store.gc(&in_use, |_| true).removed, 0);
        assert!(made.overlay().exists());
        assert_eq!(store.gc(&BTreeSet::new(), |_| true).removed, 1);
        assert!(!made.dir.exists());
    }

    #[test]
    fn a_crashed_build_leaves_nothing_in_service_and_gc_cleans_it() {
        let home = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(home.path()).unwrap();
        let inputs = inputs("sha256:c");
        let key = inputs.key();
        let build = store.begin_build(&key).unwrap().unwrap();
        std::fs::write(build.dir().join(RAM_FILE), b"half").unwrap();
        let tmp = build.dir().to_path_buf();
        // A killed process drops nothing: forget the guard, release only the lock.
        std::mem::forget(build);
        assert!(matches!(store.lookup(&key), Lookup::Missing));
        assert!(tmp.exists());
        // The lock file is still held by the leaked descriptor in this process, so GC waits.
        assert_eq!(store.gc(&BTreeSet::new(), |_| true).removed, 0);
        // A dropped, uncommitted build removes its own directory.
        let other = inputs_with_disk(2 << 30);
        let build = store.begin_build(&other.key()).unwrap().unwrap();
        let dir = build.dir().to_path_buf();
        drop(build);
        assert!(!dir.exists());
    }

    fn inputs_with_disk(disk_size: u64) -> KeyInputs {
        KeyInputs {
            disk_size,
            ..inputs("sha256:d")
        }
    }

    #[test]
    fn a_template_of_another_key_is_not_used() {
        let home = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(home.path()).unwrap();
        let made = make(&store, &inputs("sha256:e"));
        // An index entry for another key pointing at this build (a copied or edited index).
        let other = inputs("sha256:f").key();
        let build = made.dir.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::write(home.path().join("templates/index").join(&other), build).unwrap();
        let Lookup::Invalid(reason) = store.lookup(&other) else {
            panic!("used")
        };
        assert!(reason.contains("another key"), "{reason}");
        // gc rejects templates the caller no longer wants.
        store.gc(&BTreeSet::new(), |m| m.inputs.image != "sha256:e");
        assert!(matches!(
            store.lookup(&inputs("sha256:e").key()),
            Lookup::Missing
        ));
    }
}
