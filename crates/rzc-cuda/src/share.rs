//! One device copy per GPU: processes of one user on one machine that upload
//! the same buffer under the same key to the same physical GPU share ONE
//! device allocation, so four actors on a GPU hold the weights once.
//!
//! How (no daemon: the processes that map the memory serve it themselves):
//! - The memory is made with CUDA's virtual memory management (`cuMemCreate`,
//!   exportable as a POSIX file descriptor). The driver keeps physical memory
//!   while any process maps it, so it outlives the process that made it.
//! - Per (key, GPU UUID) there is a lock file and a Unix socket in a
//!   directory only this user can enter. Whoever holds the lock (`flock`,
//!   released by the kernel when its holder dies) serves: it accepts
//!   connections, checks the peer is the same user (`SO_PEERCRED`), and hands
//!   over a descriptor of the memory (`SCM_RIGHTS`) with the buffer's
//!   identity (its header and a hash of a sample of its bytes), which the
//!   importer compares with its own before mapping anything.
//! - A loader connects and imports; if nobody serves, it takes the lock,
//!   uploads, and serves. Two first loaders at once: one gets the lock, the
//!   other waits (bounded) until the first serves. Every process that maps
//!   the memory keeps trying the lock in a background thread, so when the
//!   server dies (or drops the weights) another mapper takes over and later
//!   loaders still share.
//! - Anything unsupported (no VMM or descriptor export on the device, a
//!   directory that is not private, a different buffer under the key, a
//!   timeout) gives a private upload and a note saying why: never a failure.
//!
//! GPUs are identified by UUID: `CUDA_VISIBLE_DEVICES` gives the same GPU
//! different ordinals in different processes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use rzc_core::{ErrorKind, Result};

use crate::driver::PrimaryContext;
use crate::resources::{export_fd, DeviceAllocation};

/// Sharing settings of an upload.
#[derive(Clone, Debug)]
pub struct ShareOptions {
    /// Uploads with the same key (of the same user, to the same physical
    /// GPU) share one allocation. The Python package uses the sealed object's
    /// id.
    pub key: String,
    /// How long a loader waits for another process's upload in progress
    /// before it uploads privately.
    pub wait: Duration,
}

/// How this process came by its device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Its own upload, shared with no one.
    Private,
    /// It uploaded the shared allocation (and may serve it).
    Uploaded,
    /// It imported the allocation another process uploaded.
    Imported,
}

/// Device memory and, for shared memory, this process's server of it. The
/// server goes first (fields drop in order): nothing is exported from memory
/// that is being released.
pub struct DeviceMemory {
    // Held for its `Drop`: serving stops before the memory is released.
    _server: Option<Server>,
    alloc: DeviceAllocation,
    sharing: Sharing,
}

impl DeviceMemory {
    /// This process's own memory, shared with no one.
    pub fn private(alloc: DeviceAllocation) -> DeviceMemory {
        DeviceMemory {
            _server: None,
            alloc,
            sharing: Sharing::Private,
        }
    }

    /// The allocation.
    pub fn alloc(&self) -> &DeviceAllocation {
        &self.alloc
    }

    /// How this process came by it.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }
}

// ---------------------------------------------------------------------------
// Where the lock and the socket live.

/// Poll period of the threads waiting to take over serving, and of loaders
/// waiting for an upload in progress.
const POLL: Duration = Duration::from_millis(20);
/// How long a loader that finds a socket nobody answers waits for a mapper
/// of the memory to take over serving, before it uploads anew.
const TAKEOVER_GRACE: Duration = Duration::from_millis(300);
const MAGIC: &[u8; 8] = b"RZCSHR01";

struct Paths {
    lock: PathBuf,
    sock: PathBuf,
}

/// The directory of this user's locks and sockets: `RZC_SHARE_DIR`, else
/// `$XDG_RUNTIME_DIR/ray-zerocopy`, else `/tmp/ray-zerocopy-<uid>`; created
/// mode 0700, and refused unless it is a directory this user owns that no one
/// else can enter.
fn share_dir() -> std::result::Result<PathBuf, String> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = match (
        std::env::var_os("RZC_SHARE_DIR"),
        std::env::var_os("XDG_RUNTIME_DIR"),
    ) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(run)) if Path::new(&run).is_dir() => Path::new(&run).join("ray-zerocopy"),
        _ => PathBuf::from(format!("/tmp/ray-zerocopy-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "cannot create the share directory {}: {e}",
                dir.display()
            ))
        }
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the share directory {} is not a directory of this user (uid {uid}) closed to others (mode {:o}, owner {})",
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid()
        ));
    }
    Ok(dir)
}

