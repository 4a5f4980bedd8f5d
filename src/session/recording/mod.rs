//! Terminal recording for audit: one asciicast v2 file per session of a route with
//! `[routes.recording]`, written off the relay's path.
//!
//! The relay copies the payload bytes of data frames (the backend's output, and the client's
//! input when the route asks for it, unmasked) into a [`Sink`] per direction, which hands them
//! to the session's writer task through a queue bounded in bytes. The relay still forwards the
//! original bytes: the recording reads them, it never changes them. The writer decodes UTF-8
//! across chunk boundaries (invalid bytes become U+FFFD), writes `[time, "o"|"i", text]` lines
//! after the header, and flushes whenever its queue is empty.
//!
//! When the writer falls `queue` bytes behind, or fails (the file cannot be created or
//! written), the route's `on_backlog` decides: `slow` stops reading that direction's sender
//! until the writer catches up (a failed writer leaves the rest of the session unrecorded),
//! `close` ends the session with 1011. Either way the gap is logged and counted in
//! `portcullis_recording_failures_total{route,reason}`: an audit gap is never silent.
//!
//! Files are created 0600 in the route's directory, named
//! `{unix time}-{route}-{session}-{process tag}.cast` (the tag, 8 hex digits, drawn once per
//! process; a name taken already gets a random suffix after the tag).
//! Recordings are evidence (`docs/security.md`, "Threat table: trust boundaries"):
//! - a live recording holds a shared `flock` on its file, and nothing deletes a locked file (the
//!   sweep takes an exclusive lock first), whichever process is writing it;
//! - one recording stops at `max_file_size`: a gap marker (`[t, "m", "..."]`) ends it and
//!   `on_limit` decides whether the session goes on unrecorded or closes;
//! - a new recording in a directory that holds `max_total_size` is refused (a gap, `on_limit`
//!   as above) unless the route says `when_full = "evict_oldest"`, when the oldest finished
//!   recordings are deleted, each counted in `portcullis_recording_evictions_total{reason="size"}` and alerted;
//! - the server sweeps each directory every `sweep_interval` ([`sweep`]): finished recordings
//!   older than `max_age` go (`reason="age"`).
//!
//! The header carries the session id, route, agent, subject and start time, never a token.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::{Backlog, RecordingSettings, WhenFull};
use crate::session::{Behind, PayloadSink, Taps};

/// Who a recording is of, for its header and file name.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The session's process-unique id.
    pub session: u64,
    /// Route name.
    pub route: String,
    /// The `{agent}` capture, if any.
    pub agent: Option<String>,
    /// The token's subject, if any.
    pub subject: Option<String>,
}

/// Output (`o`, the backend's frames) or input (`i`, the client's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Output = 0,
    Input = 1,
}

impl Stream {
    fn code(self) -> &'static str {
        match self {
            Stream::Output => "o",
            Stream::Input => "i",
        }
    }
}

/// Bytes of one direction, as one event.
struct Chunk {
    at: f64,
    stream: Stream,
    data: Bytes,
}

/// What the sinks of one recording and its writer share.
struct Queue {
    settings: Arc<RecordingSettings>,
    route: String,
    start: Instant,
    /// Bytes handed to the writer and not yet written.
    queued: AtomicUsize,
    /// The writer failed: nothing more is recorded.
    failed: AtomicBool,
    /// The failure closes the session (`on_backlog`, or `on_limit` for a cap).
    close: AtomicBool,
    /// The sinks waiting for room (`slow`), by [`Stream`].
    wakers: [AtomicWaker; 2],
}

impl Queue {
    fn fail(&self, reason: &'static str, detail: &dyn std::fmt::Display) {
        // A cap a session's own output can reach (its file's, the directory's, the disk's)
        // follows `on_limit`: by default a session that cannot be recorded does not go on.
        let close = match reason {
            "file_size" | "directory_full" | "disk_full" => self.settings.on_limit == Backlog::Close,
            _ => self.settings.on_backlog == Backlog::Close,
        };
        self.close.fetch_or(close, Ordering::AcqRel);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(route = %self.route, reason, error = %detail, "recording failed: the rest of the session is not recorded");
            crate::metrics::recording_failed(&self.route, reason);
        }
        self.wake();
    }

    fn wake(&self) {
        for w in &self.wakers {
            w.wake();
        }
    }
}

