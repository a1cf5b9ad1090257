//! What crosses the socket: one message from the server, with the
//! descriptor of the memory attached (`SCM_RIGHTS`), and nothing from the
//! client. The message is small and fixed (48 bytes), so the server sends
//! it without waiting on the client: a client that never reads holds up no
//! one.
//!
//! Message: `MAGIC` (8 bytes), the allocation's size (8, little-endian), the
//! content digest of the buffer in it (32). A server that cannot export the
//! memory answers `REFUSAL` (8 bytes) and why, in up to 40 bytes of UTF-8
//! padded with zeros, with no descriptor: the client then stops at once
//! instead of taking the silence for a server that went away.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rzc_core::digest::Digest;

const MAGIC: &[u8; 8] = b"RZCSHR03";
const REFUSAL: &[u8; 8] = b"RZCNOT03";
const LEN: usize = 48;

/// What a server offers.
pub struct Offer {
    pub size: usize,
    pub digest: Digest,
}

/// Why no offer came.
pub enum NoOffer {
    /// Nothing arrived within the time allowed.
    Silent,
    /// The server hung up without an answer: it died or stopped serving.
    /// Worth looking again.
    Gone,
    /// The server said it cannot export the memory, and why.
    Unable(String),
    /// An answer our server never sends (another protocol version, or not
    /// ours), or one this process could not take (no room for the
    /// descriptor): looking again would not change it.
    Foreign(String),
}

/// The uid of the process at the other end of a Unix socket.
pub fn peer_uid(s: &UnixStream) -> std::io::Result<libc::uid_t> {
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

/// Whether the process at the other end runs as this user.
pub fn same_user(s: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    peer_uid(s)
        .map(|uid| uid == unsafe { libc::geteuid() })
        .unwrap_or(false)
}

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

/// Sends `bytes` with `fd` attached, without blocking: a full socket buffer
/// is an error, not a wait.
pub fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
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
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    sent_whole(n, bytes.len())
}

/// A send's result, from what the call returned: all of `len` bytes, or
/// why not (its error, or a short send).
fn sent_whole(n: isize, len: usize) -> std::io::Result<()> {
    match n {
        n if n == len as isize => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Err(std::io::Error::other("short send")),
    }
}

/// Receives exactly `bytes.len()` bytes and the descriptor sent with them.
pub fn recv_with_fd(s: &UnixStream, bytes: &mut [u8]) -> std::io::Result<Option<OwnedFd>> {
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
    // Every descriptor that arrived is ours to close, however many a peer
    // sent (the buffer has room for two); only exactly one is an answer.
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `control`,
    // reading as many descriptors as each message's length says.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for k in 0..payload / std::mem::size_of::<RawFd>() {
                    let mut raw: RawFd = -1;
                    std::ptr::copy_nonoverlapping(
                        libc::CMSG_DATA(cmsg).add(k * std::mem::size_of::<RawFd>()),
                        &mut raw as *mut RawFd as *mut u8,
                        std::mem::size_of::<RawFd>(),
                    );
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "the descriptor sent was cut off (MSG_CTRUNC): this process may have too many open files",
        ));
    }
    if fds.len() > 1 {
        return Err(std::io::Error::other("more than one descriptor was sent"));
    }
    let fd = fds.pop();
    if n as usize != bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server hung up",
        ));
    }
    Ok(fd)
}

/// Sends the offer of `fd`, without blocking.
pub fn send_offer(s: &UnixStream, offer: &Offer, fd: RawFd) -> std::io::Result<()> {
    let mut m = [0u8; LEN];
    m[..8].copy_from_slice(MAGIC);
    m[8..16].copy_from_slice(&(offer.size as u64).to_le_bytes());
    m[16..48].copy_from_slice(&offer.digest);
    send_with_fd(s, &m, fd)
}

/// Tells the client why the memory cannot be handed over (the first 40
/// bytes of `why`, cut at a character), without blocking.
pub fn send_refusal(s: &UnixStream, why: &str) -> std::io::Result<()> {
    let mut m = [0u8; LEN];
    m[..8].copy_from_slice(REFUSAL);
    let mut end = why.len().min(LEN - 8);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    m[8..8 + end].copy_from_slice(&why.as_bytes()[..end]);
    // SAFETY: sends `LEN` bytes of a live buffer.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            m.as_ptr().cast(),
            LEN,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    sent_whole(n, LEN)
}