/// A short, stable name for (key, GPU): socket paths are limited to 108 bytes.
fn name(key: &str, uuid: &[u8; 16]) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same in every process running this build.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    uuid.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn paths(dir: &Path, name: &str) -> std::result::Result<Paths, String> {
    let sock = dir.join(format!("{name}.sock"));
    if sock.as_os_str().len() >= 108 {
        return Err(format!(
            "the socket path {} is too long for a Unix socket",
            sock.display()
        ));
    }
    Ok(Paths {
        lock: dir.join(format!("{name}.lock")),
        sock,
    })
}

/// Takes the serving lock if free: the open lock file, whose closing (or its
/// holder's death) releases the lock.
fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The uid of the process at the other end of a Unix socket.
fn peer_uid(s: &UnixStream) -> std::io::Result<libc::uid_t> {
    // SAFETY: all-zero is a valid ucred.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(cred.uid)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn same_user(s: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    peer_uid(s)
        .map(|uid| uid == unsafe { libc::geteuid() })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// The handshake: MAGIC, allocation size, identity length (24 bytes, sent
// with the descriptor in one sendmsg), then the identity's bytes.

/// Room for one control message carrying one descriptor.
fn control_buffer() -> Vec<u8> {
    // SAFETY: CMSG_SPACE only computes a size.
    vec![0u8; unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize]
}

/// A message over one buffer, with `control` for its ancillary data. The
/// header points into both: they outlive its use.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr; the fields set point to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let mut control = control_buffer();
    let msg = message(&mut iov, &mut control);
    // SAFETY: `control` has room for one SCM_RIGHTS header and descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &fd as *const RawFd as *const u8,
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<RawFd>(),
        );
    }
    // SAFETY: `msg` describes live buffers; the descriptor is duplicated
    // into the receiver, ours stays ours.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n == bytes.len() as isize {
        Ok(())
    } else if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Err(std::io::Error::other("short send"))
    }
}

fn recv_with_fd(s: &UnixStream, bytes: &mut [u8]) -> std::io::Result<Option<OwnedFd>> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut control = control_buffer();
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: `msg` describes live buffers; MSG_CMSG_CLOEXEC keeps a received
    // descriptor out of child processes.
    let n = unsafe {
        libc::recvmsg(
            s.as_raw_fd(),
            &mut msg,
            libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walks the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let mut raw: RawFd = -1;
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    &mut raw as *mut RawFd as *mut u8,
                    std::mem::size_of::<RawFd>(),
                );
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n as usize != bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server hung up",
        ));
    }
    Ok(fd)
}

/// What a server hands over.
struct Offer {
    fd: OwnedFd,
    size: usize,
    identity: Vec<u8>,
}

fn receive_offer(s: &UnixStream) -> std::io::Result<Offer> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = [0u8; 24];
    let fd = recv_with_fd(s, &mut head)?;
    if &head[..8] != MAGIC {
        return Err(std::io::Error::other("not a ray-zerocopy share server"));
    }
    let size = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")) as usize;
    let len = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes")) as usize;
    if len > rzc_core::header::MAX_HEADER_LEN as usize + 64 {
        return Err(std::io::Error::other("identity too large"));
    }
    let mut identity = vec![0u8; len];
    (&*s).read_exact(&mut identity)?;
    let fd = fd.ok_or_else(|| std::io::Error::other("no descriptor was handed over"))?;
    Ok(Offer { fd, size, identity })
}

// ---------------------------------------------------------------------------
// Serving.

/// What the serving thread exports from: the allocation's handle, valid
/// while the `DeviceMemory` owning the server lives (the server is stopped
/// first).
struct Exporter {
    ctx: PrimaryContext,
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
    identity: Arc<[u8]>,
}

// SAFETY: a context and a physical memory handle may be used from any thread.
unsafe impl Send for Exporter {}

impl Exporter {
    fn offer(&self, s: &UnixStream) -> std::io::Result<()> {
        // The handle is live: the server is stopped before it is released.
        let fd = export_fd(&self.ctx, self.handle)
            .map_err(|e| std::io::Error::other(e.message().to_owned()))?;
        let mut head = [0u8; 24];
        head[..8].copy_from_slice(MAGIC);
        head[8..16].copy_from_slice(&(self.size as u64).to_le_bytes());
        head[16..24].copy_from_slice(&(self.identity.len() as u64).to_le_bytes());
        send_with_fd(s, &head, fd.as_raw_fd())?;
        (&*s).write_all(&self.identity)
    }
}

