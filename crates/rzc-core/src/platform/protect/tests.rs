//! The write guard on real mappings: anonymous, shared files, sealed and
//! mprotect'ed, in this process and in a child.

use super::*;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Output};

fn mapped(pages: usize) -> &'static mut [u8] {
    let len = pages * page_size();
    // SAFETY: a fresh anonymous mapping, leaked for the test's duration.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `len` bytes just mapped read-write.
    unsafe { std::slice::from_raw_parts_mut(p.cast(), len) }
}

/// `pages` pages of a new memfd, mapped shared and writable, filled
/// with a pattern; the memfd stays open.
fn shared(pages: usize) -> (File, &'static mut [u8]) {
    let len = pages * page_size();
    // SAFETY: a fresh memfd, owned by the File below.
    let fd = unsafe { libc::memfd_create(c"rzc-guard-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and belongs to nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    // SAFETY: maps the whole file shared; leaked for the test's duration.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `len` bytes just mapped read-write.
    let buf: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(p.cast(), len) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    (file, buf)
}

fn errno_of(r: libc::c_int) -> Option<i32> {
    (r != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
}

fn madvise_remove(lo: usize, len: usize) -> Option<i32> {
    // SAFETY: the test's own mapping; what the call may do to it is the
    // point of the test.
    errno_of(unsafe { libc::madvise(lo as *mut _, len, libc::MADV_REMOVE) })
}

fn mprotect(lo: usize, len: usize, prot: i32) -> Option<i32> {
    // SAFETY: the test's own mapping.
    errno_of(unsafe { libc::mprotect(lo as *mut _, len, prot) })
}

#[test]
fn protects_counts_and_restores() {
    let page = page_size();
    let buf = mapped(4);
    let (lo, hi) = (buf.as_ptr() as usize, buf.as_ptr() as usize + 4 * page);
    let g1 = WriteGuard::protect(buf, page + 10..2 * page + 5)
        .unwrap()
        .unwrap();
    assert_eq!(g1.range(), (lo, hi), "every whole page of the buffer");
    assert_eq!(g1.state(), GuardState::Private);
    assert_eq!(maps::writable(lo, hi).unwrap(), Some(false));
    assert!(WriteGuard::covers(lo + 100));
    let g2 = WriteGuard::protect(buf, page + 10..2 * page + 5)
        .unwrap()
        .unwrap();
    drop(g1);
    assert_eq!(
        maps::writable(lo, hi).unwrap(),
        Some(false),
        "still guarded by the second handle"
    );
    drop(g2);
    assert_eq!(maps::writable(lo, hi).unwrap(), Some(true));
    buf[page + 20] = 1; // writable again
    assert!(!WriteGuard::covers(lo + 100));
}

/// The header's whole pages are guarded too; the bytes before the first
/// page boundary (another object's page) are not.
#[test]
fn guards_every_whole_page_of_the_buffer() {
    let page = page_size();
    let buf = mapped(5);
    let base = buf.as_ptr() as usize;
    let inner = &buf[64..4 * page + 100]; // starts mid-page, ends mid-page
    let g = WriteGuard::protect(inner, 2 * page..2 * page + 8)
        .unwrap()
        .unwrap();
    assert_eq!(g.range(), (base + page, base + 4 * page));
    assert_eq!(maps::writable(base, base + page).unwrap(), Some(true));
    assert_eq!(
        maps::writable(base + page, base + 4 * page).unwrap(),
        Some(false)
    );
    assert_eq!(
        maps::writable(base + 4 * page, base + 5 * page).unwrap(),
        Some(true)
    );
    drop(g);
}

#[test]
fn refuses_to_protect_outside_the_buffer() {
    let page = page_size();
    let buf = mapped(2);
    let inner = &buf[10..2 * page - 10];
    let e = WriteGuard::protect(inner, 0..100).unwrap_err();
    assert!(e.message().contains("guard_bytes"), "{}", e.message());
    assert!(WriteGuard::protect(inner, 5..5).unwrap().is_none());
}

/// A part of a guarded buffer counts on its guard; a buffer straddling a
/// guarded one is refused rather than half guarded.
#[test]
fn nested_and_overlapping_buffers() {
    let page = page_size();
    let buf = mapped(6);
    let base = buf.as_ptr() as usize;
    let whole = WriteGuard::protect(&buf[..4 * page], page..page + 1)
        .unwrap()
        .unwrap();
    let part = WriteGuard::protect(&buf[page..3 * page], page..page + 1)
        .unwrap()
        .unwrap();
    assert_eq!(part.range(), whole.range());
    let e = WriteGuard::protect(&buf[2 * page..6 * page], page..page + 1).unwrap_err();
    assert!(e.message().contains("overlaps"), "{}", e.message());
    drop(whole);
    assert_eq!(
        maps::writable(base, base + 4 * page).unwrap(),
        Some(false),
        "the part still guards"
    );
    drop(part);
    assert_eq!(maps::writable(base, base + 6 * page).unwrap(), Some(true));
}

/// A shared file mapping (a memfd: this process holds its descriptor) is
/// sealed: MADV_REMOVE and mprotect(PROT_WRITE) fail with EACCES and the
/// bytes stay; once the last guard goes the same mapping is back,
/// writable, with the same bytes.
#[test]
fn seals_a_shared_file_mapping() {
    let page = page_size();
    let (file, buf) = shared(6);
    let base = buf.as_ptr() as usize;
    let before = buf.to_vec();
    let (lo, hi) = (base + page, base + 5 * page);
    let g1 = WriteGuard::protect(&buf[page - 64..5 * page + 64], 2 * page..3 * page)
        .unwrap()
        .unwrap();
    let g2 = WriteGuard::protect(&buf[page - 64..5 * page + 64], 2 * page..3 * page)
        .unwrap()
        .unwrap();
    assert_eq!(g1.range(), (lo, hi));
    assert_eq!(
        (g1.state(), g2.state()),
        (GuardState::Sealed, GuardState::Sealed)
    );
    assert!(WriteGuard::covers(lo) && WriteGuard::covers(hi - 1));
    assert_eq!(madvise_remove(lo, hi - lo), Some(libc::EACCES));
    assert_eq!(madvise_remove(lo + page, page), Some(libc::EACCES));
    assert_eq!(
        mprotect(lo, hi - lo, libc::PROT_READ | libc::PROT_WRITE),
        Some(libc::EACCES)
    );
    assert_eq!(
        mprotect(lo, page, libc::PROT_READ | libc::PROT_WRITE),
        Some(libc::EACCES)
    );
    // The kernel does not let /proc/self/mem force a write into a shared
    // mapping without write permission either.
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    assert!(std::os::unix::fs::FileExt::write_at(&mem, &[7], lo as u64).is_err());
    assert_eq!(buf, &before[..], "every byte as it was");
    let mut through_fd = vec![0u8; before.len()];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut through_fd, 0).unwrap();
    assert_eq!(through_fd, before, "the file holds them too");
    // The same page-cache pages: a write through the descriptor shows.
    std::os::unix::fs::FileExt::write_at(&file, &[9], (2 * page) as u64).unwrap();
    assert_eq!(buf[2 * page], 9);
    std::os::unix::fs::FileExt::write_at(&file, &before[2 * page..2 * page + 1], (2 * page) as u64)
        .unwrap();

    drop(g1);
    assert_eq!(
        madvise_remove(lo, page),
        Some(libc::EACCES),
        "still sealed by the second"
    );
    drop(g2);
    assert_eq!(maps::writable(base, base + 6 * page).unwrap(), Some(true));
    let pieces = maps::mappings(lo, hi).unwrap().unwrap();
    assert!(
        pieces
            .iter()
            .all(|p| p.shared && p.offset as usize + base == p.start),
        "the original mapping of the file, at the same offsets: {pieces:?}"
    );
    assert_eq!(buf, &before[..]);
    buf[2 * page] = 42; // writable again, through the file
    let mut one = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut one, (2 * page) as u64).unwrap();
    assert_eq!(one[0], 42);
    assert!(!WriteGuard::covers(lo));
}

/// Two buffers side by side, both sealed: the kernel may merge their
/// read-only mappings into one; each guard still lifts its own pages.
#[test]
fn neighbours_seal_and_lift_apart() {
    let page = page_size();
    let (_file, buf) = shared(8);
    let base = buf.as_ptr() as usize;
    let a = WriteGuard::protect(&buf[..4 * page], page..page + 1)
        .unwrap()
        .unwrap();
    let b = WriteGuard::protect(&buf[4 * page..], page..page + 1)
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.state(), b.state()),
        (GuardState::Sealed, GuardState::Sealed)
    );
    drop(a);
    assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(true));
    assert_eq!(
        madvise_remove(base + 4 * page, 4 * page),
        Some(libc::EACCES)
    );
    buf[page] = 1;
    drop(b);
    assert_eq!(maps::writable(base, base + 8 * page).unwrap(), Some(true));
    buf[5 * page] = 1;
}

