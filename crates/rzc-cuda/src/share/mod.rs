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
//! - Every process maps shared memory read-only (the uploader once it has
//!   written it), or does not share: one process's in-place write must not
//!   change another's weights. A caller may allow writable sharing
//!   ([`ShareOptions::writable`]); such uploads meet under another name, so
//!   they never share with processes that asked for protection.
//!
//! Anything that does not hold gives a private upload and a [`Fallback`]
//! saying why: never a failure, never someone else's weights.

mod inherit;
mod rendezvous;
pub(crate) mod server;
mod verify;
mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::driver::PrimaryContext;
use crate::error::{Error, ErrorKind, Result};
use crate::layout::DeviceTensor;
use crate::memory::DeviceMemory;
use crate::vmm;
use inherit::NotInherited;
use rendezvous::Paths;
use rzc_core::digest::Digest;
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
/// send the offer (a live server answers in microseconds), and for room in
/// the queue of a server's connections.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How a refusal begins when the uploader's memory may not be shared because
/// the driver would not map it read-only (the driver's error follows).
const NOT_READ_ONLY: &str = "not read-only: ";

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
    /// Share even where the device maps the memory writable in some process
    /// (then one process's in-place write changes every process's weights).
    /// `false`: every process that shares maps the memory read-only, and
    /// where the driver will not, each keeps its own copy
    /// ([`Fallback::NotReadOnly`]).
    pub writable: bool,
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
    /// The driver would not map the shared memory read-only in this process
    /// (and writable sharing was not allowed).
    NotReadOnly(String),
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
            Fallback::NotReadOnly(_) => 11,
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
            Fallback::NotReadOnly(why) => format!(
                "{why}: sharing it would let one process's in-place write change every process's \
                 weights, so this process keeps its own copy (allow writable sharing to share it anyway)"
            ),
        }
    }
}

/// What a share found.
pub enum Attached {
    /// Memory another process uploaded (verified: what this process read
    /// back), or that this process mapped for an earlier load (`None`).
    Found {
        memory: Arc<DeviceMemory>,
        readback: Option<Readback>,
    },
    /// Nobody has it yet: this process fills `memory`, then publishes it.
    Upload {
        memory: DeviceMemory,
        publish: Box<Publish>,
    },
    /// Sharing does not apply.
    Private(Fallback),
}

/// What a share needs of the buffer: its content digest and where its
/// tensors lie on the device and on the host.
pub struct Content<'a> {
    pub size: usize,
    pub digest: Digest,
    pub tensors: &'a [DeviceTensor],
    pub host: Vec<&'a [u8]>,
}

/// Shared memory of this process and its content digest, by rendezvous name.
type Registry = HashMap<String, (Digest, Weak<DeviceMemory>)>;

/// Shared memory of this process, by rendezvous name: a second load of the
/// same key in one process uses the memory the first mapped (a process
/// cannot import its own export).
fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The one shared load this process runs at a time: two threads loading
/// one key at once would otherwise import this process's own export.
static ATTACHING: Mutex<()> = Mutex::new(());

/// Looks for the device memory of `content` on `ctx`'s device under
/// `opts.key`: what another process uploaded (imported and verified), or
/// what this process is to upload and publish, or why sharing does not
/// apply; and the rendezvous directory's note. Waits for an upload in
/// progress elsewhere up to `opts.wait`. Errors are the device's own (out of
/// memory): everything else falls back to a private upload.
pub fn attach(
    ctx: &Arc<PrimaryContext>,
    content: &Content<'_>,
    opts: &ShareOptions,
) -> Result<(Attached, String)> {
    let one = ATTACHING.lock().unwrap_or_else(|p| p.into_inner());
    let (size, paths, name, dir_note) = match prepare(ctx, content, opts) {
        Ok(p) => p,
        Err(why) => return Ok((Attached::Private(why), String::new())),
    };
    let found = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .and_then(|(digest, m)| Some((*digest, m.upgrade()?)));
    if let Some((digest, memory)) = found {
        let attached = if digest == content.digest {
            Attached::Found {
                memory,
                readback: None,
            }
        } else {
            Attached::Private(Fallback::OtherContent)
        };
        return Ok((attached, dir_note));
    }
    let pending = Publish {
        _one: one,
        name,
        paths,
        lock: None,
        digest: content.digest,
        writable: opts.writable,
    };
    Ok((meet(ctx, content, size, pending, opts.wait)?, dir_note))
}