/// One direction's way into a recording: the relay hands it the unmasked payload bytes of
/// each scan, as one event.
pub struct Sink {
    stream: Stream,
    queue: Arc<Queue>,
    /// The writer's way in. Only the sinks hold one (the writer holds the queue, never a
    /// sender): once the session drops its sinks the writer sees the channel close, writes
    /// what is left, and ends, closing its file.
    tx: mpsc::UnboundedSender<Chunk>,
}

impl crate::session::PayloadSink for Sink {
    /// Hands `data` to the writer, as one event.
    fn payload(&self, data: &Bytes) {
        if data.is_empty() || self.queue.failed.load(Ordering::Acquire) {
            return;
        }
        let len = data.len();
        self.queue.queued.fetch_add(len, Ordering::AcqRel);
        let at = self.queue.start.elapsed().as_secs_f64();
        if self.tx.send(Chunk { at, stream: self.stream, data: data.clone() }).is_err() {
            self.queue.queued.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Whether the sender may be read now: `Pending` (the task woken when the writer has
    /// caught up) while the writer is `queue` bytes behind under `slow`; [`Behind`] when the
    /// session must close (`close`, and the writer is behind or failed).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Behind>> {
        let q = &self.queue;
        let close = q.settings.on_backlog == Backlog::Close;
        let failed_close = q.close.load(Ordering::Acquire);
        // Registered on every check, not only when waiting for room: a writer that fails
        // while the session sits idle wakes it, so a `close` route closes then.
        q.wakers[self.stream as usize].register(cx.waker());
        if q.failed.load(Ordering::Acquire) {
            return Poll::Ready(if failed_close { Err(Behind) } else { Ok(()) });
        }
        if q.queued.load(Ordering::Acquire) < q.settings.queue {
            return Poll::Ready(Ok(()));
        }
        if close {
            q.fail("backlog", &"the writer fell a whole queue behind");
            return Poll::Ready(Err(Behind));
        }
        if q.queued.load(Ordering::Acquire) < q.settings.queue || q.failed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        crate::metrics::recording_backpressure(&q.route);
        Poll::Pending
    }
}

/// Starts the recording of a session: its writer task (on `tasks`, so a drain waits for the
/// last events to be written before the process exits), with the sink of its output and (when
/// the route records input) of its input among the session's `taps`. The writer holds the
/// file's `place` in the process's descriptor budget until the file is closed.
pub fn start(
    settings: &Arc<RecordingSettings>,
    meta: Meta,
    place: Option<crate::limits::OutboundSlot>,
    tasks: &tokio_util::task::TaskTracker,
    ledgers: &Ledgers,
    taps: &mut Taps,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        settings: settings.clone(),
        route: meta.route.clone(),
        start: Instant::now(),
        queued: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        close: AtomicBool::new(false),
        wakers: [AtomicWaker::new(), AtomicWaker::new()],
    });
    tasks.spawn(write(queue.clone(), rx, meta, ledgers.of(&settings.directory), place));
    let sink = |stream| -> Arc<dyn PayloadSink> { Arc::new(Sink { stream, queue: queue.clone(), tx: tx.clone() }) };
    taps.output.push(sink(Stream::Output));
    if settings.input {
        taps.input.push(sink(Stream::Input));
    }
}

/// The file name of a recording started at `unix` seconds. Session ids are the process's
/// own (they start again at 1 in every process), so the name carries a tag drawn once per
/// process: instances sharing a directory, or a process and the one a handover started, never
/// pick the same name (the second recording would fail, and its session go unrecorded). A
/// name taken already (a file made ahead by someone who read the tag) is tried again with a
/// random `retry` suffix.
fn file_name(meta: &Meta, unix: u64, retry: Option<u32>) -> String {
    static PROCESS_TAG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let tag = PROCESS_TAG.get_or_init(rand::random::<u32>);
    let retry = retry.map(|r| format!("-{r:08x}")).unwrap_or_default();
    format!("{unix}-{}-{}-{tag:08x}{retry}.cast", meta.route, meta.session)
}

