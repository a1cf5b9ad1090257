//! One device copy per GPU: processes of one user on one machine that upload
//! the same content under the same key to the same physical GPU share ONE
//! device allocation, so four actors on a GPU hold the weights once.
//!
//! No daemon: the processes that map the memory serve it themselves.
//! - The memory is made with CUDA's virtual memory management (`cuMemCreate`,
//!   exportable as a POSIX file descriptor); the driver keeps it while any
//!   process maps it.
//! - [`rendezvous`]: a private directory, and per (key, GPU UUID) a lock
//!   file and a Unix socket. Whoever holds the lock serves ([`server`]).
//! - [`wire`]: the server answers each connection of the same user with a
//!   descriptor of the memory and a 48-byte offer (size, content digest).
//! - [`verify`]: the importer maps the memory only if the offer's digest is
//!   its own buffer's, then reads random windows back and compares them with
//!   its host bytes before anyone uses them.
//!
//! Anything that does not hold gives a private upload and a [`Fallback`]
//! saying why: never a failure, never someone else's weights.

mod rendezvous;
mod server;
mod verify;
mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rzc_core::digest::Digest;
use rzc_core::{ErrorKind, Result};

use crate::driver::PrimaryContext;
use crate::layout::DeviceTensor;
use crate::resources::DeviceAllocation;
use crate::staging::Staging;
use rendezvous::Paths;
use server::{Exporter, Server};
use wire::{NoOffer, Offer};

pub use verify::Readback;

/// Poll period of the threads waiting to take over serving, and of loaders
/// waiting for an upload in progress.
const POLL: Duration = Duration::from_millis(20);
/// How long a loader that finds a socket nobody answers waits for a mapper
/// of the memory to take over serving, before it uploads anew.
const TAKEOVER_GRACE: Duration = Duration::from_millis(300);
/// How long an importer waits for a server that accepted its connection to
/// send the offer (a live server answers in microseconds).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Sharing settings of an upload.
#[derive(Clone, Debug)]
pub struct ShareOptions {
    /// Uploads with the same key (of the same user, to the same physical
    /// GPU) meet; they share only if their content digests are equal too.
    pub key: String,
    /// How long a loader waits for another process's upload in progress
    /// before it uploads privately.
    pub wait: Duration,
    /// The content digest of the buffer (`Weights::content_digest`) when the
    /// caller knows it (it sealed the buffer); else it is computed here,
    /// reading every byte.
    pub digest: Option<Digest>,
    /// A rendezvous directory to prefer to the fallback (see
    /// [`rendezvous`]): the Python package names one in Ray's session
    /// directory.
    pub dir: Option<PathBuf>,
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

/// Why a requested share did not happen (the upload is then private).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The device cannot share memory between processes, or cannot say.
    Unsupported(String),
    /// No private rendezvous directory could be had.
    NoDirectory(String),
    /// The process serving the key runs as another user.
    OtherUser(String),
    /// The server accepted the connection but sent nothing in time.
    Silent { socket: String, waited: Duration },
    /// Another buffer is shared under the key (its content digest differs).
    OtherContent,
    /// The driver refused to import the memory.
    ImportFailed(String),
    /// The mapped memory did not match this process's weights on read-back.
    Mismatch(String),
    /// Another process's upload was still in progress after the wait.
    Waited(Duration),
    /// The lock or the socket could not be used.
    Rendezvous(String),
    /// Shareable memory could not be made (this process then uploads its own).
    NotShareable(String),
}

impl Fallback {
    /// Stable numeric code (`RZC_SHARE_FALLBACK_*` in the C API; 0 is none).
    pub fn code(&self) -> u32 {
        match self {
            Fallback::Unsupported(_) => 1,
            Fallback::NoDirectory(_) => 2,
            Fallback::OtherUser(_) => 3,
            Fallback::Silent { .. } => 4,
            Fallback::OtherContent => 5,
            Fallback::ImportFailed(_) => 6,
            Fallback::Mismatch(_) => 7,
            Fallback::Waited(_) => 8,
            Fallback::Rendezvous(_) => 9,
            Fallback::NotShareable(_) => 10,
        }
    }

