//! The state database: one row per box in `<home>/boxlite.db` (SQLite, WAL), so any process
//! with the same home can list, reattach, stop and remove boxes. It is the one owner of a
//! box's options and status; status changes are compare-and-set moves of the state machine in
//! `litebox::status`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::error::{BoxliteError, BoxliteResult, StateError};
use crate::ids::BoxID;
use crate::images::ImageConfig;
use crate::litebox::{BoxStatus, Event};
use crate::options::BoxOptions;

/// A process identity that survives pid reuse: the pid and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: u32) -> Option<Self> {
        crate::sys::process_start(pid).map(|(start_time, _)| Self { pid, start_time })
    }

    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// Alive, not a zombie, and the same process that was recorded.
    pub fn is_alive(&self) -> bool {
        matches!(crate::sys::process_start(self.pid), Some((start, zombie)) if start == self.start_time && !zombie)
    }
}

/// Everything recorded about one box.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BoxRecord {
    pub id: BoxID,
    pub name: Option<String>,
    pub options: BoxOptions,
    /// The image reference or layout path, for listings.
    pub image: String,
    pub image_config: ImageConfig,
    pub base_disk: PathBuf,
    pub status: BoxStatus,
    /// The box's supervisor process, while it runs.
    pub shim: Option<ProcessId>,
    /// The VM engine process, while it runs.
    pub engine_pid: Option<u32>,
    /// The published ports as bound, while it runs.
    pub ports: Vec<crate::options::PortSpec>,
    /// The process creating the box, until its creation is complete. A record whose creator
    /// died is a creation that never finished: it is rolled back.
    pub creator: Option<ProcessId>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
}

impl BoxRecord {
    /// The record of a box this process is creating from `options`: not yet started, its
    /// image still to be set, rolled back if this process dies before it finishes.
    pub fn creating(id: BoxID, options: BoxOptions) -> Self {
        Self {
            id,
            name: options.name.clone(),
            image: String::new(),
            image_config: ImageConfig::default(),
            base_disk: PathBuf::new(),
            status: BoxStatus::Configured,
            shim: None,
            engine_pid: None,
            creator: ProcessId::current(),
            ports: Vec::new(),
            created_at_ms: now_ms(),
            started_at_ms: None,
            options,
        }
    }
}

#[derive(Debug)]
pub(crate) struct StateStore {
    conn: Mutex<Connection>,
}

/// The schema this build writes. Version 0 is the first release (no `user_version`, the
/// default command kept in `<box>/command.json`).
pub(crate) const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS boxes (
    id            TEXT PRIMARY KEY,
    name          TEXT UNIQUE,
    options       TEXT NOT NULL,
    image         TEXT NOT NULL,
    image_config  TEXT NOT NULL,
    base_disk     TEXT NOT NULL,
    status        TEXT NOT NULL,
    shim_pid      INTEGER,
    shim_start    INTEGER,
    engine_pid    INTEGER,
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER,
    creator_pid   INTEGER,
    creator_start INTEGER,
    ports         TEXT
);";

