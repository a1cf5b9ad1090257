//! Where the processes sharing a device copy meet: a directory only this
//! user can enter, a lock file and a Unix socket per (key, GPU) in it.
//!
//! The directory is the first usable of: `RZC_SHARE_DIR` (set by hand);
//! `$XDG_RUNTIME_DIR/ray-zerocopy` (the per-user runtime directory the
//! login manager makes, closed to others); the caller's choice (the Python
//! package passes one inside Ray's session directory); and a per-user
//! fallback whose name no one else can guess. A candidate is usable when it
//! is a real directory (not a symlink) that this user owns and no one else
//! can enter; one that is not (another user made it first, it is a link, its
//! mode is open) is passed over with a note, never an end to sharing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Name of our subdirectory in the runtime or session directory.
const SUBDIR: &str = "ray-zerocopy";
/// Length of a rendezvous name (hex digits).
const NAME_LEN: usize = 32;

/// The directory chosen, and what was passed over on the way (for an INFO
/// line; empty when the first candidate was usable).
pub struct Dir {
    pub path: PathBuf,
    pub note: String,
}

fn euid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (mode 0700) unless it exists, then checks it is a private
/// directory of this user; why not, otherwise.
fn private_dir(dir: &Path) -> Result<(), String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{} cannot be created: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let uid = euid();
    if meta.file_type().is_symlink() {
        return Err(format!("{} is a symbolic link", dir.display()));
    }
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != uid {
        return Err(format!(
            "{} belongs to uid {}, not to this user (uid {uid})",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is open to others (mode {:o})",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The rendezvous directory (see the module's text); `preferred` is the
/// caller's choice, tried after the runtime directory.
pub fn directory(preferred: Option<&Path>) -> Result<Dir, String> {
    let mut passed = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("RZC_SHARE_DIR") {
        candidates.push(d.into());
    }
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|r| Path::new(r).is_dir()) {
        candidates.push(Path::new(&run).join(SUBDIR));
    }
    if let Some(p) = preferred {
        candidates.push(p.to_owned());
    }
    // The fallback last, and only when reached: it makes a token file.
    let mut candidates = candidates.into_iter().map(Ok).collect::<Vec<_>>();
    candidates.push(Err(()));
    for candidate in candidates {
        let dir = match candidate {
            Ok(dir) => dir,
            Err(()) => match fallback() {
                Ok(dir) => dir,
                Err(why) => {
                    passed.push(why);
                    continue;
                }
            },
        };
        // A socket's path holds at most 107 bytes: `<dir>/<32 hex>.sock`.
        if dir.as_os_str().len() + 1 + NAME_LEN + 5 >= 108 {
            passed.push(format!(
                "{} is too long a path for Unix sockets",
                dir.display()
            ));
            continue;
        }
        match private_dir(&dir) {
            Ok(()) => {
                let note = if passed.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{}; sharing through {} instead",
                        passed.join("; "),
                        dir.display()
                    )
                };
                return Ok(Dir { path: dir, note });
            }
            Err(why) => passed.push(why),
        }
    }
    Err(format!(
        "no private directory for sharing: {}",
        passed.join("; ")
    ))
}

/// `<tmp>/ray-zerocopy-<uid>-<token>`, where the token is 128 random bits
/// kept in `~/.cache/ray-zerocopy/share-token` (mode 0600): every process
/// of this user finds the same directory, and another user cannot guess
/// its name to take it first.
fn fallback() -> Result<PathBuf, String> {
    let token = token().map_err(|e| format!("no per-user share token ({e})"))?;
    Ok(std::env::temp_dir().join(format!("{SUBDIR}-{}-{token}", euid())))
}

fn token() -> Result<String, String> {
    let cache = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(c), _) if !c.is_empty() => PathBuf::from(c),
        (_, Some(h)) if !h.is_empty() => Path::new(&h).join(".cache"),
        _ => return Err("neither XDG_CACHE_HOME nor HOME is set".into()),
    };
    token_in(&cache)
}