    /// The note a user reads.
    pub fn note(&self) -> String {
        match self {
            Fallback::Unsupported(why) | Fallback::NoDirectory(why) | Fallback::Rendezvous(why) => {
                why.clone()
            }
            Fallback::OtherUser(sock) => format!("the process serving {sock} runs as another user"),
            Fallback::Silent { socket, waited } => format!(
                "the uploader (the process serving {socket}) did not answer within {:.1} s",
                waited.as_secs_f64()
            ),
            Fallback::OtherContent => {
                "another buffer (different content digest) is shared under this key on this GPU"
                    .into()
            }
            Fallback::ImportFailed(why) => format!("importing the shared memory failed: {why}"),
            Fallback::Mismatch(why) => format!("refused the shared memory: {why}"),
            Fallback::Waited(w) => format!(
                "waited {:.1} s for another process's upload of this buffer to this GPU to finish",
                w.as_secs_f64()
            ),
            Fallback::NotShareable(why) => {
                format!("shareable device memory could not be made: {why}")
            }
        }
    }
}

/// Device memory and, for shared memory, this process's server of it. The
/// server goes first (fields drop in order): nothing is exported from memory
/// that is being released.
pub struct DeviceMemory {
    _server: Option<Server>,
    alloc: DeviceAllocation,
    sharing: Sharing,
    digest: Digest,
}