/// v2 -> v3: disk snapshots (a new home gets it after `SCHEMA`).
const SNAPSHOTS_V3: &str = "
CREATE TABLE IF NOT EXISTS snapshots (
    id            TEXT PRIMARY KEY,
    box_id        TEXT NOT NULL REFERENCES boxes(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    size_bytes    INTEGER NOT NULL,
    disk_bytes    INTEGER NOT NULL,
    UNIQUE (box_id, name)
);";

/// The first release's file holding `entrypoint`, `cmd` and `tty` beside the record.
const V0_COMMAND_FILE: &str = "command.json";

fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> BoxliteError {
    let context = context.into();
    move |source| StateError::Sqlite { context, source }.into()
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

fn json<T: serde::Serialize>(value: &T) -> BoxliteResult<String> {
    serde_json::to_string(value)
        .map_err(|e| BoxliteError::Internal(format!("serializing state: {e}")))
}

/// Brings a database of any earlier schema to `SCHEMA_VERSION`, in one transaction. Returns
/// side files that may be deleted once it is committed.
fn migrate(conn: &mut Connection, boxes_dir: &Path) -> rusqlite::Result<Vec<PathBuf>> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // A small, bounded write-ahead log: a home that creates and removes boxes all day does
    // not keep megabytes of it (the default lets it reach about 4 MiB).
    conn.pragma_update(None, "wal_autocheckpoint", 128)?;
    conn.pragma_update(None, "journal_size_limit", 512 * 1024)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let has_boxes: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'boxes')",
        [],
        |row| row.get(0),
    )?;
    let mut leftovers = Vec::new();
    if version > SCHEMA_VERSION {
        // Reported by the caller; nothing is touched.
        return Ok(leftovers);
    }
    if !has_boxes {
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(SNAPSHOTS_V3)?;
    } else {
        if version < 1 {
            leftovers = migrate_v0_to_v1(&tx, boxes_dir)?;
        }
        if version < 2 {
            // v1 -> v2: the published ports of a running box (as bound).
            tx.execute_batch("ALTER TABLE boxes ADD COLUMN ports TEXT;")?;
        }
        if version < 3 {
            tx.execute_batch(SNAPSHOTS_V3)?;
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(leftovers)
}

/// v0 -> v1: creation tracking columns; the default command moves from `command.json` into
/// the options.
fn migrate_v0_to_v1(tx: &Transaction<'_>, boxes_dir: &Path) -> rusqlite::Result<Vec<PathBuf>> {
    tx.execute_batch(
        "ALTER TABLE boxes ADD COLUMN creator_pid INTEGER;
         ALTER TABLE boxes ADD COLUMN creator_start INTEGER;",
    )?;
    let rows: Vec<(String, String)> = {
        let mut stmt = tx.prepare("SELECT id, options FROM boxes")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut folded = Vec::new();
    for (id, options) in rows {
        let file = boxes_dir.join(&id).join(V0_COMMAND_FILE);
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let (Ok(serde_json::Value::Object(command)), Ok(serde_json::Value::Object(mut opts))) = (
            serde_json::from_str::<serde_json::Value>(&text),
            serde_json::from_str::<serde_json::Value>(&options),
        ) else {
            tracing::warn!(box_id = %id, "unreadable {V0_COMMAND_FILE}; the box keeps the image's default command");
            continue;
        };
        for key in ["entrypoint", "cmd", "tty"] {
            if let Some(value) = command.get(key) {
                opts.insert(key.to_owned(), value.clone());
            }
        }
        let updated = serde_json::Value::Object(opts).to_string();
        tx.execute(
            "UPDATE boxes SET options = ?2 WHERE id = ?1",
            params![id, updated],
        )?;
        folded.push(file);
    }
    Ok(folded)
}

impl StateStore {
    /// Opens (creating or migrating) `<home>/boxlite.db`.
    pub fn open(home: &Path) -> BoxliteResult<Self> {
        let path = home.join("boxlite.db");
        let mut conn =
            Connection::open(&path).map_err(sqlite(format!("opening {}", path.display())))?;
        // Several processes may share a home: wait for each other's short transactions.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sqlite("setting the busy timeout"))?;
        // Switching to WAL and migrating can fail with SQLITE_BUSY without the busy handler
        // being consulted when two processes open a new home at once: retry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let leftovers = loop {
            match migrate(&mut conn, &home.join("boxes")) {
                Ok(leftovers) => break leftovers,
                Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(sqlite(format!("migrating {}", path.display()))(e)),
            }
        };
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sqlite("reading the schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(StateError::NewerSchema {
                found: version,
                supported: SCHEMA_VERSION,
            }
            .into());
        }
        for file in leftovers {
            let _ = std::fs::remove_file(file);
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        context: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> BoxliteResult<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| BoxliteError::Internal("state lock poisoned".into()))?;
        f(&conn).map_err(sqlite(context))
    }

    /// Adds a box; a taken name is `AlreadyExists`.
    pub fn insert(&self, record: &BoxRecord) -> BoxliteResult<()> {
        let options = json(&record.options)?;
        let config = json(&record.image_config)?;
        let conn = self
            .conn
            .lock()
            .map_err(|_| BoxliteError::Internal("state lock poisoned".into()))?;
        let result = conn.execute(
            "INSERT INTO boxes (id, name, options, image, image_config, base_disk, status,
                                created_at_ms, creator_pid, creator_start)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                record.id.to_string(),
                record.name,
                options,
                record.image,
                config,
                record.base_disk.to_string_lossy(),
                record.status.as_str(),
                record.created_at_ms,
                record.creator.map(|c| c.pid),
                record.creator.map(|c| c.start_time as i64),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(BoxliteError::AlreadyExists {
                what: "a box",
                name: record.name.clone().unwrap_or_default(),
            }),
            Err(e) => Err(sqlite("adding a box")(e)),
        }
    }

    /// Applies `event` if the box is in a status it can happen from (compare-and-set, so two
    /// processes never both win); returns the new status, or `None` if it did not apply.
    /// `Booted` records the running processes; `EngineGone` and `BootFailed` clear them.
    pub fn apply(
        &self,
        id: &BoxID,
        event: Event,
        running: Option<(ProcessId, u32)>,
    ) -> BoxliteResult<Option<BoxStatus>> {
        self.apply_guarded(id, event, running, None)
    }

    /// `EngineGone` for the supervisor `shim` only: a report about an earlier run (a watcher
    /// that woke late) must not end the run that followed it.
    pub fn engine_gone(&self, id: &BoxID, shim: ProcessId) -> BoxliteResult<Option<BoxStatus>> {
        self.apply_guarded(id, Event::EngineGone, None, Some(shim))
    }

    fn apply_guarded(
        &self,
        id: &BoxID,
        event: Event,
        running: Option<(ProcessId, u32)>,
        supervisor: Option<ProcessId>,
    ) -> BoxliteResult<Option<BoxStatus>> {
        self.with("updating a box's status", |c| {
            let tx = c.unchecked_transaction()?;
            let current: Option<(String, Option<i64>, Option<i64>)> = tx
                .query_row(
                    "SELECT status, shim_pid, shim_start FROM boxes WHERE id = ?1",
                    params![id.to_string()],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            let Some((status, shim_pid, shim_start)) = current else {
                return Ok(None);
            };
            if supervisor.is_some_and(|s| process(shim_pid, shim_start) != Some(s)) {
                return Ok(None);
            }
            let Some(to) = BoxStatus::parse(&status).and_then(|s| s.on(event)) else {
                return Ok(None);
            };
            match event {
                Event::Booted => {
                    let (shim, engine) = running.map_or((None, None), |(s, e)| (Some(s), Some(e)));
                    tx.execute(
                        "UPDATE boxes SET status = ?2, shim_pid = ?3, shim_start = ?4,
                                engine_pid = ?5, started_at_ms = ?6
                         WHERE id = ?1",
                        params![
                            id.to_string(),
                            to.as_str(),
                            shim.map(|s| s.pid),
                            shim.map(|s| s.start_time as i64),
                            engine,
                            now_ms()
                        ],
                    )?;
                }
                Event::EngineGone | Event::BootFailed | Event::Saved => {
                    tx.execute(
                        "UPDATE boxes SET status = ?2, shim_pid = NULL, shim_start = NULL,
                                engine_pid = NULL, ports = NULL
                         WHERE id = ?1",
                        params![id.to_string(), to.as_str()],
                    )?;
                }
                Event::Start | Event::Stop | Event::Pause | Event::Discard => {
                    tx.execute(
                        "UPDATE boxes SET status = ?2 WHERE id = ?1",
                        params![id.to_string(), to.as_str()],
                    )?;
                }
            }
            tx.commit()?;
            Ok(Some(to))
        })
    }

    /// Records the supervisor of a box that is starting, so a crash mid-boot can be cleaned
    /// up by whoever opens the home next.
    pub fn set_supervisor(&self, id: &BoxID, shim: ProcessId, engine: u32) -> BoxliteResult<()> {
        self.with("recording a box's supervisor", |c| {
            c.execute(
                "UPDATE boxes SET shim_pid = ?2, shim_start = ?3, engine_pid = ?4 WHERE id = ?1",
                params![id.to_string(), shim.pid, shim.start_time as i64, engine],
            )
        })?;
        Ok(())
    }

    /// Records the published ports of a box that just started.
    pub fn set_ports(&self, id: &BoxID, ports: &[crate::options::PortSpec]) -> BoxliteResult<()> {
        let ports = json(&ports)?;
        self.with("recording a box's ports", |c| {
            c.execute(
                "UPDATE boxes SET ports = ?2 WHERE id = ?1",
                params![id.to_string(), ports],
            )
        })?;
        Ok(())
    }

    /// Records what the box boots from, once its image and base disk are prepared.
    pub fn set_image(
        &self,
        id: &BoxID,
        image: &str,
        config: &ImageConfig,
        base_disk: &Path,
    ) -> BoxliteResult<()> {
        let config = json(config)?;
        self.with("recording a box's image", |c| {
            c.execute(
                "UPDATE boxes SET image = ?2, image_config = ?3, base_disk = ?4 WHERE id = ?1",
                params![id.to_string(), image, config, base_disk.to_string_lossy()],
            )
        })?;
        Ok(())
    }

    /// The creation of the box is complete: it is no longer rolled back if its creator dies.
    pub fn finish_creation(&self, id: &BoxID) -> BoxliteResult<()> {
        self.with("finishing a box's creation", |c| {
            c.execute(
                "UPDATE boxes SET creator_pid = NULL, creator_start = NULL WHERE id = ?1",
                params![id.to_string()],
            )
        })?;
        Ok(())
    }

    pub fn delete(&self, id: &BoxID) -> BoxliteResult<()> {
        self.with("removing a box", |c| {
            c.execute(
                "DELETE FROM snapshots WHERE box_id = ?1",
                params![id.to_string()],
            )?;
            c.execute("DELETE FROM boxes WHERE id = ?1", params![id.to_string()])
        })?;
        Ok(())
    }

    /// Finds a box by full id (any case) or by name.
    pub fn find(&self, id_or_name: &str) -> BoxliteResult<Option<BoxRecord>> {
        let key = id_or_name.to_ascii_uppercase();
        self.with("looking a box up", |c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM boxes WHERE id = ?1 OR name = ?2"),
                params![key, id_or_name],
                row_to_raw,
            )
            .optional()
        })?
        .map(RawRecord::parse)
        .transpose()
    }

    pub fn get(&self, id: &BoxID) -> BoxliteResult<Option<BoxRecord>> {
        self.find(&id.to_string())
    }

    pub fn list(&self) -> BoxliteResult<Vec<BoxRecord>> {
        let raws = self.with("listing boxes", |c| {
            let mut stmt = c.prepare(&format!("SELECT {COLUMNS} FROM boxes ORDER BY id"))?;
            let rows = stmt.query_map([], row_to_raw)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        raws.into_iter().map(RawRecord::parse).collect()
    }
}

/// One disk snapshot of a box, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub id: String,
    pub box_id: BoxID,
    pub name: String,
    pub created_at_ms: i64,
    /// Bytes the snapshot's frozen layer holds (what it changed since the layer below).
    pub size_bytes: u64,
    /// The box disk's virtual size when it was taken.
    pub disk_bytes: u64,
}