/// This process's share of serving: a thread that serves while it holds the
/// lock, and otherwise waits to take it over. Stopped and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(paths: Paths, lock: Option<File>, exporter: Exporter) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rzc-share".into())
            .spawn(move || serve(paths, lock, exporter, &flag))
            .ok();
        Server { stop, thread }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(paths: Paths, mut lock: Option<File>, exporter: Exporter, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        if lock.is_none() {
            lock = try_lock(&paths.lock).ok().flatten();
            if lock.is_none() {
                std::thread::sleep(POLL);
                continue;
            }
        }
        // We hold the lock: whatever socket file is there is a dead server's.
        let _ = std::fs::remove_file(&paths.sock);
        let Ok(listener) = UnixListener::bind(&paths.sock) else {
            std::thread::sleep(POLL);
            continue;
        };
        while !stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live descriptor.
            if unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) } <= 0 {
                continue;
            }
            if let Ok((conn, _)) = listener.accept() {
                let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
                // Only the same user is handed the memory.
                if same_user(&conn) {
                    let _ = exporter.offer(&conn);
                }
            }
        }
        // The socket file stays: a loader that finds nobody answering waits
        // for another mapper to take over before uploading anew.
        drop(listener);
    }
    drop(lock); // releases the serving lock
}

// ---------------------------------------------------------------------------
// Loading.

/// Shared memory of this process, by name: a second load of the same key in
/// one process uses the memory the first one mapped (a process cannot import
/// its own export).
fn registry() -> &'static Mutex<HashMap<String, Weak<DeviceMemory>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<DeviceMemory>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The outcome of trying to share.
pub enum Attached {
    /// Shared memory: imported, or uploaded by this process (with `upload`).
    Shared(Arc<DeviceMemory>),
    /// Sharing does not apply here; why.
    Private(String),
}

