//! A message for writes that hit a guard.
//!
//! A write into guarded pages is a SIGSEGV, which on its own reads like a bug
//! in whatever crashed. The handler below recognises faults inside guarded
//! ranges, says what happened and what to do, then hands the signal to
//! whoever handled it before (Python's faulthandler prints the traceback) or
//! to the default action. It only reads atomics and calls write(2): both are
//! async-signal-safe.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// How many guarded ranges the handler can name at once (one per opened
/// buffer; a range that finds no slot is still protected, only the message is
/// missing).
const SLOTS: usize = 128;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
static GUARDED: [(AtomicUsize, AtomicUsize); SLOTS] = [EMPTY; SLOTS];
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Tells the handler that `[lo, hi)` is guarded.
pub fn publish(lo: usize, hi: usize) {
    install_handler();
    for (a, b) in GUARDED.iter() {
        if a.compare_exchange(0, lo, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            b.store(hi, Ordering::Release);
            return;
        }
    }
}

/// Forgets the range published as starting at `lo`.
pub fn unpublish(lo: usize) {
    for (a, b) in GUARDED.iter() {
        if a.load(Ordering::Acquire) == lo {
            b.store(0, Ordering::Release);
            a.store(0, Ordering::Release);
            return;
        }
    }
}

/// Whether `addr` lies in a published range (reads atomics only: safe inside
/// the signal handler).
pub fn guarded(addr: usize) -> bool {
    GUARDED.iter().any(|(a, b)| {
        let lo = a.load(Ordering::Acquire);
        lo != 0 && (lo..b.load(Ordering::Acquire)).contains(&addr)
    })
}

fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) on a valid buffer; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// `addr` as `0x` and 16 hex digits, without allocating.
fn hex(addr: usize) -> [u8; 18] {
    let mut out = [b'0'; 18];
    out[1] = b'x';
    for (i, digit) in out[2..].iter_mut().enumerate() {
        let d = ((addr as u64 >> ((15 - i) * 4)) & 0xf) as u8;
        *digit = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    out
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if guarded(addr) {
        write_stderr(b"\nray-zerocopy: a write to read-only shared weights at ");
        write_stderr(&hex(addr));
        write_stderr(
            b" was stopped. These weights are shared by every process on this machine that loaded them; \
              an in-place write (param.add_(), an optimizer step, .train() with BatchNorm, a module that \
              updates a buffer of its own as it runs) would change them for all. clone() a tensor before \
              modifying it (a module's buffer: register_buffer(name, buf.clone()) after load()); \
              write_protect=False lets such writes through, to every process's weights.\n",
        );
    }
    // Hand the signal on as if this handler were not there.
    let Some(prev) = PREVIOUS.get() else { return };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Back to the default action: returning re-runs the faulting
        // instruction, which now terminates the process as it would have.
        // SAFETY: installs the default disposition; async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed with this signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: installs a handler for SIGSEGV, keeping the previous one to
        // chain to.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_segv as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGSEGV, &act, &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_without_allocating() {
        assert_eq!(&super::hex(0x7f12_ab00), b"0x000000007f12ab00");
    }
}
