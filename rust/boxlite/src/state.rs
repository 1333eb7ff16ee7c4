//! The state database: one row per box in `<home>/boxlite.db` (SQLite, WAL), so any process
//! with the same home can list, reattach, stop and remove boxes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{BoxliteError, BoxliteResult};
use crate::ids::BoxID;
use crate::images::ImageConfig;
use crate::litebox::BoxStatus;
use crate::options::BoxOptions;

/// A process identity that survives pid reuse: the pid and its start time in clock ticks
/// since boot (`/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: u32) -> Option<Self> {
        crate::sys::process_start(pid).map(|(start_time, _)| Self { pid, start_time })
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
    pub image: String,
    pub image_config: ImageConfig,
    pub base_disk: PathBuf,
    pub status: BoxStatus,
    /// The box's supervisor process, while it runs.
    pub shim: Option<ProcessId>,
    /// The VM engine process, while it runs.
    pub engine_pid: Option<u32>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
}

#[derive(Debug)]
pub(crate) struct StateStore {
    conn: Mutex<Connection>,
}

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
    started_at_ms INTEGER
);";

fn initialize(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn db_error(e: rusqlite::Error) -> BoxliteError {
    BoxliteError::Database(e.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> BoxliteResult<String> {
    serde_json::to_string(value)
        .map_err(|e| BoxliteError::Internal(format!("serializing state: {e}")))
}

impl StateStore {
    pub fn open(path: &Path) -> BoxliteResult<Self> {
        let conn = Connection::open(path)
            .map_err(|e| BoxliteError::Database(format!("opening {}: {e}", path.display())))?;
        // Several processes may share a home: wait for each other's short transactions.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_error)?;
        // Switching to WAL and creating the schema can fail with SQLITE_BUSY without the busy
        // handler being consulted when two processes open a new home at once: retry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match initialize(&conn) {
                Ok(()) => break,
                Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(db_error(e)),
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> BoxliteResult<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| BoxliteError::Internal("state lock poisoned".into()))?;
        f(&conn).map_err(db_error)
    }

    /// Adds a box; a taken name is an invalid-argument error.
    pub fn insert(&self, record: &BoxRecord) -> BoxliteResult<()> {
        let options = json(&record.options)?;
        let config = json(&record.image_config)?;
        let result = self.with(|c| {
            c.execute(
                "INSERT INTO boxes (id, name, options, image, image_config, base_disk, status, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    record.id.to_string(),
                    record.name,
                    options,
                    record.image,
                    config,
                    record.base_disk.to_string_lossy(),
                    record.status.as_str(),
                    record.created_at_ms
                ],
            )
        });
        match result {
            Err(BoxliteError::Database(msg)) if msg.contains("UNIQUE") && msg.contains("name") => {
                Err(BoxliteError::invalid(
                    "name",
                    format!(
                        "a box named {:?} already exists",
                        record.name.as_deref().unwrap_or("")
                    ),
                ))
            }
            other => other.map(|_| ()),
        }
    }

    /// Records a new status; `running` carries the processes, others clear them.
    pub fn set_status(
        &self,
        id: &BoxID,
        status: BoxStatus,
        running: Option<(ProcessId, u32)>,
    ) -> BoxliteResult<()> {
        let (shim_pid, shim_start, engine_pid) = match running {
            Some((shim, engine)) => (Some(shim.pid), Some(shim.start_time as i64), Some(engine)),
            None => (None, None, None),
        };
        let started = running.map(|_| now_ms());
        self.with(|c| {
            c.execute(
                "UPDATE boxes SET status = ?2, shim_pid = ?3, shim_start = ?4, engine_pid = ?5,
                        started_at_ms = COALESCE(?6, started_at_ms)
                 WHERE id = ?1",
                params![
                    id.to_string(),
                    status.as_str(),
                    shim_pid,
                    shim_start,
                    engine_pid,
                    started
                ],
            )
        })?;
        Ok(())
    }

    /// Moves a box from `from` to `to` only if it is still in `from` (crash recovery races).
    pub fn mark_if(&self, id: &BoxID, from: BoxStatus, to: BoxStatus) -> BoxliteResult<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE boxes SET status = ?3, shim_pid = NULL, shim_start = NULL, engine_pid = NULL
                 WHERE id = ?1 AND status = ?2",
                params![id.to_string(), from.as_str(), to.as_str()],
            )
        })?;
        Ok(n > 0)
    }

    pub fn delete(&self, id: &BoxID) -> BoxliteResult<()> {
        self.with(|c| c.execute("DELETE FROM boxes WHERE id = ?1", params![id.to_string()]))?;
        Ok(())
    }

    /// Finds a box by full id (any case) or by name.
    pub fn find(&self, id_or_name: &str) -> BoxliteResult<Option<BoxRecord>> {
        let key = id_or_name.to_ascii_uppercase();
        self.with(|c| {
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

    pub fn list(&self) -> BoxliteResult<Vec<BoxRecord>> {
        let raws = self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {COLUMNS} FROM boxes ORDER BY id"))?;
            let rows = stmt.query_map([], row_to_raw)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        raws.into_iter().map(RawRecord::parse).collect()
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const COLUMNS: &str =
    "id, name, options, image, image_config, base_disk, status, shim_pid, shim_start, engine_pid, created_at_ms, started_at_ms";

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
    })
}

impl RawRecord {
    fn parse(self) -> BoxliteResult<BoxRecord> {
        let corrupt = |what: &str, e: String| {
            BoxliteError::Database(format!("box {}: bad {what}: {e}", self.id))
        };
        let shim = match (self.shim_pid, self.shim_start) {
            (Some(pid), Some(start)) => Some(ProcessId {
                pid: pid as u32,
                start_time: start as u64,
            }),
            _ => None,
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
            shim,
            engine_pid: self.engine_pid.map(|p| p as u32),
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: Option<&str>) -> BoxRecord {
        BoxRecord {
            id: BoxID::new(),
            name: name.map(str::to_owned),
            options: BoxOptions {
                rootfs_path: Some("/img".into()),
                ..BoxOptions::default()
            },
            image: "/img".into(),
            image_config: ImageConfig::default(),
            base_disk: "/home/images/disks/x.ext4".into(),
            status: BoxStatus::Configured,
            shim: None,
            engine_pid: None,
            created_at_ms: now_ms(),
            started_at_ms: None,
        }
    }

    #[test]
    fn records_round_trip_and_are_found_by_id_or_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("db")).unwrap();
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
        let me = ProcessId::of(std::process::id()).unwrap();
        store
            .set_status(&a.id, BoxStatus::Running, Some((me, 42)))
            .unwrap();
        let running = store.find("alpha").unwrap().unwrap();
        assert_eq!(
            (running.status, running.shim, running.engine_pid),
            (BoxStatus::Running, Some(me), Some(42))
        );
        assert!(running.started_at_ms.is_some());
        assert!(store
            .mark_if(&a.id, BoxStatus::Running, BoxStatus::Stopped)
            .unwrap());
        assert!(!store
            .mark_if(&a.id, BoxStatus::Running, BoxStatus::Stopped)
            .unwrap());
        store.delete(&a.id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("db")).unwrap();
        store.insert(&record(Some("dup"))).unwrap();
        let err = store.insert(&record(Some("dup"))).unwrap_err();
        assert_eq!(err.kind(), "invalid_argument");
        store.insert(&record(None)).unwrap();
        store.insert(&record(None)).unwrap();
        assert_eq!(store.list().unwrap().len(), 3);
    }

    #[test]
    fn many_handles_can_open_a_new_home_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
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
        let one = StateStore::open(&dir.path().join("db")).unwrap();
        let two = StateStore::open(&dir.path().join("db")).unwrap();
        let a = record(None);
        one.insert(&a).unwrap();
        assert_eq!(two.find(&a.id.to_string()).unwrap().unwrap().id, a.id);
    }

    #[test]
    fn process_identity_detects_death_and_reuse() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert!(!ProcessId {
            start_time: me.start_time + 1,
            ..me
        }
        .is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id());
        child.wait().unwrap();
        if let Some(id) = id {
            assert!(!id.is_alive());
        }
    }
}
