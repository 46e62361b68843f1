//! A simulated disk for tests: a [`WalIo`] that keeps synced and unsynced state apart, loses a
//! random prefix-cut of the unsynced writes on [`SimIo::crash`], fails chosen operations on
//! demand ([`SimIo::fail_next`], [`SimIo::fail_next_no_space`]), and can be made small
//! ([`SimIo::set_capacity`]) so that growing a file fails with `ENOSPC`.
//!
//! Model (stricter than ext4, never looser):
//! - a file's content becomes durable only through `sync_data`/`sync_all` of that file;
//! - a name (create, rename, remove) becomes durable only through `sync_dir` of its directory;
//! - a crash keeps the durable state plus a prefix, in issue order and cut at any byte, of the
//!   writes not yet synced; every handle from before the crash fails from then on, so threads of a
//!   "dead" WAL cannot touch the disk the next one opens;
//! - space is the sum of the (current) lengths of named files; a write or preallocation that would
//!   pass the capacity grows the file as far as it can, then fails with `ENOSPC` — so the bytes of
//!   a failed write up to the limit are there (unsynced), as after a short `pwrite`. A crash
//!   clears injected faults and the limit (the restart comes after the operator made room).
//!
//! It lives outside `#[cfg(test)]` so tests of other modules (and of the node) can inject faults.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::io::{Preallocate, ReadBuf, WalFile, WalIo};

/// An operation [`SimIo::fail_next`] can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Write,
    SyncData,
    SyncAll,
    SyncDir,
    Create,
    Rename,
    Preallocate,
}

/// How an injected fault fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    /// `EIO`: the device failed.
    Io,
    /// `ENOSPC`; an injected write keeps the first half of its bytes, as a short write would.
    NoSpace,
}

/// Operation counts since the disk was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub writes: u64,
    pub sync_data: u64,
    pub sync_all: u64,
    pub sync_dir: u64,
}

#[derive(Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
}

enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

struct Pending {
    file: u64,
    op: PendingOp,
}

