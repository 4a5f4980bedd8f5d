//! Zero-downtime binary upgrade: a running process hands its listening sockets to a new one.
//!
//! On SIGUSR2 the running process ([`hand_over`]) opens a Unix socket in its runtime directory
//! (one only its user can enter, created 0700: [`runtime_dir`]), starts the binary at its own
//! path (the new one, after a package upgrade) with the same configuration file and
//! `PORTCULLIS_HANDOVER` naming that socket, and waits. It sends its sockets only to a peer
//! whose `SO_PEERCRED` pid is the child it spawned; any other process that connects is hung up
//! on with nothing sent, and the new process checks in turn that its peer is its parent. The new process loads and
//! validates its configuration first: if it refuses it, it exits and the old one keeps serving.
//! Otherwise it connects ([`receive`]), receives every listening socket with `SCM_RIGHTS`, each
//! named by its listener and configured address, takes those its configuration still has (and
//! binds the rest), and says `ready` once it accepts. Only then does the old process stop
//! accepting and drain its sessions as on SIGTERM, and exit 0.
//!
//! Both processes hold the same sockets (the same kernel queue), so no connection is refused
//! and none that waits in the queue is lost: until the old one stops accepting, either may take
//! it; from then on the new one does. Sessions already open stay with the old process until
//! they end or its drain closes them (1001, spread over `drain_spread`).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use crate::config::Config;
use crate::server::{Bound, ServerError};

/// The environment variable that tells a new process to take its sockets over.
pub const ENV: &str = "PORTCULLIS_HANDOVER";

/// Most sockets one message of a handover carries; a handover with more (thread-per-core
/// workers have a socket each per address) sends them in several messages, each but the last
/// with the line [`MORE`]. Below Linux's 253 descriptors a message.
const MAX_SOCKETS: usize = 64;

/// Most messages one handover sends: 4,096 sockets.
const MAX_MESSAGES: usize = 64;

/// The line that says another message of sockets follows (a name line always has a tab; an
/// older process, which reads one message, skips it).
const MORE: &str = "more";

/// How long the old process waits for the new one to connect, and then to be ready.
const WAIT: Duration = Duration::from_secs(30);

/// Why a handover did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The new process could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// The new process exited before it was ready (its configuration was refused, or it
    /// failed to start serving).
    #[error("the new process exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    /// The new process did not connect or say ready in time.
    #[error("the new process was not ready within {0:?}")]
    Timeout(Duration),
    /// The handover socket failed.
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    /// The runtime directory is not a directory of this user's that only it can enter.
    #[error("{0} is not a directory owned by this user with mode 0700; the hand-over socket cannot go there")]
    UnsafeDir(PathBuf),
    /// The new process could not serve on the sockets, and said why.
    #[error("the new process refused the sockets: {0}")]
    Refused(String),
    /// The new process sent something other than `ready`.
    #[error("the new process answered {0:?}, not ready")]
    Protocol(String),
}

/// How the new process's answer starts when it cannot serve on the sockets; the reason follows.
const REFUSED: &str = "refused: ";