/// Waits up to `patience` for the server's offer.
pub fn receive_offer(s: &UnixStream, patience: Duration) -> Result<(Offer, OwnedFd), NoOffer> {
    s.set_read_timeout(Some(patience.max(Duration::from_millis(1))))
        .map_err(|e| NoOffer::Foreign(format!("cannot wait for the answer: {e}")))?;
    let mut m = [0u8; LEN];
    let fd = match recv_with_fd(s, &mut m) {
        Ok(fd) => fd,
        Err(e) => {
            use std::io::ErrorKind::*;
            return Err(match e.kind() {
                WouldBlock | TimedOut => NoOffer::Silent,
                UnexpectedEof | ConnectionReset | BrokenPipe => NoOffer::Gone,
                _ => NoOffer::Foreign(format!("its answer could not be received: {e}")),
            });
        }
    };
    if &m[..8] == REFUSAL {
        let why = String::from_utf8_lossy(&m[8..]);
        return Err(NoOffer::Unable(why.trim_end_matches('\0').to_owned()));
    }
    if &m[..8] != MAGIC {
        return Err(NoOffer::Foreign(
            "its answer is not an offer of this version of ray-zerocopy (does another version serve this key?)"
                .into(),
        ));
    }
    let Some(fd) = fd else {
        return Err(NoOffer::Foreign(
            "its offer came without a descriptor".into(),
        ));
    };
    let size = u64::from_le_bytes(m[8..16].try_into().expect("8 bytes")) as usize;
    let digest = m[16..48].try_into().expect("32 bytes");
    Ok((Offer { size, digest }, fd))
}

/// Connects to the Unix socket at `path`, waiting at most `patience` for
/// room in its queue of connections. A listener that never accepts (a
/// stopped or stuck server, or one that is not ours) fills its queue, and a
/// blocking connect then waits until a connection is accepted: forever.
/// Times out with `ErrorKind::TimedOut`; other errors are the kernel's
/// (`ConnectionRefused`: nobody listens; `NotFound`: no socket).
pub fn connect_within(path: &Path, patience: Duration) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as _;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket's path is too long",
        ));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    let deadline = Instant::now() + patience;
    loop {
        // SAFETY: creates a socket; its descriptor is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: connects with a valid address of its size. Not blocking: a
        // Unix socket connects at once or fails with EAGAIN (queue full).
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            let stream = UnixStream::from(sock);
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "its queue of connections stayed full: the listener accepts none",
            ));
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_offer_and_its_descriptor_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        send_offer(
            &a,
            &Offer {
                size: 1 << 21,
                digest: [7; 32],
            },
            file.as_raw_fd(),
        )
        .unwrap();
        let (offer, fd) = receive_offer(&b, Duration::from_secs(1))
            .ok()
            .expect("an offer");
        assert_eq!((offer.size, offer.digest), (1 << 21, [7; 32]));
        assert_ne!(
            fd.as_raw_fd(),
            file.as_raw_fd(),
            "a new descriptor of the same file"
        );
        assert!(same_user(&a) && same_user(&b));
    }

    /// A peer that sends two descriptors is no server of ours.
    #[test]
    fn two_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        let fds = [file.as_raw_fd(), file.as_raw_fd()];
        let m = [0u8; LEN];
        let mut iov = libc::iovec {
            iov_base: m.as_ptr() as *mut _,
            iov_len: LEN,
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(8) } as usize];
        let msg = message(&mut iov, &mut control);
        // SAFETY: `control` has room for one header and two descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(8) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), 8);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), LEN as isize);
        }
        // (Counting this process's descriptors would race with the other
        // tests of this binary; that both are owned is in the code.)
        assert!(matches!(
            receive_offer(&b, Duration::from_secs(1)),
            Err(NoOffer::Foreign(_))
        ));
    }

    /// A server that cannot export says why; the client stops at once.
    #[test]
    fn a_refusal_carries_its_reason() {
        let (a, b) = UnixStream::pair().unwrap();
        send_refusal(&a, "CUDA_ERROR_OUT_OF_MEMORY (out of memory) and more é").unwrap();
        match receive_offer(&b, Duration::from_secs(1)) {
            Err(NoOffer::Unable(why)) => {
                assert_eq!(why, "CUDA_ERROR_OUT_OF_MEMORY (out of memory)")
            }
            _ => panic!("not a refusal"),
        }
        // Another protocol's message, with a descriptor: not ours.
        let file = File::open("/proc/self/exe").unwrap();
        let mut m = [0u8; LEN];
        m[..8].copy_from_slice(b"RZCSHR99");
        send_with_fd(&a, &m, file.as_raw_fd()).unwrap();
        assert!(matches!(
            receive_offer(&b, Duration::from_secs(1)),
            Err(NoOffer::Foreign(why)) if why.contains("another version")
        ));
    }

    /// A listener that accepts nothing fills its queue: connecting then
    /// times out instead of blocking forever.
    #[test]
    fn connecting_to_a_listener_that_accepts_nothing_times_out() {
        let dir = std::env::temp_dir().join(format!("rzc-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: shrinks the live listener's queue to its minimum.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        let started = Instant::now();
        let err = loop {
            match connect_within(&path, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 64, "the queue never filled");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_server_is_told_apart_from_a_broken_one() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(
            receive_offer(&b, Duration::from_millis(50)),
            Err(NoOffer::Silent)
        ));
        // Shut down, not dropped: another test of this binary forks, and its
        // child holds a copy of every descriptor (`a` too) for a while.
        a.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(matches!(
            receive_offer(&b, Duration::from_millis(50)),
            Err(NoOffer::Gone)
        ));
    }

    /// The server hands the memory to the same user only: a process that
    /// switched to another user is seen as such (SO_PEERCRED), whatever the
    /// socket's permissions.
    #[test]
    #[ignore = "needs root, to switch users: make test runs it (CI runs as root)"]
    fn another_user_is_recognised() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test switches users: run it as root");
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
