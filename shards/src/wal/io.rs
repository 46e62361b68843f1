//! Every byte the WAL reads or writes goes through [`WalIo`], so tests can swap the disk for a
//! simulated one that loses unsynced writes ([`super::sim::SimIo`]) or fails on demand.
//!
//! [`FsIo`] is the real filesystem: `pwrite`, `fdatasync`, `posix_fallocate`, `rename`, directory
//! `fsync`, `flock` and read-only `mmap`. It adds no policy: ordering and durability rules live in
//! the callers (`segment`, `writer`, `recovery`, `checkpoint`). The one classification it offers,
//! [`is_disk_full`], is what the writer uses to tell a retryable lack of space from a fault.

use std::any::Any;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// How a new segment's space is reserved before use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocate {
    /// Write zeros over the whole segment, then `fsync`. Costs one sequential write of the segment
    /// (done ahead of time, off the writer thread), but later `fdatasync`s only flush data: on the
    /// reference disk they are ~45% cheaper than with `Fallocate` (see `docs/log-format.md`).
    #[default]
    ZeroFill,
    /// `posix_fallocate`: instant, but ext4 marks the extents unwritten, so every later
    /// `fdatasync` also commits the extent conversion to the journal.
    Fallocate,
}

/// Whether `e` says the filesystem (or the user's quota) has no room: `ENOSPC` or `EDQUOT`.
///
/// Only meaningful for operations that allocate — `write`, `fallocate`, `create`, `rename` — and
/// before any `fsync` covers the data: a failed allocation leaves nothing dirty behind, so the
/// operation can simply be repeated once space returns. The same code from `fsync`/`fdatasync`
/// means writeback failed and dirty pages may be gone; callers must not retry those.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// `mkdir -p` that survives a power loss: every directory it creates is `fsync`ed, and so is the
/// parent it was created in, top down. A directory's name lives in its parent, so without the
/// parent's `fsync` a fresh data dir — and the WAL and database files inside it — can vanish
/// after a crash even though each file was synced. Directories that already exist are not
/// touched (their names are as durable as they will get).
pub fn create_dir_all_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cursor = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Another process (or thread) made it first: it still needs the syncs below.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
        File::open(d)?.sync_all()?;
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Bytes of a file read for recovery: a read-only memory map on the real filesystem.
pub type ReadBuf = Box<dyn AsRef<[u8]> + Send + Sync>;

/// An open, writable WAL file.
pub trait WalFile: Send + Sync {
    /// Writes all of `buf` at `offset` (`pwrite`, repeated on short writes).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: data and the metadata needed to read it back.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: data and all metadata.
    fn sync_all(&self) -> io::Result<()>;
    /// Reserves `len` bytes from offset 0 (the file reads as zeros where nothing was written).
    fn preallocate(&self, len: u64, how: Preallocate) -> io::Result<()>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// The file system as the WAL sees it.
pub trait WalIo: Send + Sync {
    /// `mkdir -p`, durably: every created directory and its parent are `fsync`ed.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries directly inside `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// Creates (or truncates) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// The whole content of a file, for reading (memory mapped on the real filesystem).
    fn read(&self, path: &Path) -> io::Result<ReadBuf>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of a directory, making creations, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `dir` for the life of the returned guard, so two WALs never
    /// write the same directory.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsIo;

struct FsFile(File);

impl WalFile for FsFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn preallocate(&self, len: u64, how: Preallocate) -> io::Result<()> {
        match how {
            Preallocate::Fallocate => {
                let len = libc::off_t::try_from(len).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "segment too large")
                })?;
                // SAFETY: plain syscall on a file descriptor we own for the duration of the call.
                let rc = unsafe { libc::posix_fallocate(self.0.as_raw_fd(), 0, len) };
                if rc != 0 {
                    return Err(io::Error::from_raw_os_error(rc));
                }
                Ok(())
            }
            Preallocate::ZeroFill => {
                const CHUNK: usize = 1 << 20;
                let zeros = vec![0u8; CHUNK];
                let mut offset = 0u64;
                while offset < len {
                    let n = (len - offset).min(CHUNK as u64) as usize;
                    self.0.write_all_at(&zeros[..n], offset)?;
                    // Paced: each megabyte goes to the disk before the next is written. Left to
                    // the final `fsync`, 64 MiB of dirty pages reach the disk queue at once and
                    // the live segment's `fdatasync`s wait behind them (appends stalled for
                    // hundreds of ms while a spare was prepared). Only pacing, not durability
                    // (the caller syncs the file), so a filesystem without it is fine.
                    // SAFETY: plain syscall on a file descriptor we own for the duration.
                    unsafe {
                        libc::sync_file_range(
                            self.0.as_raw_fd(),
                            offset as libc::off64_t,
                            n as libc::off64_t,
                            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                                | libc::SYNC_FILE_RANGE_WRITE
                                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                        );
                    }
                    offset += n as u64;
                }
                Ok(())
            }
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl WalIo for FsIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_dir_all_durably(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(FsFile(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(FsFile(file)))
    }

    fn read(&self, path: &Path) -> io::Result<ReadBuf> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Box::new(Vec::<u8>::new()));
        }
        // SAFETY: the directory lock keeps other WAL instances out, and this process never
        // truncates a segment while a map of it is alive (maps live only during recovery).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Box::new(map))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        // SAFETY: plain syscall on a file descriptor we own; the lock lives as long as `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(file))
    }
}