/// The directory for hand-over sockets: `configured`, else `$XDG_RUNTIME_DIR/portcullis`, else
/// `portcullis-<uid>` in the temporary directory. Created 0700 when missing; an existing one
/// must belong to this user and admit no one else, or the handover is refused.
pub fn runtime_dir(configured: Option<&Path>) -> Result<PathBuf, HandoverError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = rustix::process::geteuid().as_raw();
    let dir = match (configured, std::env::var_os("XDG_RUNTIME_DIR")) {
        (Some(d), _) => d.to_owned(),
        (None, Some(x)) if !x.is_empty() => PathBuf::from(x).join("portcullis"),
        _ => std::env::temp_dir().join(format!("portcullis-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    // Not followed through a link: the directory itself must be ours and private.
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(HandoverError::UnsafeDir(dir));
    }
    Ok(dir)
}

/// In the running process: starts `binary run --config config_path` and hands it `sockets`
/// through a socket in its [`runtime_dir`]. `Ok` once the new process accepts on them: the caller
/// then drains and exits.
pub async fn hand_over(
    binary: &Path,
    config_path: &Path,
    configured_dir: Option<&Path>,
    sockets: Vec<(String, SocketAddr, OwnedFd)>,
) -> Result<(), HandoverError> {
    let path = runtime_dir(configured_dir)?.join(format!("handover-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let result = hand_over_on(listener, &path, binary, config_path, sockets).await;
    let _ = std::fs::remove_file(&path);
    result
}

async fn hand_over_on(
    listener: UnixListener,
    path: &Path,
    binary: &Path,
    config_path: &Path,
    sockets: Vec<(String, SocketAddr, OwnedFd)>,
) -> Result<(), HandoverError> {
    let mut child = tokio::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(config_path)
        .env(ENV, path)
        .spawn()
        .map_err(|source| HandoverError::Spawn { binary: binary.display().to_string(), source })?;
    let child_pid = child.id().unwrap_or(0);
    tracing::info!(new_pid = child_pid, binary = %binary.display(), "handover: new process started");
    // The exchange is a few blocking calls on a local socket: on the blocking pool.
    let mut exchange = tokio::task::spawn_blocking(move || -> Result<(), HandoverError> {
        listener.set_nonblocking(false)?;
        let mut stream = accept_child(&listener, child_pid, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        send_sockets(&stream, &sockets)?;
        let mut answer = [0u8; 1024];
        let n = stream.read(&mut answer)?;
        match &answer[..n] {
            b"ready\n" => Ok(()),
            other => match other.strip_prefix(REFUSED.as_bytes()) {
                Some(why) => {
                    Err(HandoverError::Refused(String::from_utf8_lossy(why).trim_end().escape_debug().to_string()))
                }
                None => Err(HandoverError::Protocol(String::from_utf8_lossy(other).escape_debug().to_string())),
            },
        }
    });
    let joined = |done: Result<Result<(), HandoverError>, tokio::task::JoinError>| {
        done.map_err(|e| HandoverError::Io(std::io::Error::other(e))).and_then(|r| r)
    };
    let result = tokio::select! {
        done = &mut exchange => joined(done),
        status = child.wait() => {
            // A reason it wrote before it exited says more than its exit status.
            // Bounded: a process that exited before it connected leaves the exchange waiting.
            match tokio::time::timeout(Duration::from_secs(2), &mut exchange).await.map(joined) {
                Ok(Err(refused @ HandoverError::Refused(_))) => Err(refused),
                _ => status.map_err(HandoverError::from).and_then(|s| Err(HandoverError::Exited(s))),
            }
        }
    };
    if result.is_err() {
        // Never two processes serving after a failed handover: the new one goes.
        let _ = child.start_kill();
    }
    result
}

/// Accepts the connection of the process `child`, giving up after `limit` (the listener is
/// polled, so a new process that never connects does not hold a blocking thread forever). Any
/// other process that connects (its `SO_PEERCRED` pid is not the child's) is hung up on with
/// nothing sent, and the wait goes on.
fn accept_child(listener: &UnixListener, child: u32, limit: Duration) -> Result<UnixStream, HandoverError> {
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let peer = rustix::net::sockopt::socket_peercred(&s).map_err(std::io::Error::from)?;
                let pid = peer.pid.as_raw_nonzero().get().unsigned_abs();
                if pid != child {
                    tracing::warn!(
                        peer_pid = pid,
                        peer_uid = peer.uid.as_raw(),
                        new_pid = child,
                        "handover: a process other than the new one connected; hung up on"
                    );
                    continue;
                }
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(HandoverError::Timeout(limit));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message: a line `name\taddress` per socket, and the sockets themselves.
fn send_sockets(stream: &UnixStream, sockets: &[(String, SocketAddr, OwnedFd)]) -> Result<(), HandoverError> {
    if sockets.len() > MAX_SOCKETS * MAX_MESSAGES {
        let most = MAX_SOCKETS * MAX_MESSAGES;
        return Err(HandoverError::Protocol(format!("{} sockets, at most {most}", sockets.len())));
    }
    let batches = sockets.len().div_ceil(MAX_SOCKETS).max(1);
    for (i, batch) in sockets.chunks(MAX_SOCKETS).enumerate() {
        let mut names: String = batch.iter().map(|(name, addr, _)| format!("{name}\t{addr}\n")).collect();
        if i + 1 < batches {
            names.push_str(MORE);
            names.push('\n');
        }
        let fds: Vec<_> = batch.iter().map(|(_, _, fd)| fd.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(HandoverError::Protocol("too many sockets for one message".into()));
        }
        let sent = sendmsg(stream, &[IoSlice::new(names.as_bytes())], &mut control, SendFlags::empty())
            .map_err(std::io::Error::from)?;
        if sent != names.len() {
            return Err(HandoverError::Protocol("the socket list was cut".into()));
        }
    }
    Ok(())
}

/// A new process's side of the handover, once it has its sockets: say [`Ready::ready`] when it
/// accepts on them.
pub struct Ready(UnixStream);

impl Ready {
    /// Tells the old process to stop accepting and drain.
    pub fn ready(mut self) -> std::io::Result<()> {
        self.0.write_all(b"ready\n")
    }
}

/// In the new process (started with [`ENV`] set to `socket`): receives the old process's
/// sockets and binds `config`'s listeners on them, binding fresh those it did not send.
pub fn receive(config: &Config, socket: &Path) -> Result<(Bound, Ready), ServerError> {
    let io = |e: std::io::Error| ServerError::Handover(e.to_string());
    let stream = UnixStream::connect(socket).map_err(io)?;
    // Only the process that started this one may hand it sockets.
    let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(|e| io(e.into()))?;
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
    if Some(peer.pid.as_raw_nonzero().get()) != parent {
        return Err(ServerError::Handover(format!(
            "the hand-over socket's owner (pid {}) is not this process's parent",
            peer.pid.as_raw_nonzero()
        )));
    }
    let mut offered: Vec<Option<(String, SocketAddr, OwnedFd)>> = Vec::new();
    for messages in 0..MAX_MESSAGES {
        let mut names = vec![0u8; 64 * 1024];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(&stream, &mut [IoSliceMut::new(&mut names)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(|e| io(e.into()))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        let text = String::from_utf8_lossy(&names[..got.bytes]).into_owned();
        let labels: Vec<(String, SocketAddr)> = text
            .lines()
            .filter_map(|l| {
                let (name, addr) = l.split_once('\t')?;
                Some((name.to_owned(), addr.parse().ok()?))
            })
            .collect();
        if labels.len() != fds.len() {
            return Err(ServerError::Handover(format!("{} socket names for {} sockets", labels.len(), fds.len())));
        }
        if got.bytes == 0 && messages > 0 {
            return Err(ServerError::Handover("the old process hung up before its last socket".into()));
        }
        offered.extend(labels.into_iter().zip(fds).map(|((n, a), fd)| Some((n, a, fd))));
        if !text.lines().any(|l| l == MORE) {
            break;
        }
        if messages + 1 == MAX_MESSAGES {
            return Err(ServerError::Handover(format!("more than {MAX_MESSAGES} messages of sockets")));
        }
    }
    let bound = Bound::bind_with(config, |name, addr| {
        let slot = offered.iter_mut().find(|o| o.as_ref().is_some_and(|(n, a, _)| n == name && *a == addr))?;
        slot.take().map(|(_, _, fd)| std::net::TcpListener::from(fd))
    });
    let bound = match bound {
        Ok(b) => b,
        Err(e) => {
            // The old process logs why: this process's own message may not outlive the kill
            // that follows a refusal.
            let _ = (&stream).write_all(format!("{REFUSED}{e}\n").as_bytes());
            return Err(e);
        }
    };
    let unused = offered.iter().flatten().count();
    tracing::info!(
        received = offered.len(),
        not_in_this_configuration = unused,
        "handover: listening sockets received"
    );
    Ok((bound, Ready(stream)))
}