/// The asciicast v2 header line.
fn header(settings: &RecordingSettings, meta: &Meta, unix: u64) -> String {
    let title = format!("{} {}", meta.route, meta.agent.as_deref().unwrap_or(""));
    serde_json::json!({
        "version": 2,
        "width": settings.width,
        "height": settings.height,
        "timestamp": unix,
        "title": title.trim_end(),
        "portcullis": {
            "session": meta.session,
            "route": meta.route,
            "agent": meta.agent,
            "subject": meta.subject,
            "input_recorded": settings.input,
        },
    })
    .to_string()
}

/// Decodes `data` after the `carry` left by the previous chunk (at most 3 bytes of an
/// incomplete UTF-8 sequence); what is left incomplete at the end becomes the next carry.
fn decode(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let mut out = String::with_capacity(carry.len());
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{fffd}');
                        rest = &bad[n..];
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *carry = keep;
    out
}

/// The writer task: creates the file, writes the header and every chunk, and ends when both
/// sinks are gone (the session ended).
async fn write(
    queue: Arc<Queue>,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    meta: Meta,
    ledger: Arc<Ledger>,
    mut slot: Option<crate::limits::OutboundSlot>,
) {
    let settings = queue.settings.clone();
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut path = settings.directory.join(file_name(&meta, unix, None));
    crate::metrics::recordings_active(1.0);
    let (dir, route, evict) = (settings.directory.clone(), meta.route.clone(), settings.when_full);
    let max_total = settings.max_total_size;
    let room = tokio::task::spawn_blocking(move || make_room(&dir, &route, max_total, evict)).await.ok().flatten();
    // Its bytes count as this recording's in the ledger from its file's creation to the end of
    // this task, however it ends.
    let mut open = None;
    let mut file = match room {
        None => {
            queue
                .fail("directory_full", &format_args!("{} holds max_total_size already", settings.directory.display()));
            None
        }
        Some(files) => {
            ledger.listed(&files);
            // A name taken already (a file someone made ahead of it, who can read the
            // directory's names) is not this recording's end: another is drawn.
            let mut created = create(&path).await;
            for _ in 0..4 {
                if !matches!(&created, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
                    break;
                }
                path = settings.directory.join(file_name(&meta, unix, Some(rand::random())));
                created = create(&path).await;
            }
            match created {
                Ok(f) => {
                    open = Some(ledger.open(&path));
                    Some(Writing { writer: tokio::io::BufWriter::new(f), _slot: slot.take() })
                }
                Err(e) => {
                    queue.fail(io_reason(&e), &format_args!("{}: {e}", path.display()));
                    None
                }
            }
        }
    };
    // The slot went with the file if one was made; a recording that could not make one only
    // drains its queue from here, and gives its place back now.
    drop(slot);
    let mut written = 0u64;
    if let Some(f) = file.as_mut() {
        let line = header(&settings, &meta, unix) + "\n";
        written += line.len() as u64;
        ledger.charge(&path, line.len() as u64, u64::MAX);
        if let Err(e) = f.write_all(line.as_bytes()).await {
            queue.fail(io_reason(&e), &format_args!("{}: {e}", path.display()));
            file = None;
        }
    }
    let mut carry = [Vec::new(), Vec::new()];
    let mut batch = VecDeque::new();
    while let Some(first) = rx.recv().await {
        batch.push_back(first);
        while let Ok(more) = rx.try_recv() {
            batch.push_back(more);
        }
        let mut freed = 0;
        for chunk in batch.drain(..) {
            freed += chunk.data.len();
            let Some(f) = file.as_mut() else { continue };
            let text = decode(&mut carry[chunk.stream as usize], &chunk.data);
            if text.is_empty() {
                continue;
            }
            let mut line = serde_json::json!([chunk.at, chunk.stream.code(), text]).to_string();
            line.push('\n');
            let n = line.len() as u64;
            // A cap ends this recording, visibly: a marker, then nothing more. Its own
            // (`max_file_size`), or the directory's, which every recording in it is charged.
            let cap = match written + n + MARKER_ROOM > settings.max_file_size {
                true => Some(("file_size", FILE_FULL_MARKER, "max_file_size")),
                false => (!ledger.charge(&path, n, settings.max_total_size)).then_some((
                    "directory_full",
                    DIRECTORY_FULL_MARKER,
                    "max_total_size",
                )),
            };
            if let Some((reason, label, setting)) = cap {
                let marker = serde_json::json!([chunk.at, "m", label]).to_string() + "\n";
                written += marker.len() as u64;
                let _ = f.write_all(marker.as_bytes()).await;
                let _ = f.flush().await;
                queue.fail(reason, &format_args!("{}: {setting} reached", path.display()));
                file = None;
                continue;
            }
            written += n;
            if let Err(e) = f.write_all(line.as_bytes()).await {
                queue.fail(io_reason(&e), &format_args!("{}: {e}", path.display()));
                file = None;
            }
        }
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.flush().await {
                queue.fail(io_reason(&e), &format_args!("{}: {e}", path.display()));
                file = None;
            }
        }
        queue.queued.fetch_sub(freed, Ordering::AcqRel);
        queue.wake();
    }
    let stored = file.is_some();
    if let Some(mut f) = file {
        let _ = f.shutdown().await;
    }
    drop(open);
    crate::metrics::recording_ended(&meta.route, written, stored);
    crate::metrics::recordings_active(-1.0);
    tracing::info!(session = meta.session, route = %meta.route, file = %path.display(), bytes = written, "recording ended");
}