#[derive(Default)]
struct Disk {
    generation: u64,
    next_file: u64,
    files: HashMap<u64, FileData>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    pending: Vec<Pending>,
    faults: Vec<(FaultOp, FaultKind)>,
    locked: Vec<PathBuf>,
    counters: SimCounters,
    /// Bytes all named files may hold together; `None`: unlimited.
    capacity: Option<u64>,
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Disk {
    fn take_fault(&mut self, op: FaultOp) -> io::Result<()> {
        match self.take_fault_kind(op) {
            None => Ok(()),
            Some(FaultKind::Io) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(FaultKind::NoSpace) => Err(no_space()),
        }
    }

    fn take_fault_kind(&mut self, op: FaultOp) -> Option<FaultKind> {
        let i = self.faults.iter().position(|(f, _)| *f == op)?;
        Some(self.faults.remove(i).1)
    }

    /// Bytes in use: current lengths of files that have a name.
    fn used(&self) -> u64 {
        let mut ids: Vec<u64> = self.names.values().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .filter_map(|id| self.files.get(id))
            .map(|f| f.current.len() as u64)
            .sum()
    }

    /// How long file `id` may grow to: unlimited, or its length plus the free space.
    fn max_len(&self, id: u64) -> u64 {
        match self.capacity {
            None => u64::MAX,
            Some(capacity) => {
                let len = self.files.get(&id).map_or(0, |f| f.current.len() as u64);
                len + capacity.saturating_sub(self.used())
            }
        }
    }

    /// Records an unsynced operation and applies it to the current content.
    fn push(&mut self, id: u64, op: PendingOp) {
        if let Some(f) = self.files.get_mut(&id) {
            apply(&mut f.current, &op, usize::MAX);
        }
        self.pending.push(Pending { file: id, op });
    }

    fn sync_file(&mut self, id: u64) {
        let mut kept = Vec::with_capacity(self.pending.len());
        for p in std::mem::take(&mut self.pending) {
            if p.file == id {
                if let Some(f) = self.files.get_mut(&id) {
                    apply(&mut f.durable, &p.op, usize::MAX);
                }
            } else {
                kept.push(p);
            }
        }
        self.pending = kept;
    }
}

/// Applies at most `limit` bytes of a write (a cut write keeps its first `limit` bytes).
fn apply(content: &mut Vec<u8>, op: &PendingOp, limit: usize) {
    match op {
        PendingOp::Write { offset, data } => {
            let data = &data[..data.len().min(limit)];
            let start = *offset as usize;
            let end = start + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[start..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => {
            if content.len() < *len as usize {
                content.resize(*len as usize, 0);
            }
        }
    }
}

/// A simulated disk; clones share it. See the module docs for the model.
#[derive(Clone, Default)]
pub struct SimIo {
    disk: Arc<Mutex<Disk>>,
    generation: u64,
}

impl SimIo {
    pub fn new() -> SimIo {
        SimIo::default()
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Disk>> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if disk.generation != self.generation {
            return Err(io::Error::other("simulated disk crashed under this handle"));
        }
        Ok(disk)
    }

    /// Simulates a power loss: keeps the durable state plus the first `keep % (unsynced + 1)`
    /// unsynced bytes in issue order, and returns the handle to use from now on (every older
    /// handle and open file fails).
    pub fn crash(&self, keep: u64) -> SimIo {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let unsynced: u64 = disk
            .pending
            .iter()
            .map(|p| match &p.op {
                PendingOp::Write { data, .. } => data.len() as u64,
                PendingOp::SetLen(_) => 0,
            })
            .sum();
        let mut budget = keep % (unsynced + 1);
        let pending = std::mem::take(&mut disk.pending);
        for p in &pending {
            if budget == 0 {
                break;
            }
            let limit = match &p.op {
                PendingOp::Write { data, .. } => {
                    let n = budget.min(data.len() as u64);
                    budget -= n;
                    n as usize
                }
                PendingOp::SetLen(_) => usize::MAX,
            };
            if let Some(f) = disk.files.get_mut(&p.file) {
                apply(&mut f.durable, &p.op, limit);
            }
        }
        disk.names = disk.durable_names.clone();
        let live: Vec<u64> = disk.names.values().copied().collect();
        disk.files.retain(|id, _| live.contains(id));
        for f in disk.files.values_mut() {
            f.current = f.durable.clone();
        }
        disk.locked.clear();
        disk.faults.clear();
        // A restart in the tests comes after the operator made room.
        disk.capacity = None;
        disk.generation += 1;
        SimIo {
            disk: self.disk.clone(),
            generation: disk.generation,
        }
    }

    /// Makes the next `op` fail with `EIO` (once per call).
    pub fn fail_next(&self, op: FaultOp) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.faults.push((op, FaultKind::Io));
    }

    /// Makes the next `op` fail with `ENOSPC` (once per call); a write keeps the first half of
    /// its bytes, unsynced.
    pub fn fail_next_no_space(&self, op: FaultOp) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.faults.push((op, FaultKind::NoSpace));
    }

    /// Limits the bytes all files may hold together (`None`: unlimited). Files already larger
    /// keep their content; they only cannot grow.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.capacity = bytes;
    }

    /// Drops injected faults that have not fired and lifts the capacity limit (the operator
    /// fixed the disk before a restart).
    pub fn heal(&self) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.faults.clear();
        disk.capacity = None;
    }

    /// Bytes the named files hold now.
    pub fn used_bytes(&self) -> u64 {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).used()
    }

    /// Bytes written but not yet synced.
    pub fn unsynced_bytes(&self) -> u64 {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.pending
            .iter()
            .map(|p| match &p.op {
                PendingOp::Write { data, .. } => data.len() as u64,
                PendingOp::SetLen(_) => 0,
            })
            .sum()
    }

    pub fn counters(&self) -> SimCounters {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).counters
    }

    /// Current content of a file (tests use it to corrupt or inspect segments).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let id = disk.names.get(path)?;
        disk.files.get(id).map(|f| f.current.clone())
    }

    /// Overwrites bytes of a file as if the disk had rotted: durable at once, no sync needed.
    pub fn corrupt(&self, path: &Path, offset: usize, bytes: &[u8]) -> bool {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let Some(id) = disk.names.get(path).copied() else {
            return false;
        };
        let Some(f) = disk.files.get_mut(&id) else {
            return false;
        };
        for content in [&mut f.current, &mut f.durable] {
            if content.len() < offset + bytes.len() {
                content.resize(offset + bytes.len(), 0);
            }
            content[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        true
    }

    /// Removes a file at once and durably (a lost segment).
    pub fn delete_durably(&self, path: &Path) -> bool {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let a = disk.names.remove(path).is_some();
        let b = disk.durable_names.remove(path).is_some();
        a || b
    }

    /// Names of all files, current view.
    pub fn paths(&self) -> Vec<PathBuf> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.names.keys().cloned().collect()
    }
}