/// Should the owner unmap the buffer while guarded and the addresses be
/// reused, lifting the guard leaves the new mapping alone.
#[test]
fn lifting_leaves_a_reused_range_alone() {
    let page = page_size();
    let (_file, buf) = shared(4);
    let base = buf.as_ptr() as usize;
    let g = WriteGuard::protect(buf, page..page + 1).unwrap().unwrap();
    assert_eq!(g.state(), GuardState::Sealed);
    // SAFETY: replaces the test's own mapping with anonymous memory.
    let p = unsafe {
        libc::mmap(
            base as *mut _,
            4 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, base);
    buf[page] = 5;
    drop(g);
    let pieces = maps::mappings(base, base + 4 * page).unwrap().unwrap();
    assert!(
        pieces.iter().all(|m| !m.shared && m.inode == 0),
        "{pieces:?}"
    );
    assert_eq!(buf[page], 5);
}

/// No read-only descriptor found: mprotect only, and the state says
/// that the kernel would still let this process change the pages.
#[test]
fn without_a_descriptor_falls_back_to_mprotect() {
    let page = page_size();
    let (file, buf) = shared(4);
    drop(file); // the mapping alone holds the memfd now
    let base = buf.as_ptr() as usize;
    let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::OwnFds, Source::ParentFds])
        .unwrap()
        .unwrap();
    assert_eq!(g.state(), GuardState::Mprotect);
    assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(false));
    drop(g);
    assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(true));
    buf[page] = 1;
}

