//! The local store: locks as JSON lines in `{state_dir}/locks.log`, each appended and fsynced
//! before the revoke that made it answers.
//!
//! Opening reads every line: a lock still in force is kept, a lapsed one dropped, and a line that
//! does not parse is skipped with a warning (a torn last line, after a crash in the middle of a
//! write, is the expected case; it was never acknowledged). When the log holds more lapsed lines
//! than live ones it is rewritten with the live ones only (a new file, fsynced, renamed over the
//! old one, the directory fsynced), and only while no other process holds it: each process keeps
//! a shared `flock` on the log, so during a zero-downtime upgrade, when the old and the new
//! process both append to it, neither rewrites it from under the other. Lines are appended with
//! `O_APPEND` in one write each, so two writers never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Lock, StoreError};

/// The open log.
pub struct Log {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

fn error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Local { path: path.display().to_string(), source }
}

impl Log {
    /// Opens (creating it and its directory, 0700, when missing) the log in `dir`; the locks
    /// in force.
    pub async fn open(dir: &Path) -> Result<(Log, Vec<Lock>), StoreError> {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || Log::open_blocking(&dir))
            .await
            .map_err(|e| StoreError::Local { path: "locks.log".into(), source: io::Error::other(e) })?
    }

    fn open_blocking(dir: &Path) -> Result<(Log, Vec<Lock>), StoreError> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| error(dir, e))?;
        let path = dir.join("locks.log");
        let created = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| error(&path, e))?;
        if created {
            // The new file's name is on disk before the first lock is acknowledged.
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| error(dir, e))?;
        }
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared).map_err(|e| error(&path, e.into()))?;
        end_torn_line(&file).map_err(|e| error(&path, e))?;
        let (locks, lapsed) = read(&path)?;
        let mut log = Log { path: path.clone(), file: Arc::new(Mutex::new(file)) };
        if lapsed > locks.len() && lapsed > 64 {
            log = log.compact(dir, &locks)?;
        }
        tracing::info!(path = %path.display(), locks = locks.len(), "revocations read from the state directory");
        Ok((log, locks))
    }

    /// Rewrites the log with `locks` only, when no other process holds it.
    fn compact(self, dir: &Path, locks: &[Lock]) -> Result<Log, StoreError> {
        let Ok(file) = self.file.lock() else { return Ok(self) };
        if rustix::fs::flock(&*file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            // Another process (the other side of a handover) appends to it: left as it is. A
            // failed conversion may have dropped this process's shared lock (flock(2)): taken
            // again, so that a later process does not rewrite the log from under this one.
            rustix::fs::flock(&*file, rustix::fs::FlockOperation::LockShared)
                .map_err(|e| error(&self.path, e.into()))?;
            drop(file);
            return Ok(self);
        }
        drop(file);
        let tmp = dir.join("locks.log.new");
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| error(&tmp, e))?;
        for lock in locks {
            out.write_all(&line(lock)).map_err(|e| error(&tmp, e))?;
        }
        out.sync_all().map_err(|e| error(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| error(&self.path, e))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| error(dir, e))?;
        let file = OpenOptions::new().append(true).read(true).open(&self.path).map_err(|e| error(&self.path, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared).map_err(|e| error(&self.path, e.into()))?;
        Ok(Log { path: self.path, file: Arc::new(Mutex::new(file)) })
    }

    /// Appends `lock` and waits until it is on disk.
    pub async fn append(&self, lock: &Lock) -> Result<(), StoreError> {
        let (file, path, line) = (self.file.clone(), self.path.clone(), line(lock));
        tokio::task::spawn_blocking(move || {
            let mut f = file.lock().map_err(|_| error(&path, io::Error::other("log lock poisoned")))?;
            let before = f.metadata().map_err(|e| error(&path, e))?.len();
            f.write_all(&line).and_then(|()| f.sync_data()).map_err(|e| {
                // A part of the line written (a full disk) would run into the next lock's line:
                // cut back to where it began.
                let _ = f.set_len(before);
                error(&path, e)
            })
        })
        .await
        .map_err(|e| error(&self.path, io::Error::other(e)))?
    }
}

/// Ends a last line a crash cut short, so the next lock starts a line of its own (the torn one
/// is skipped when read).
fn end_torn_line(mut file: &File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

/// One lock as one line.
fn line(lock: &Lock) -> Vec<u8> {
    let mut line = serde_json::to_vec(lock).unwrap_or_default();
    line.push(b'\n');
    line
}

/// The locks in force in the log at `path`, and how many lines it holds that are not.
fn read(path: &Path) -> Result<(Vec<Lock>, usize), StoreError> {
    let file = File::open(path).map_err(|e| error(path, e))?;
    let (mut locks, mut stale) = (Vec::new(), 0);
    for (n, line) in io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| error(path, e))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Lock>(&line) {
            Ok(lock) if lock.lapsed() => stale += 1,
            Ok(lock) => locks.push(lock),
            Err(e) => {
                stale += 1;
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "a line of the revocation log is not a lock; skipped");
            }
        }
    }
    Ok((locks, stale))
}

#[cfg(test)]
mod tests {
    use super::super::Target;
    use super::*;

    fn lock(subject: &str, until: u64) -> Lock {
        Lock::new(Target::Subject { subject: subject.into(), issuer: None }, until, "test")
    }

    #[tokio::test]
    async fn locks_outlive_the_process_lapsed_ones_do_not_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let later = super::super::now_ms() / 1000 + 3600;
        {
            let (log, locks) = Log::open(dir.path()).await.expect("open");
            assert!(locks.is_empty());
            log.append(&lock("alice", later)).await.expect("append");
            log.append(&lock("gone", 1)).await.expect("append");
        }
        // A crash in the middle of the next write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(dir.path().join("locks.log")).expect("open");
        f.write_all(b"{\"id\":\"x\",\"tar").expect("torn write");
        drop(f);
        let (log, locks) = Log::open(dir.path()).await.expect("reopen");
        let subjects: Vec<_> = locks.iter().map(|l| l.target.clone()).collect();
        assert_eq!(subjects, vec![Target::Subject { subject: "alice".into(), issuer: None }]);
        // Appends after a torn line start a line of their own.
        log.append(&lock("bob", later)).await.expect("append");
        drop(log);
        let (_, locks) = Log::open(dir.path()).await.expect("reopen");
        assert_eq!(locks.len(), 2, "alice and bob: {locks:?}");
    }
}