/// A recording's file with its place in the descriptor budget: the place goes when the file
/// does (a cap or a failed write ends the file before the session), whichever way.
struct Writing {
    writer: tokio::io::BufWriter<tokio::fs::File>,
    _slot: Option<crate::limits::OutboundSlot>,
}

impl std::ops::Deref for Writing {
    type Target = tokio::io::BufWriter<tokio::fs::File>;
    fn deref(&self) -> &Self::Target {
        &self.writer
    }
}

impl std::ops::DerefMut for Writing {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.writer
    }
}

/// Bytes kept free at the end of a recording for its gap marker.
const MARKER_ROOM: u64 = 128;

/// The gap marker's label when `max_file_size` ends a recording.
const FILE_FULL_MARKER: &str = "portcullis: recording stopped, max_file_size reached";

/// The gap marker's label when the directory's `max_total_size` ends a recording.
const DIRECTORY_FULL_MARKER: &str = "portcullis: recording stopped, max_total_size reached";

/// Creates the recording's file and takes a shared `flock` on it for as long as it is open:
/// the sweep deletes no file it cannot lock exclusively.
async fn create(path: &Path) -> io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let file = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).await?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(io::Error::from)?;
    Ok(file)
}

/// Whether a new recording fits `dir`: under `max_total` bytes, after evicting the oldest
/// finished recordings when the route says so. The files it holds then, when it fits.
fn make_room(dir: &Path, route: &str, max_total: u64, when_full: WhenFull) -> Option<Vec<Stored>> {
    let mut files = list(dir);
    let mut total: u64 = files.iter().map(|f| f.size).sum();
    if total < max_total {
        return Some(files);
    }
    if when_full == WhenFull::Refuse {
        return None;
    }
    files.retain(|f| {
        if total < max_total || !remove_finished(&f.path) {
            return true;
        }
        total = total.saturating_sub(f.size);
        evicted(route, "size", f);
        false
    });
    (total < max_total).then_some(files)
}

/// The ledgers of the recording directories, one per directory: owned by the process's
/// runtime, shared by every route that records to a directory.
#[derive(Debug, Default)]
pub struct Ledgers(std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<Ledger>>>);

impl Ledgers {
    /// The ledger of `dir`.
    pub fn of(&self, dir: &Path) -> Arc<Ledger> {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(dir.to_owned()).or_default().clone()
    }
}