/// The token in `<cache>/ray-zerocopy/share-token`, made there if none yet.
/// The `ray-zerocopy` directory must be private to this user (see
/// [`private_dir`]): in one open to others, another user could plant a
/// token of theirs or links where we write.
fn token_in(cache: &Path) -> Result<String, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache)
        .map_err(|e| format!("{}: {e}", cache.display()))?;
    let dir = cache.join(SUBDIR);
    private_dir(&dir)?;
    let path = dir.join("share-token");
    for _ in 0..2 {
        match read_token(&path) {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        // None there yet: write one to a private file, then link it into
        // place (atomic; whoever links first wins, the others read theirs).
        let fresh = random_hex()?;
        let tmp = new_private_file(&dir, fresh.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(fresh),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Err(format!("{} could not be read", path.display()))
}

/// Writes `content` to a new file `<dir>/.share-token.<random>` (mode 0600)
/// and returns its path. The name cannot be guessed, and the file is made
/// with O_EXCL and O_NOFOLLOW: nothing already there, a link included, is
/// opened; a name taken anyway is tried once more with another.
fn new_private_file(dir: &Path, content: &[u8]) -> Result<PathBuf, String> {
    let mut tries = 0;
    loop {
        tries += 1;
        let tmp = dir.join(format!(".share-token.{}", random_hex()?));
        match create_private(&tmp, content) {
            Ok(()) => return Ok(tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 2 => continue,
            Err(e) => return Err(format!("{}: {e}", tmp.display())),
        }
    }
}

/// Writes `content` to a file made at `path` (mode 0600) that nothing was
/// at before: O_EXCL and O_NOFOLLOW, so neither a file nor a link already
/// there is opened (`AlreadyExists`). Removed again if the write fails.
fn create_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(content).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// The token at `path`; `None` when there is no file. A file that is not
/// this user's private regular file, or holds no token, is refused.
fn read_token(path: &Path) -> Result<Option<String>, String> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a private file of this user",
            path.display()
        ));
    }
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(|e| e.to_string())?;
    if s.len() == 32 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(Some(s))
    } else {
        Err(format!("{} holds no token", path.display()))
    }
}

fn random_hex() -> Result<String, String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The lock file and the socket of one (key, GPU).
pub struct Paths {
    pub lock: PathBuf,
    pub sock: PathBuf,
}

/// The paths of rendezvous `name` (see [`name`]) in `dir`.
pub fn paths(dir: &Path, name: &str) -> Paths {
    // `directory` chose `dir` short enough for `<dir>/<name>.sock`.
    Paths {
        lock: dir.join(format!("{name}.lock")),
        sock: dir.join(format!("{name}.sock")),
    }
}

/// The rendezvous name of `key` on the GPU `uuid`: the first 128 bits of
/// BLAKE3(key, 0, uuid, 0, "share-v3"[, 0, "writable"]), in hex (socket paths are limited to 108 bytes,
/// keys are not).
pub fn name(key: &str, uuid: &[u8; 16], writable: bool) -> String {
    let mut input = key.as_bytes().to_vec();
    input.push(0);
    input.extend_from_slice(uuid);
    // The protocol's version: processes of a version that shared writable
    // memory (or spoke another protocol) never meet this one's.
    input.extend_from_slice(b"\0share-v3");
    if writable {
        // Uploads that allow writable sharing meet apart from protected ones.
        input.extend_from_slice(b"\0writable");
    }
    rzc_core::digest::to_hex(&rzc_core::digest::blake3(&input))[..NAME_LEN].to_owned()
}

/// Takes the serving lock if free: the open lock file, whose closing (or its
/// holder's death) releases the lock.
pub fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let a = name("key", &[1; 16], false);
        assert_eq!(a, name("key", &[1; 16], false));
        assert_ne!(a, name("key", &[2; 16], false), "another GPU");
        assert_ne!(a, name("other", &[1; 16], false), "another key");
        assert_ne!(a, name("key", &[1; 16], true), "writable sharing");
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn an_open_a_linked_or_a_foreign_directory_is_refused() {
        let base = std::env::temp_dir().join(format!("rzc-rdv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let open = base.join("open");
        std::fs::DirBuilder::new()
            .mode(0o777)
            .create(&open)
            .unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        assert!(private_dir(&open).unwrap_err().contains("open to others"));
        let link = base.join("link");
        let target = base.join("target");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(private_dir(&link).unwrap_err().contains("symbolic link"));
        assert!(private_dir(&base.join("fresh")).is_ok());
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A fresh directory for one test (tests run in parallel threads).
    fn scratch(test: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("rzc-rdv-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .unwrap();
        base
    }

    #[test]
    fn a_token_is_made_once_and_then_read() {
        let base = scratch("token");
        let cache = base.join("cache");
        let first = token_in(&cache).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(token_in(&cache).unwrap(), first);
        let names: Vec<_> = std::fs::read_dir(cache.join(SUBDIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["share-token"], "no temporary file left");
        let _ = std::fs::remove_dir_all(&base);
    }

    /// `<base>/cache` with its `ray-zerocopy` directory made (mode 0700):
    /// the cache, and that directory.
    fn cache_in(base: &Path) -> (PathBuf, PathBuf) {
        let cache = base.join("cache");
        let dir = cache.join(SUBDIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .unwrap();
        (cache, dir)
    }

    #[test]
    fn a_cache_directory_open_to_others_is_refused() {
        let base = scratch("open-cache");
        let (cache, dir) = cache_in(&base);
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let why = token_in(&cache).unwrap_err();
        assert!(why.contains("open to others"), "{why}");
        assert!(why.contains(&dir.display().to_string()), "{why}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing written"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_followed() {
        let base = scratch("planted");
        let (cache, dir) = cache_in(&base);
        let victim = scratch("victim").join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // Where the pid-named file of earlier versions was made.
        let planted = dir.join(format!(".share-token.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let t = token_in(&cache).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(token_in(&cache).unwrap(), t);
        // A link at the very name a file is made at is not followed either.
        let e = create_private(&planted, b"0123").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(victim.parent().unwrap());
    }
}