/// The mapping alone keeps the memfd: as root, /proc/self/map_files
/// still opens it.
#[test]
fn map_files_finds_a_closed_file_as_root() {
    let page = page_size();
    let (file, buf) = shared(4);
    drop(file);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: /proc/self/map_files is not readable, not checked");
        return;
    }
    let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::MapFiles])
        .unwrap()
        .unwrap();
    assert_eq!(g.state(), GuardState::Sealed);
    assert_eq!(madvise_remove(g.range().0, page), Some(libc::EACCES));
}

/// Runs [`child`] in a new process of this test binary with `env`.
fn run_child(env: &[(&str, String)]) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "platform::protect::tests::child",
            "--ignored",
            "--nocapture",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

/// What the tests below run in a child process; does nothing on its own.
#[test]
#[ignore = "run in a child process by finds_the_parents_descriptor"]
fn child() {
    let page = page_size();
    match std::env::var("RZC_GUARD_CHILD").as_deref() {
        Ok("parent-fd") => {
            // The parent's memfd, mapped here through /proc; then this
            // process holds no descriptor of it, as a Ray worker holds
            // none of the object store's file.
            let fd: i32 = std::env::var("RZC_PARENT_FD").unwrap().parse().unwrap();
            // SAFETY: getppid has no preconditions.
            let ppid = unsafe { libc::getppid() };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{ppid}/fd/{fd}"))
                .unwrap();
            // SAFETY: maps the parent's 4-page memfd shared; leaked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4 * page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            drop(file);
            // SAFETY: the 4 pages just mapped.
            let buf = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 4 * page) };
            let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::ParentFds])
                .unwrap()
                .unwrap();
            assert_eq!(g.state(), GuardState::Sealed);
            assert_eq!(madvise_remove(g.range().0, page), Some(libc::EACCES));
            println!("CHILD: sealed through the parent's descriptor");
        }
        Ok("write") => {
            let (_file, buf) = shared(4);
            let g = WriteGuard::protect(buf, page..2 * page).unwrap().unwrap();
            assert_eq!(g.state(), GuardState::Sealed);
            let at = buf[page..].as_ptr() as *mut u8;
            // SAFETY: none: a write into guarded pages, which must fault.
            unsafe { at.write_volatile(1) };
            println!("CHILD: wrote");
        }
        _ => {}
    }
}

/// A Ray worker's situation: the file is open only in the parent
/// process. Its descriptor there is found and the mapping sealed.
#[test]
fn finds_the_parents_descriptor() {
    let (file, _buf) = shared(4);
    let out = run_child(&[
        ("RZC_GUARD_CHILD", "parent-fd".into()),
        ("RZC_PARENT_FD", file.as_raw_fd().to_string()),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD: sealed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A write into a sealed mapping still faults, with the handler's
/// message.
#[test]
fn a_write_into_a_sealed_mapping_faults_with_the_message() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_child(&[("RZC_GUARD_CHILD", "write".into())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("CHILD: wrote"));
    assert!(
        stderr.contains("ray-zerocopy: a write to read-only shared weights"),
        "{stderr}"
    );
}