/// What a recording directory holds, as this process knows it: the files that no recording of
/// this process is writing, by their size when the directory was last listed (and those whose
/// recording ended since, by what it wrote), and what each of this process's live recordings
/// has written, on disk or still buffered. Every write is charged here, so recordings that each
/// started under `max_total_size` cannot together grow the directory past it (a user opening
/// many sessions at once, to fill it and go on unrecorded); a listing replaces only the first
/// part, so the bytes a live recording has not flushed yet are never lost from the count.
#[derive(Debug, Default)]
pub struct Ledger(std::sync::Mutex<Tally>);

#[derive(Debug, Default)]
struct Tally {
    /// Bytes of the files no recording of this process writes.
    finished: u64,
    /// Bytes each live recording of this process has written, by its file.
    live: std::collections::HashMap<PathBuf, u64>,
    /// Their sum.
    live_total: u64,
}

/// A live recording's place in its directory's ledger: its bytes move to the finished files'
/// when it is dropped (the recording ended, however).
pub struct Open {
    ledger: Arc<Ledger>,
    path: PathBuf,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut t = self.ledger.tally();
        if let Some(n) = t.live.remove(&self.path) {
            t.live_total -= n;
            t.finished += n;
        }
    }
}

impl Ledger {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory was listed (or swept) and holds `files`: those no recording of this
    /// process writes are counted by their size on disk.
    fn listed(&self, files: &[Stored]) {
        let mut t = self.tally();
        t.finished = files.iter().filter(|f| !t.live.contains_key(&f.path)).map(|f| f.size).sum();
    }

    /// A recording of this process opened `path`.
    fn open(self: &Arc<Self>, path: &Path) -> Open {
        self.tally().live.insert(path.to_owned(), 0);
        Open { ledger: self.clone(), path: path.to_owned() }
    }

    /// Charges `n` bytes to the recording of `path`, unless they would take the directory past
    /// `max_total`.
    fn charge(&self, path: &Path, n: u64, max_total: u64) -> bool {
        let mut t = self.tally();
        if t.finished.saturating_add(t.live_total).saturating_add(n) > max_total {
            return false;
        }
        match t.live.get_mut(path) {
            Some(live) => {
                *live += n;
                t.live_total += n;
            }
            // Not open (any more): on disk as a finished file's.
            None => t.finished += n,
        }
        true
    }

    /// The bytes the directory holds by this ledger.
    #[cfg(test)]
    fn total(&self) -> u64 {
        let t = self.tally();
        t.finished + t.live_total
    }
}

/// Why a write failed, for the failure's metric and policy: a full disk or quota is a cap the
/// session's own output can reach (`disk_full`, under `on_limit`), any other error `io`.
fn io_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => "disk_full",
        _ => "io",
    }
}

/// The timer's sweep of one recorded route's directory: finished recordings older than
/// `max_age` are deleted (`reason="age"`), and with `when_full = "evict_oldest"` the oldest
/// finished ones until the rest fit `max_total_size` (`reason="size"`). Live recordings (a
/// locked file) are never touched. Blocking: run it off the runtime's workers.
pub fn sweep(route: &str, settings: &RecordingSettings, ledger: &Ledger) {
    let now = SystemTime::now();
    let mut kept = Vec::new();
    for f in list(&settings.directory) {
        let old = now.duration_since(f.modified).is_ok_and(|age| age > settings.max_age);
        if old && remove_finished(&f.path) {
            evicted(route, "age", &f);
        } else {
            kept.push(f);
        }
    }
    if settings.when_full == WhenFull::EvictOldest {
        let mut total: u64 = kept.iter().map(|f| f.size).sum();
        kept.retain(|f| {
            if total <= settings.max_total_size || !remove_finished(&f.path) {
                return true;
            }
            total = total.saturating_sub(f.size);
            evicted(route, "size", f);
            false
        });
    }
    ledger.listed(&kept);
}

/// Deletes `path` if no recording holds it (an exclusive `flock` is granted), holding that
/// lock while it unlinks. A file that cannot be locked is live, or not ours: it stays.
fn remove_finished(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else { return false };
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    std::fs::remove_file(path).is_ok()
}