/// Shares the memory for the buffer `identity` describes (see
/// `upload::identity`) on `ctx`'s device under `opts.key`: joins what another process (or this one)
/// uploaded, or uploads it with `upload` (which fills an allocation of
/// `size` bytes) and serves it. `Private` says why sharing does not apply;
/// errors are those of the upload itself.
pub fn attach(
    ctx: PrimaryContext,
    size: usize,
    identity: &[u8],
    opts: &ShareOptions,
    upload: impl FnOnce(&DeviceAllocation) -> Result<()>,
) -> Result<Attached> {
    // One shared load at a time in a process: two threads loading one key
    // at once would otherwise import this process's own export.
    static ATTACHING: Mutex<()> = Mutex::new(());
    let _one = ATTACHING.lock().unwrap_or_else(|p| p.into_inner());
    let private = |why: String| Ok(Attached::Private(why));
    match DeviceAllocation::shareable(&ctx) {
        Ok(true) => {}
        Ok(false) => return private("the device does not share memory between processes (no virtual memory management with POSIX descriptors)".into()),
        Err(e) => return private(format!("cannot tell whether the device shares memory: {}", e.message())),
    }
    let uuid = match ctx.uuid() {
        Ok(u) => u,
        Err(e) => return private(format!("cannot identify the GPU: {}", e.message())),
    };
    let name = name(&opts.key, &uuid);
    if let Some(m) = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .and_then(Weak::upgrade)
    {
        return Ok(Attached::Shared(m));
    }
    let dir = match share_dir() {
        Ok(d) => d,
        Err(why) => return private(why),
    };
    let paths = match paths(&dir, &name) {
        Ok(p) => p,
        Err(why) => return private(why),
    };
    let size = match DeviceAllocation::shareable_size(&ctx, size) {
        Ok(s) => s,
        Err(e) => return private(format!("cannot size shareable memory: {}", e.message())),
    };
    let deadline = Instant::now() + opts.wait;
    let mut refused_since: Option<Instant> = None;
    loop {
        match UnixStream::connect(&paths.sock) {
            Ok(conn) => {
                if !same_user(&conn) {
                    return private(format!(
                        "the process serving {} is another user's",
                        paths.sock.display()
                    ));
                }
                match receive_offer(&conn) {
                    Ok(offer) if offer.identity != identity || offer.size != size => {
                        return private(format!(
                            "another buffer is shared under the key {:?} on this GPU",
                            opts.key
                        ));
                    }
                    Ok(offer) => {
                        let alloc = match DeviceAllocation::import(ctx, offer.fd.as_fd(), size) {
                            Ok(a) => a,
                            Err(e) => {
                                return private(format!(
                                    "importing the shared memory failed: {}",
                                    e.message()
                                ))
                            }
                        };
                        return Ok(Attached::Shared(publish(
                            name,
                            paths,
                            None,
                            alloc,
                            Sharing::Imported,
                            identity,
                        )));
                    }
                    // The server went away mid-handshake (it died, or
                    // stopped serving): look again.
                    Err(_) => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // A socket nobody answers: its server died or stopped. Give
                // a process that still maps the memory time to take over.
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() < TAKEOVER_GRACE {
                    std::thread::sleep(POLL);
                    continue;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return private(format!("cannot connect to {}: {e}", paths.sock.display())),
        }
        match try_lock(&paths.lock) {
            Ok(Some(lock)) => {
                let mut alloc = match DeviceAllocation::new_shareable(ctx, size) {
                    Ok(a) => a,
                    Err(e) if e.kind() == ErrorKind::OutOfMemory => return Err(e),
                    Err(e) => {
                        return private(format!(
                            "shareable device memory could not be made: {}",
                            e.message()
                        ))
                    }
                };
                upload(&alloc)?;
                // Written: from now on this process and every importer only read it.
                alloc.make_read_only();
                return Ok(Attached::Shared(publish(
                    name,
                    paths,
                    Some(lock),
                    alloc,
                    Sharing::Uploaded,
                    identity,
                )));
            }
            Ok(None) => {} // another process is uploading: wait for it to serve
            Err(e) => {
                return private(format!(
                    "cannot take the lock {}: {e}",
                    paths.lock.display()
                ))
            }
        }
        if Instant::now() >= deadline {
            return private(format!(
                "waited {:.1} s for another process's upload of this buffer to this GPU to finish",
                opts.wait.as_secs_f64()
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Starts serving (or waiting to serve) `alloc` and records it for later
/// loads in this process.
fn publish(
    name: String,
    paths: Paths,
    lock: Option<File>,
    alloc: DeviceAllocation,
    sharing: Sharing,
    identity: &[u8],
) -> Arc<DeviceMemory> {
    let server = alloc.exporter().ok().map(|(ctx, handle)| {
        Server::start(
            paths,
            lock,
            Exporter {
                ctx,
                handle,
                size: alloc.size(),
                identity: identity.into(),
            },
        )
    });
    let memory = Arc::new(DeviceMemory {
        _server: server,
        alloc,
        sharing,
    });
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name, Arc::downgrade(&memory));
    memory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let a = name("key", &[1; 16]);
        assert_eq!(a, name("key", &[1; 16]));
        assert_ne!(a, name("key", &[2; 16]), "another GPU");
        assert_ne!(a, name("other", &[1; 16]), "another key");
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn a_descriptor_and_bytes_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        send_with_fd(&a, b"0123456789abcdef01234567", file.as_raw_fd()).unwrap();
        let mut got = [0u8; 24];
        let fd = recv_with_fd(&b, &mut got).unwrap().expect("a descriptor");
        assert_eq!(&got, b"0123456789abcdef01234567");
        assert_ne!(
            fd.as_raw_fd(),
            file.as_raw_fd(),
            "a new descriptor of the same file"
        );
        assert!(same_user(&a) && same_user(&b));
    }

    /// The server hands the memory to the same user only: a process that
    /// switched to another user is seen as such (SO_PEERCRED), whatever the
    /// socket's permissions.
    #[test]
    fn another_user_is_recognised() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: switching to another user needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("rzc-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o777).create(&dir).unwrap();
        // SAFETY: chmod of our own directory (umask may have narrowed it).
        unsafe {
            libc::chmod(
                std::ffi::CString::new(dir.to_str().unwrap())
                    .unwrap()
                    .as_ptr(),
                0o777,
            )
        };
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: the child only calls async-signal-safe functions (setuid,
        // socket, connect, _exit) before exiting.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                libc::setgid(65534);
                libc::setuid(65534);
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as _;
                for (d, s) in addr.sun_path.iter_mut().zip(c_path.as_bytes()) {
                    *d = *s as _;
                }
                let ok = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as _,
                );
                libc::sleep(1);
                libc::_exit(if ok == 0 { 0 } else { 1 });
            }
        }
        let (conn, _) = listener.accept().unwrap();
        assert_eq!(peer_uid(&conn).unwrap(), 65534);
        assert!(!same_user(&conn), "another user's process is refused");
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let _ = std::fs::remove_dir_all(&dir);
    }
}