/// Connects to whoever serves the memory, or takes the lock to upload it,
/// until `wait` has passed.
fn meet(
    ctx: &Arc<PrimaryContext>,
    content: &Content<'_>,
    size: usize,
    mut pending: Publish,
    wait: Duration,
) -> Result<Attached> {
    let deadline = Instant::now() + wait;
    let mut refused_since = None;
    loop {
        match connect(&pending.paths, &mut refused_since) {
            Step::Offer(offer, fd) => {
                if offer.digest != content.digest || offer.size != size {
                    return Ok(Attached::Private(Fallback::OtherContent));
                }
                let memory = match DeviceMemory::import(ctx.clone(), fd.as_fd(), size) {
                    Ok(m) => m,
                    Err(e) => {
                        return Ok(Attached::Private(Fallback::ImportFailed(
                            e.message().to_owned(),
                        )))
                    }
                };
                if !memory.read_only() && !pending.writable {
                    // Unmapped unused (dropped here): nothing wrote through it.
                    return Ok(Attached::Private(Fallback::NotReadOnly(
                        "the driver would not map the shared memory read-only in this process"
                            .into(),
                    )));
                }
                let readback = match verify::verify(&memory, content.tensors, &content.host) {
                    Ok(r) => r,
                    Err(why) => return Ok(Attached::Private(Fallback::Mismatch(why))),
                };
                // Imported memory is mapped read-only (or writable sharing
                // is allowed): publishing it cannot fall back.
                let (memory, _) = pending.publish(memory);
                return Ok(Attached::Found {
                    memory,
                    readback: Some(readback),
                });
            }
            Step::Stop(why) => return Ok(Attached::Private(why)),
            Step::Again => {}
            Step::NoServer => match rendezvous::try_lock(&pending.paths.lock) {
                Ok(Some(lock)) => {
                    let memory = match DeviceMemory::new_shareable(ctx.clone(), size) {
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::OutOfMemory => return Err(e),
                        Err(e) => {
                            return Ok(Attached::Private(Fallback::NotShareable(
                                e.message().to_owned(),
                            )))
                        }
                    };
                    pending.lock = Some(NotInherited::new(lock));
                    return Ok(Attached::Upload {
                        memory,
                        publish: Box::new(pending),
                    });
                }
                Ok(None) => {} // another process is uploading: wait for it to serve
                Err(e) => {
                    return Ok(Attached::Private(Fallback::Rendezvous(format!(
                        "cannot take the lock {}: {e}",
                        pending.paths.lock.display()
                    ))))
                }
            },
        }
        if Instant::now() >= deadline {
            return Ok(Attached::Private(Fallback::Waited(wait)));
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
        |what: &str, e: Error| Fallback::Unsupported(format!("{what}: {}", e.message()));
    match vmm::shareable(ctx) {
        Ok(true) => {}
        Ok(false) => return Err(Fallback::Unsupported(
            "the device does not share memory between processes (no virtual memory management with POSIX descriptors)".into(),
        )),
        Err(e) => return Err(unsupported("cannot tell whether the device shares memory", e)),
    }
    let uuid = ctx
        .uuid()
        .map_err(|e| unsupported("cannot identify the GPU", e))?;
    let size = vmm::shareable_size(ctx, content.size)
        .map_err(|e| unsupported("cannot size shareable memory", e))?;
    let dir = rendezvous::directory(opts.dir.as_deref()).map_err(Fallback::NoDirectory)?;
    let name = rendezvous::name(&opts.key, &uuid, opts.writable);
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
    let socket = || paths.sock.display().to_string();
    let silent = || {
        Step::Stop(Fallback::Silent {
            socket: socket(),
            waited: ANSWER_WITHIN,
        })
    };
    match wire::connect_within(&paths.sock, ANSWER_WITHIN) {
        Ok(conn) if !wire::same_user(&conn) => Step::Stop(Fallback::OtherUser(socket())),
        Ok(conn) => match wire::receive_offer(&conn, ANSWER_WITHIN) {
            Ok((offer, fd)) => Step::Offer(offer, fd),
            Err(NoOffer::Silent) => silent(),
            // The server went away mid-answer (it died, or stopped serving).
            Err(NoOffer::Gone) => Step::Again,
            Err(NoOffer::Unable(why)) => match why.strip_prefix(NOT_READ_ONLY) {
                Some(e) => Step::Stop(Fallback::NotReadOnly(format!(
                    "the driver would not map the memory uploaded by the process serving {} read-only ({e})",
                    socket()
                ))),
                None => Step::Stop(Fallback::ImportFailed(format!(
                    "the process serving {} could not export it (cuMemExportToShareableHandle: {why})",
                    socket()
                ))),
            },
            Err(NoOffer::Foreign(why)) => Step::Stop(Fallback::Rendezvous(format!(
                "the process serving {}: {why}",
                socket()
            ))),
        },
        // A listener that accepts no one: as silent as one that never answers.
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => silent(),
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

/// What publishing memory this process uploads or imports needs: the
/// rendezvous, the serving lock when this process took it, the content
/// digest, and whether writable memory may be shared. Holds the process's
/// one shared load until it is done.
pub struct Publish {
    _one: MutexGuard<'static, ()>,
    name: String,
    paths: Paths,
    lock: Option<NotInherited<File>>,
    digest: Digest,
    writable: bool,
}

impl Publish {
    /// Starts serving (or waiting to serve) `memory`, written: from now on
    /// this process and every importer only read it. Records it for later
    /// loads in this process. Memory this process uploaded that the driver
    /// will not map read-only here is not shared unless writable sharing was
    /// allowed: it stays this process's own, and the fallback says why. It
    /// keeps the serving lock and answers every loader that comes with why
    /// (each then uploads its own at once, where releasing the lock would
    /// make them take it, and fail the same way, one after another).
    pub fn publish(self, mut memory: DeviceMemory) -> (Arc<DeviceMemory>, Option<Fallback>) {
        let mut refuse = None;
        if memory.sharing() == Sharing::Uploaded {
            if let Err(e) = memory.make_read_only() {
                if !self.writable {
                    refuse = Some(e.message().to_owned());
                }
            }
        }
        if let Ok((ctx, handle)) = memory.exporter() {
            let offer = Offer {
                size: memory.size(),
                digest: self.digest,
            };
            let exporter = Exporter {
                ctx,
                handle,
                offer,
                refuse: refuse
                    .as_ref()
                    .map(|e| format!("{NOT_READ_ONLY}{}", server::driver_reason(e))),
            };
            memory.serve(Server::start(self.paths, self.lock, exporter));
        }
        if let Some(e) = refuse {
            memory.keep_private();
            let why = format!("the driver would not map the uploaded memory read-only ({e})");
            return (Arc::new(memory), Some(Fallback::NotReadOnly(why)));
        }
        let memory = Arc::new(memory);
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.name, (self.digest, Arc::downgrade(&memory)));
        (memory, None)
    }
}