impl StateStore {
    /// Adds a snapshot; a name the box already uses is `AlreadyExists`.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> BoxliteResult<()> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| BoxliteError::Internal("state lock poisoned".into()))?;
        let result = conn.execute(
            "INSERT INTO snapshots (id, box_id, name, created_at_ms, size_bytes, disk_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                s.id,
                s.box_id.to_string(),
                s.name,
                s.created_at_ms,
                s.size_bytes as i64,
                s.disk_bytes as i64
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(BoxliteError::AlreadyExists {
                what: "a snapshot",
                name: s.name.clone(),
            }),
            Err(e) => Err(sqlite("adding a snapshot")(e)),
        }
    }

    /// A box's snapshots, oldest first.
    pub fn snapshots(&self, box_id: &BoxID) -> BoxliteResult<Vec<SnapshotRecord>> {
        let rows = self.with("listing snapshots", |c| {
            let mut stmt = c.prepare(
                "SELECT id, name, created_at_ms, size_bytes, disk_bytes FROM snapshots
                 WHERE box_id = ?1 ORDER BY created_at_ms, rowid",
            )?;
            let rows = stmt.query_map(params![box_id.to_string()], |row| {
                Ok(SnapshotRecord {
                    id: row.get(0)?,
                    box_id: *box_id,
                    name: row.get(1)?,
                    created_at_ms: row.get(2)?,
                    size_bytes: row.get::<_, i64>(3)?.max(0) as u64,
                    disk_bytes: row.get::<_, i64>(4)?.max(0) as u64,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows)
    }

    pub fn delete_snapshot(&self, id: &str) -> BoxliteResult<()> {
        self.with("removing a snapshot", |c| {
            c.execute("DELETE FROM snapshots WHERE id = ?1", params![id])
        })?;
        Ok(())
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const COLUMNS: &str = "id, name, options, image, image_config, base_disk, status, shim_pid, \
     shim_start, engine_pid, created_at_ms, started_at_ms, creator_pid, creator_start, ports";

struct RawRecord {
    id: String,
    name: Option<String>,
    options: String,
    image: String,
    image_config: String,
    base_disk: String,
    status: String,
    shim_pid: Option<i64>,
    shim_start: Option<i64>,
    engine_pid: Option<i64>,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    creator_pid: Option<i64>,
    creator_start: Option<i64>,
    ports: Option<String>,
}

fn row_to_raw(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        options: row.get(2)?,
        image: row.get(3)?,
        image_config: row.get(4)?,
        base_disk: row.get(5)?,
        status: row.get(6)?,
        shim_pid: row.get(7)?,
        shim_start: row.get(8)?,
        engine_pid: row.get(9)?,
        created_at_ms: row.get(10)?,
        started_at_ms: row.get(11)?,
        creator_pid: row.get(12)?,
        creator_start: row.get(13)?,
        ports: row.get(14)?,
    })
}

fn process(pid: Option<i64>, start: Option<i64>) -> Option<ProcessId> {
    match (pid, start) {
        (Some(pid), Some(start)) => Some(ProcessId {
            pid: pid as u32,
            start_time: start as u64,
        }),
        _ => None,
    }
}

impl RawRecord {
    fn parse(self) -> BoxliteResult<BoxRecord> {
        let corrupt = |what: &'static str, reason: String| -> BoxliteError {
            StateError::Corrupt {
                id: self.id.clone(),
                what,
                reason,
            }
            .into()
        };
        Ok(BoxRecord {
            id: BoxID::parse(&self.id).map_err(|e| corrupt("id", e.to_string()))?,
            name: self.name.clone(),
            options: serde_json::from_str(&self.options)
                .map_err(|e| corrupt("options", e.to_string()))?,
            image: self.image.clone(),
            image_config: serde_json::from_str(&self.image_config)
                .map_err(|e| corrupt("image config", e.to_string()))?,
            base_disk: PathBuf::from(&self.base_disk),
            status: BoxStatus::parse(&self.status)
                .ok_or_else(|| corrupt("status", self.status.clone()))?,
            shim: process(self.shim_pid, self.shim_start),
            engine_pid: self.engine_pid.map(|p| p as u32),
            creator: process(self.creator_pid, self.creator_start),
            ports: match &self.ports {
                Some(text) => {
                    serde_json::from_str(text).map_err(|e| corrupt("ports", e.to_string()))?
                }
                None => Vec::new(),
            },
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: Option<&str>) -> BoxRecord {
        let options = BoxOptions {
            rootfs_path: Some("/img".into()),
            name: name.map(str::to_owned),
            ..BoxOptions::default()
        };
        BoxRecord {
            image: "/img".into(),
            base_disk: "/home/images/disks/x.ext4".into(),
            ..BoxRecord::creating(BoxID::new(), options)
        }
    }

    #[test]
    fn records_round_trip_and_are_found_by_id_or_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let a = record(Some("alpha"));
        store.insert(&a).unwrap();
        assert_eq!(store.find("alpha").unwrap().unwrap(), a);
        assert_eq!(
            store
                .find(&a.id.to_string().to_lowercase())
                .unwrap()
                .unwrap(),
            a
        );
        assert!(store.find("beta").unwrap().is_none());
        store.finish_creation(&a.id).unwrap();
        assert_eq!(store.get(&a.id).unwrap().unwrap().creator, None);
        store.delete(&a.id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn status_moves_are_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let a = record(None);
        store.insert(&a).unwrap();
        assert_eq!(
            store.apply(&a.id, Event::Start, None).unwrap(),
            Some(BoxStatus::Starting)
        );
        // A second starter loses.
        assert_eq!(store.apply(&a.id, Event::Start, None).unwrap(), None);
        let me = ProcessId::current().unwrap();
        assert_eq!(
            store.apply(&a.id, Event::Booted, Some((me, 42))).unwrap(),
            Some(BoxStatus::Running)
        );
        let running = store.get(&a.id).unwrap().unwrap();
        assert_eq!(
            (running.status, running.shim, running.engine_pid),
            (BoxStatus::Running, Some(me), Some(42))
        );
        assert!(running.started_at_ms.is_some());
        assert_eq!(
            store.apply(&a.id, Event::EngineGone, None).unwrap(),
            Some(BoxStatus::Stopped)
        );
        // Reported twice (the watcher and stop()): the second is a no-op.
        assert_eq!(store.apply(&a.id, Event::EngineGone, None).unwrap(), None);
        let stopped = store.get(&a.id).unwrap().unwrap();
        assert_eq!((stopped.shim, stopped.engine_pid), (None, None));
        assert_eq!(
            store.apply(&BoxID::new(), Event::Start, None).unwrap(),
            None
        );
    }

    #[test]
    fn a_taken_name_is_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.insert(&record(Some("dup"))).unwrap();
        let err = store.insert(&record(Some("dup"))).unwrap_err();
        assert_eq!(err.kind(), "already_exists");
        assert!(matches!(err, BoxliteError::AlreadyExists { ref name, .. } if name == "dup"));
        store.insert(&record(None)).unwrap();
        store.insert(&record(None)).unwrap();
        assert_eq!(store.list().unwrap().len(), 3);
    }

    #[test]
    fn many_handles_can_open_a_new_home_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || StateStore::open(&path).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }

    #[test]
    fn two_handles_on_one_database_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let one = StateStore::open(dir.path()).unwrap();
        let two = StateStore::open(dir.path()).unwrap();
        let a = record(None);
        one.insert(&a).unwrap();
        assert_eq!(two.find(&a.id.to_string()).unwrap().unwrap().id, a.id);
    }

    /// The first release's schema and row, as that release wrote them (`sqlite3 .dump` of a
    /// home it made), with its `command.json` beside the box.
    const V0_DUMP: &str = include_str!("../../../tests/fixtures/home-v0.sql");

    #[test]
    fn a_home_of_the_first_release_is_migrated() {
        let home = tempfile::tempdir().unwrap();
        let conn = Connection::open(home.path().join("boxlite.db")).unwrap();
        conn.execute_batch(V0_DUMP).unwrap();
        drop(conn);
        let box_dir = home.path().join("boxes").join("01M8SXZW6E8SV6D8VDXF1F9X3K");
        std::fs::create_dir_all(&box_dir).unwrap();
        std::fs::write(
            box_dir.join(V0_COMMAND_FILE),
            r#"{"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $GREETING from $(pwd)"], "tty": false}"#,
        )
        .unwrap();

        let store = StateStore::open(home.path()).unwrap();
        let legacy = store.find("legacy").unwrap().unwrap();
        assert_eq!(legacy.status, BoxStatus::Stopped);
        assert_eq!(legacy.creator, None);
        assert_eq!(
            legacy.options.entrypoint,
            Some(vec!["/bin/sh".to_owned(), "-c".to_owned()])
        );
        assert_eq!(
            legacy.options.cmd,
            Some(vec!["echo $GREETING from $(pwd)".to_owned()])
        );
        assert_eq!(
            legacy.options.env,
            vec![("GREETING".into(), "hello".into())]
        );
        assert_eq!(legacy.options.memory.as_mib(), 256);
        assert!(!box_dir.join(V0_COMMAND_FILE).exists(), "no side file left");
        drop(store);
        // Opening again is a no-op.
        let again = StateStore::open(home.path()).unwrap();
        assert_eq!(again.find("legacy").unwrap().unwrap(), legacy);
    }

    #[test]
    fn snapshots_are_per_box_named_once_and_go_with_their_box() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let a = record(None);
        store.insert(&a).unwrap();
        let snap = |name: &str| SnapshotRecord {
            id: ulid::Ulid::new().to_string(),
            box_id: a.id,
            name: name.into(),
            created_at_ms: now_ms(),
            size_bytes: 1,
            disk_bytes: 2,
        };
        let s1 = snap("s1");
        store.insert_snapshot(&s1).unwrap();
        store.insert_snapshot(&snap("s2")).unwrap();
        let err = store.insert_snapshot(&snap("s1")).unwrap_err();
        assert_eq!(err.kind(), "already_exists");
        assert_eq!(store.snapshots(&a.id).unwrap()[0], s1);
        store.delete_snapshot(&s1.id).unwrap();
        assert_eq!(store.snapshots(&a.id).unwrap().len(), 1);
        store.delete(&a.id).unwrap();
        assert!(store.snapshots(&a.id).unwrap().is_empty());
    }

    #[test]
    fn a_version_2_home_gains_the_snapshots_table() {
        let home = tempfile::tempdir().unwrap();
        drop(StateStore::open(home.path()).unwrap());
        let conn = Connection::open(home.path().join("boxlite.db")).unwrap();
        conn.execute_batch("DROP TABLE snapshots; PRAGMA user_version = 2;")
            .unwrap();
        drop(conn);
        let store = StateStore::open(home.path()).unwrap();
        let a = record(None);
        store.insert(&a).unwrap();
        assert!(store.snapshots(&a.id).unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused_untouched() {
        let home = tempfile::tempdir().unwrap();
        drop(StateStore::open(home.path()).unwrap());
        let conn = Connection::open(home.path().join("boxlite.db")).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = StateStore::open(home.path()).unwrap_err();
        assert!(matches!(
            err,
            BoxliteError::State(StateError::NewerSchema { .. })
        ));
    }

    #[test]
    fn process_identity_detects_death_and_reuse() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        assert!(!ProcessId {
            start_time: me.start_time + 1,
            ..me
        }
        .is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id()).expect("a child that was just spawned exists");
        child.wait().unwrap();
        assert!(!id.is_alive());
    }
}