/// Counts and logs one deleted recording.
fn evicted(route: &str, reason: &'static str, f: &Stored) {
    crate::metrics::recording_evicted(route, reason);
    match reason {
        "age" => tracing::info!(route, file = %f.name, bytes = f.size, "recording deleted: older than max_age"),
        _ => tracing::warn!(route, file = %f.name, bytes = f.size, reason, "recording deleted before max_age"),
    }
}

/// Whether recordings can be written in `dir`: it is a directory (or can be made one) that
/// takes a new file. For `check-config`; the probe file is removed.
pub fn check_directory(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".portcullis-check-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
    std::fs::remove_file(&probe)
}

/// A recording on disk.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its path.
    pub path: PathBuf,
    /// Its file name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Last written.
    pub modified: SystemTime,
}

/// The `.cast` files in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<Stored> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<Stored> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?;
            (name.ends_with(".cast") && meta.is_file()).then(|| Stored {
                path: e.path(),
                name,
                size: meta.len(),
                modified: meta.modified().unwrap_or(UNIX_EPOCH),
            })
        })
        .collect();
    files.sort_by_key(|f| f.modified);
    files
}

/// Whether `name` can only be a recording's file name (no path separator, no dot segments).
pub fn valid_name(name: &str) -> bool {
    name.ends_with(".cast")
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {

    /// A listing of the directory (a recording starting, the sweep) replaces what the ledger
    /// knows of the finished files, never what the live recordings wrote and have not flushed
    /// yet: the cap holds under churn. A recording that ends hands its bytes to the finished
    /// files.
    #[test]
    fn a_listing_keeps_what_live_recordings_have_not_flushed() {
        let ledger = std::sync::Arc::new(Ledger::default());
        let stored = |name: &str, size| Stored {
            path: PathBuf::from(format!("/r/{name}")),
            name: name.to_owned(),
            size,
            modified: UNIX_EPOCH,
        };
        ledger.listed(&[stored("old.cast", 500)]);
        let live = ledger.open(Path::new("/r/live.cast"));
        assert!(ledger.charge(Path::new("/r/live.cast"), 400, 1000));
        // Listed while the live recording has flushed 100 of its 400 bytes: 900 still.
        ledger.listed(&[stored("old.cast", 500), stored("live.cast", 100)]);
        assert_eq!(ledger.total(), 900);
        assert!(!ledger.charge(Path::new("/r/live.cast"), 101, 1000), "past the cap");
        assert!(ledger.charge(Path::new("/r/live.cast"), 100, 1000));
        drop(live);
        assert_eq!(ledger.total(), 1000, "an ended recording's bytes stay counted");
        // Swept: the old file evicted, the ended one on disk whole.
        ledger.listed(&[stored("live.cast", 500)]);
        assert_eq!(ledger.total(), 500);
    }

    /// A full disk or quota is a cap the session's own output reaches (`on_limit`), not a
    /// failing disk (`on_backlog`): under the defaults, a user who fills the disk is closed
    /// rather than going on unrecorded.
    #[test]
    fn a_full_disk_is_a_cap_not_a_failing_disk() {
        assert_eq!(io_reason(&io::Error::from_raw_os_error(28)), "disk_full", "ENOSPC");
        assert_eq!(io_reason(&io::Error::from_raw_os_error(122)), "disk_full", "EDQUOT");
        assert_eq!(io_reason(&io::Error::from_raw_os_error(5)), "io", "EIO");
    }

    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_joined_and_invalid_bytes_are_replaced() {
        let mut carry = Vec::new();
        let s = "héllo → wörld";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(1) {
            out.push_str(&decode(&mut carry, chunk));
        }
        assert_eq!(out, s);
        assert!(carry.is_empty());
        assert_eq!(decode(&mut carry, b"a\xffb"), "a\u{fffd}b");
        assert_eq!(decode(&mut carry, b"\xe2\x86"), "");
        assert_eq!(decode(&mut carry, b"\x92!"), "→!");
    }

    #[test]
    fn names_that_could_leave_the_directory_are_not_recordings() {
        assert!(valid_name("1767225600-terminal-7.cast"));
        for bad in ["../x.cast", "a/b.cast", ".cast", "x.txt", "..cast", "a b.cast"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