impl DeviceMemory {
    /// This process's own memory, shared with no one.
    pub fn private(alloc: DeviceAllocation) -> DeviceMemory {
        DeviceMemory {
            _server: None,
            alloc,
            sharing: Sharing::Private,
            digest: [0; 32],
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

/// What a share produced.
pub enum Attached {
    /// Shared memory; what this process staged when it uploaded it, and what
    /// it read back when it imported it.
    Shared {
        memory: Arc<DeviceMemory>,
        staged: Option<Staging>,
        readback: Option<Readback>,
        dir_note: String,
    },
    /// Sharing did not happen.
    Private { why: Fallback, dir_note: String },
}

/// What a share needs of the buffer: its content digest and where its
/// tensors lie on the device and on the host.
pub struct Content<'a> {
    pub size: usize,
    pub digest: Digest,
    pub tensors: &'a [DeviceTensor],
    pub host: Vec<&'a [u8]>,
}

/// Shared memory of this process, by rendezvous name: a second load of the
/// same key in one process uses the memory the first mapped (a process
/// cannot import its own export).
fn registry() -> &'static Mutex<HashMap<String, Weak<DeviceMemory>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<DeviceMemory>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Shares the device memory of `content` on `ctx`'s device under
/// `opts.key`: imports (and verifies) what another process uploaded, or
/// uploads it with `upload` and serves it, or waits for an upload in
/// progress. Errors are those of the upload itself.
pub fn attach(
    ctx: PrimaryContext,
    content: &Content<'_>,
    opts: &ShareOptions,
    upload: impl FnOnce(&DeviceAllocation) -> Result<Staging>,
) -> Result<Attached> {
    // One shared load at a time in a process: two threads loading one key
    // at once would otherwise import this process's own export.
    static ATTACHING: Mutex<()> = Mutex::new(());
    let _one = ATTACHING.lock().unwrap_or_else(|p| p.into_inner());
    let (size, paths, name, dir_note) = match prepare(&ctx, content, opts) {
        Ok(p) => p,
        Err(why) => {
            return Ok(Attached::Private {
                why,
                dir_note: String::new(),
            })
        }
    };
    let private = |why| {
        Ok(Attached::Private {
            why,
            dir_note: dir_note.clone(),
        })
    };
    let shared = |memory, staged, readback| {
        Ok(Attached::Shared {
            memory,
            staged,
            readback,
            dir_note: dir_note.clone(),
        })
    };
    if let Some(m) = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .and_then(Weak::upgrade)
    {
        return if m.digest == content.digest {
            shared(m, None, None)
        } else {
            private(Fallback::OtherContent)
        };
    }
    let deadline = Instant::now() + opts.wait;
    let mut refused_since = None;
    loop {
        match connect(&paths, &mut refused_since) {
            Step::Offer(offer, fd) => {
                if offer.digest != content.digest || offer.size != size {
                    return private(Fallback::OtherContent);
                }
                let alloc = match DeviceAllocation::import(ctx, fd.as_fd(), size) {
                    Ok(a) => a,
                    Err(e) => return private(Fallback::ImportFailed(e.message().to_owned())),
                };
                let readback = match verify::verify(&alloc, content.tensors, &content.host) {
                    Ok(r) => r,
                    Err(why) => return private(Fallback::Mismatch(why)),
                };
                let m = publish(name, paths, None, alloc, Sharing::Imported, content.digest);
                return shared(m, None, Some(readback));
            }
            Step::Stop(why) => return private(why),
            Step::Again => {}
            Step::NoServer => match rendezvous::try_lock(&paths.lock) {
                Ok(Some(lock)) => {
                    let mut alloc = match DeviceAllocation::new_shareable(ctx, size) {
                        Ok(a) => a,
                        Err(e) if e.kind() == ErrorKind::OutOfMemory => return Err(e),
                        Err(e) => return private(Fallback::NotShareable(e.message().to_owned())),
                    };
                    let staged = upload(&alloc)?;
                    // Written: from now on this process and every importer only read it.
                    alloc.make_read_only();
                    let m = publish(
                        name,
                        paths,
                        Some(lock),
                        alloc,
                        Sharing::Uploaded,
                        content.digest,
                    );
                    return shared(m, Some(staged), None);
                }
                Ok(None) => {} // another process is uploading: wait for it to serve
                Err(e) => {
                    return private(Fallback::Rendezvous(format!(
                        "cannot take the lock {}: {e}",
                        paths.lock.display()
                    )))
                }
            },
        }
        if Instant::now() >= deadline {
            return private(Fallback::Waited(opts.wait));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether sharing can apply: the device shares memory, the GPU's identity,
/// the size to make, the rendezvous paths and name, and the directory note.
fn prepare(
    ctx: &PrimaryContext,
    content: &Content<'_>,
    opts: &ShareOptions,
) -> std::result::Result<(usize, Paths, String, String), Fallback> {
    let unsupported =
        |what: &str, e: rzc_core::Error| Fallback::Unsupported(format!("{what}: {}", e.message()));
    match DeviceAllocation::shareable(ctx) {
        Ok(true) => {}
        Ok(false) => return Err(Fallback::Unsupported(
            "the device does not share memory between processes (no virtual memory management with POSIX descriptors)".into(),
        )),
        Err(e) => return Err(unsupported("cannot tell whether the device shares memory", e)),
    }
    let uuid = ctx
        .uuid()
        .map_err(|e| unsupported("cannot identify the GPU", e))?;
    let size = DeviceAllocation::shareable_size(ctx, content.size)
        .map_err(|e| unsupported("cannot size shareable memory", e))?;
    let dir = rendezvous::directory(opts.dir.as_deref()).map_err(Fallback::NoDirectory)?;
    let name = rendezvous::name(&opts.key, &uuid);
    let paths = rendezvous::paths(&dir.path, &name);
    Ok((size, paths, name, dir.note))
}

/// One look at the socket.
enum Step {
    Offer(Offer, std::os::fd::OwnedFd),
    /// Nobody serves: take the lock and upload, or wait for the one who has it.
    NoServer,
    /// Look again after a pause.
    Again,
    Stop(Fallback),
}

fn connect(paths: &Paths, refused_since: &mut Option<Instant>) -> Step {
    match UnixStream::connect(&paths.sock) {
        Ok(conn) if !wire::same_user(&conn) => {
            Step::Stop(Fallback::OtherUser(paths.sock.display().to_string()))
        }
        Ok(conn) => match wire::receive_offer(&conn, ANSWER_WITHIN) {
            Ok((offer, fd)) => Step::Offer(offer, fd),
            Err(NoOffer::Silent) => Step::Stop(Fallback::Silent {
                socket: paths.sock.display().to_string(),
                waited: ANSWER_WITHIN,
            }),
            // The server went away mid-answer (it died, or stopped serving).
            Err(NoOffer::Broken) => Step::Again,
        },
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            // A socket nobody answers: its server died or stopped. Give a
            // process that still maps the memory time to take over.
            let since = *refused_since.get_or_insert_with(Instant::now);
            if since.elapsed() < TAKEOVER_GRACE {
                Step::Again
            } else {
                Step::NoServer
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Step::NoServer,
        Err(e) => Step::Stop(Fallback::Rendezvous(format!(
            "cannot connect to {}: {e}",
            paths.sock.display()
        ))),
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
    digest: Digest,
) -> Arc<DeviceMemory> {
    let server = alloc.exporter().ok().map(|(ctx, handle)| {
        Server::start(
            paths,
            lock,
            Exporter {
                ctx,
                handle,
                offer: Offer {
                    size: alloc.size(),
                    digest,
                },
            },
        )
    });
    let memory = Arc::new(DeviceMemory {
        _server: server,
        alloc,
        sharing,
        digest,
    });
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name, Arc::downgrade(&memory));
    memory
}