struct SimFile {
    io: SimIo,
    id: u64,
}

impl WalFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.io.lock()?;
        let injected = disk.take_fault_kind(FaultOp::Write);
        if injected == Some(FaultKind::Io) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        disk.counters.writes += 1;
        let mut fits = disk.max_len(self.id).saturating_sub(offset);
        if injected == Some(FaultKind::NoSpace) {
            fits = fits.min(buf.len() as u64 / 2);
        }
        let n = (buf.len() as u64).min(fits) as usize;
        if n > 0 {
            let data = buf[..n].to_vec();
            disk.push(self.id, PendingOp::Write { offset, data });
        }
        if n < buf.len() {
            return Err(no_space());
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.io.lock()?;
        disk.take_fault(FaultOp::SyncData)?;
        disk.counters.sync_data += 1;
        disk.sync_file(self.id);
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut disk = self.io.lock()?;
        disk.take_fault(FaultOp::SyncAll)?;
        disk.counters.sync_all += 1;
        disk.sync_file(self.id);
        Ok(())
    }

    fn preallocate(&self, len: u64, _how: Preallocate) -> io::Result<()> {
        let mut disk = self.io.lock()?;
        disk.take_fault(FaultOp::Preallocate)?;
        // Like a zero-fill running out of room: the file keeps what was allocated.
        let allowed = len.min(disk.max_len(self.id));
        disk.push(self.id, PendingOp::SetLen(allowed));
        if allowed < len {
            return Err(no_space());
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let disk = self.io.lock()?;
        Ok(disk
            .files
            .get(&self.id)
            .map_or(0, |f| f.current.len() as u64))
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl WalIo for SimIo {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories are implicit and always durable in the model.
        self.lock().map(|_| ())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let disk = self.lock()?;
        Ok(disk
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let mut disk = self.lock()?;
        disk.take_fault(FaultOp::Create)?;
        disk.next_file += 1;
        let id = disk.next_file;
        disk.files.insert(id, FileData::default());
        disk.names.insert(path.to_path_buf(), id);
        Ok(Box::new(SimFile {
            io: self.clone(),
            id,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let disk = self.lock()?;
        let id = *disk.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(Box::new(SimFile {
            io: self.clone(),
            id,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<ReadBuf> {
        let disk = self.lock()?;
        let id = disk.names.get(path).ok_or_else(|| not_found(path))?;
        let content = disk
            .files
            .get(id)
            .map(|f| f.current.clone())
            .unwrap_or_default();
        Ok(Box::new(content))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.lock()?;
        disk.take_fault(FaultOp::Rename)?;
        let id = disk.names.remove(from).ok_or_else(|| not_found(from))?;
        disk.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock()?;
        disk.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.lock()?;
        disk.take_fault(FaultOp::SyncDir)?;
        disk.counters.sync_dir += 1;
        let disk = &mut *disk;
        disk.durable_names.retain(|p, _| p.parent() != Some(dir));
        for (p, id) in &disk.names {
            if p.parent() == Some(dir) {
                disk.durable_names.insert(p.clone(), *id);
            }
        }
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let mut disk = self.lock()?;
        if disk.locked.iter().any(|d| d == dir) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "simulated directory already locked",
            ));
        }
        disk.locked.push(dir.to_path_buf());
        Ok(Box::new(SimLock {
            io: self.clone(),
            dir: dir.to_path_buf(),
        }))
    }
}

struct SimLock {
    io: SimIo,
    dir: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        if let Ok(mut disk) = self.io.lock() {
            disk.locked.retain(|d| d != &self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_synced_data_and_a_prefix_of_the_rest() {
        let io = SimIo::new();
        let dir = Path::new("/d");
        let f = io.create(&dir.join("a")).unwrap();
        f.write_all_at(b"synced", 0).unwrap();
        f.sync_data().unwrap();
        io.sync_dir(dir).unwrap();
        f.write_all_at(b"-lost!", 6).unwrap();
        let io2 = io.crash(3);
        assert_eq!(io2.contents(&dir.join("a")).unwrap(), b"synced-lo");
        assert!(f.write_all_at(b"x", 0).is_err(), "old handles are dead");
    }

    #[test]
    fn names_need_a_directory_sync() {
        let io = SimIo::new();
        let dir = Path::new("/d");
        let f = io.create(&dir.join("a")).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.sync_all().unwrap();
        let io2 = io.crash(0);
        assert!(io2.contents(&dir.join("a")).is_none());
    }
}
