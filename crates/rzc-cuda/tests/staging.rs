//! Uploads on the stand-in driver, every way the source can reach the
//! device: each mode's bytes arrive, late copies are waited for, the
//! caller's stream is used and left alone, devices are told apart, and
//! nothing is left behind.
//!
//! Run with `make fakecuda`, then
//! `LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored`.

mod common;

use common::{child, dlpack_flags, equal, options, sample, Case};
use rzc_core::dlpack::{DLPACK_FLAG_BITMASK_IS_COPIED, DLPACK_FLAG_BITMASK_READ_ONLY};
use rzc_cuda::{upload, ErrorKind, Sharing, Staging};

/// Every mode, in one process: what it reports, and every byte.
fn every_mode() {
    let w = sample(8, 4000);
    for (asked, used) in [
        (Staging::Auto, Staging::Register),
        (Staging::Register, Staging::Register),
        (Staging::Pinned, Staging::Pinned),
        (Staging::Pageable, Staging::Pageable),
    ] {
        let dev = upload(&w, 0, &options(asked, 8192)).expect("upload");
        assert_eq!(dev.staging(), Some(used), "asked for {asked:?}");
        assert!(equal(&w, &dev), "{asked:?}: the device holds other bytes");
        assert_eq!(dev.sharing(), Sharing::Private);
        assert!(dev.fallback().is_none() && dev.note().is_empty());
        assert_eq!(dev.tensors().len(), 8);
        assert_eq!(dev.device_ptr() % 256, 0);
        // A private upload is this process's own copy, and writable.
        assert!(!dev.read_only());
        assert_eq!(dlpack_flags(&dev, 0), DLPACK_FLAG_BITMASK_IS_COPIED);
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn every_staging_mode_uploads_every_byte() {
    if let Some(done) = child("every_staging_mode_uploads_every_byte", &[], every_mode) {
        let done = done.clean();
        assert!(done.count("register") > 0 && done.count("host_alloc") > 0);
        assert_eq!(done.count("alloc"), 4);
        assert_eq!(done.count("free"), 4);
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn copies_that_complete_late_are_waited_for() {
    // The stand-in's copies run later on its own thread: an upload that
    // returned, unregistered or freed its bounce buffers before they ran
    // would read back wrong bytes or a reported error.
    let env = [("FAKECUDA_COPY_DELAY_US", "2000")];
    if let Some(done) = child("copies_that_complete_late_are_waited_for", &env, every_mode) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn the_callers_stream_is_used_and_left_alone() {
    let body = || {
        use cudarc::driver::result;
        let w = sample(6, 3000);
        result::init().expect("cuInit");
        let dev = result::device::get(0).expect("device 0");
        // SAFETY: `dev` came from cuDeviceGet; released below.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.expect("primary context");
        // SAFETY: a retained context, made current on this thread only (the
        // stand-in implements the push the library itself uses, not
        // cuCtxSetCurrent, which the library never calls).
        let pushed = unsafe { cudarc::driver::sys::cuCtxPushCurrent_v2(ctx) };
        assert_eq!(
            pushed,
            cudarc::driver::sys::CUresult::CUDA_SUCCESS,
            "current"
        );
        let stream =
            result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        for staging in [Staging::Register, Staging::Pinned, Staging::Pageable] {
            let mut opts = options(staging, 8192);
            opts.stream = stream;
            let d = upload(&w, 0, &opts).expect("upload on the caller's stream");
            assert_eq!(d.staging(), Some(staging));
            assert!(equal(&w, &d), "{staging:?}");
        }
        // Still the caller's, and alive: the upload did not destroy it.
        // SAFETY: our live stream, destroyed once here; then the context
        // is released once (the upload balanced its own retains).
        unsafe {
            result::stream::synchronize(stream).expect("the stream is alive");
            result::stream::destroy(stream).expect("destroyed once");
            result::primary_ctx::release(dev).expect("released");
        }
    };
    if let Some(done) = child("the_callers_stream_is_used_and_left_alone", &[], body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn without_read_only_registration_the_source_is_registered_writable() {
    // The read-only flag would be refused and force the slower fallback.
    let body = || {
        let w = sample(8, 1000);
        let dev = upload(&w, 0, &options(Staging::Auto, 1 << 16)).expect("upload");
        assert_eq!(dev.staging(), Some(Staging::Register));
        assert!(equal(&w, &dev));
    };
    let env = [("FAKECUDA_NO_READONLY_REGISTER", "1")];
    let name = "without_read_only_registration_the_source_is_registered_writable";
    if let Some(done) = child(name, &env, body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn a_bad_ordinal_and_a_second_device() {
    let name = "a_bad_ordinal_and_a_second_device";
    let body = || {
        let w = sample(4, 1000);
        let devices: usize = common::case_param().parse().expect("a count");
        assert_eq!(rzc_cuda::device_count().expect("count"), devices as i32);
        match upload(&w, 1, &options(Staging::Auto, 1 << 16)) {
            Ok(dev) => {
                assert_eq!(devices, 2);
                assert_eq!(dev.ordinal(), 1);
                assert!(equal(&w, &dev));
            }
            Err(e) => {
                assert_eq!(devices, 1);
                assert_eq!(e.kind(), ErrorKind::BadDevice, "{e}");
                assert!(
                    e.message().contains("this process sees 1 CUDA device"),
                    "{e}"
                );
            }
        }
        let e = upload(&w, -1, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadDevice, "{e}");
    };
    if common::is_child(name) {
        common::require_standin();
        return body();
    }
    let one = Case::new(name, &[("RZC_CUDA_CASE", "1")]).run().clean();
    assert_eq!(one.count("alloc"), 0);
    let two = Case::new(name, &[("RZC_CUDA_CASE", "2"), ("FAKECUDA_DEVICES", "2")])
        .run()
        .clean();
    let allocs: Vec<&str> = two
        .log
        .lines()
        .filter(|l| l.contains("\"op\": \"alloc\""))
        .collect();
    assert!(
        !allocs.is_empty() && allocs.iter().all(|l| l.contains("\"dev\": 1")),
        "{allocs:?}"
    );
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn two_uploads_of_one_buffer_at_once() {
    // Two threads upload one buffer at the same time (to two GPUs): they
    // register the same pages, and neither may unregister them while the
    // other's late copies still read them.
    let body = || {
        let w = sample(6, 20000);
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|k| {
                    let w = &w;
                    s.spawn(move || {
                        let dev = upload(w, k, &options(Staging::Register, 16384)).expect("upload");
                        equal(w, &dev)
                    })
                })
                .collect();
            for r in runs {
                assert!(
                    r.join().expect("no panic"),
                    "an upload read back other bytes"
                );
            }
        });
    };
    let env = [
        ("FAKECUDA_COPY_DELAY_US", "20000"),
        ("FAKECUDA_DEVICES", "2"),
    ];
    if let Some(done) = child("two_uploads_of_one_buffer_at_once", &env, body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn uploads_in_other_modes_and_chunks_while_one_registers() {
    // A registered upload of one buffer (one region: the whole buffer) to
    // one GPU, and while it holds its registration, a pageable upload and a
    // registered one with other chunk bounds to the other GPU, whose copies
    // then run after the first upload has finished. A copy from pages
    // page-locked meanwhile reads them when it runs: were they unregistered
    // when the first upload finished, it would fault
    // (CUDA_ERROR_ILLEGAL_ADDRESS); and pages registered with other bounds
    // are no reason to register again. The order is forced, not timed: the
    // stand-in holds each GPU's copies until the test opens its gate, and
    // its log shows what has happened.
    let body = || {
        let w = sample(1, 40000);
        let gate = std::env::var("FAKECUDA_COPY_GATE").expect("the gate's prefix");
        let log = std::env::var("FAKECUDA_LOG").expect("the driver log");
        let open = |dev: u32| std::fs::write(format!("{gate}.{dev}"), b"").expect("open a gate");
        // Until `seen(lines)` holds for the driver log's lines (a minute at most).
        let wait_for = |what: &str, seen: &dyn Fn(&[&str]) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if seen(&text.lines().collect::<Vec<_>>()) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "never saw {what}:\n{text}"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let copies_to = |lines: &[&str], dev: u32, pick: &dyn Fn(u64) -> bool| {
            lines
                .iter()
                .filter(|l| {
                    l.contains("\"op\": \"copy\"") && l.ends_with(&format!("\"dev\": {dev}}}"))
                })
                .filter_map(|l| {
                    l.split("\"bytes\": ")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse()
                        .ok()
                })
                .any(|b: u64| pick(b))
        };
        let run = |staging: Staging, chunk: usize, ordinal: i32| {
            let dev = upload(&w, ordinal, &options(staging, chunk))
                .map_err(|e| format!("{staging:?}, chunks of {chunk}: {e}"))?;
            assert_eq!(dev.staging(), Some(staging));
            Ok::<bool, String>(equal(&w, &dev))
        };
        std::thread::scope(|s| {
            // Chunks are aligned to multiples of their size in the address
            // space (so that uploads with one chunk size share them): 1 MiB
            // chunks split this 160 KB buffer in two whenever it crosses a
            // MiB boundary (one run in seven). A chunk of 2^47 bytes, past
            // every user-space address, makes it one region wherever it is.
            let first = s.spawn(|| run(Staging::Register, 1 << 47, 0));
            wait_for("the first upload's registration and copy", &|l| {
                l.iter().any(|l| l.contains("\"op\": \"register\"")) && copies_to(l, 0, &|_| true)
            });
            let pageable = s.spawn(|| run(Staging::Pageable, 1 << 20, 1));
            let chunked = s.spawn(|| run(Staging::Register, 16384, 1));
            // Both have issued copies (so hold the first's registration).
            wait_for("both other uploads' copies", &|l| {
                copies_to(l, 1, &|b| b <= 16384) && copies_to(l, 1, &|b| b > 16384)
            });
            open(0);
            let first = first.join().expect("no panic");
            open(1);
            let got = [
                first,
                pageable.join().expect("no panic"),
                chunked.join().expect("no panic"),
            ];
            assert!(got.iter().all(|r| r == &Ok(true)), "{got:?}");
        });
    };
    let gate = std::env::temp_dir().join(format!("rzc-cuda-gate-{}", std::process::id()));
    let gate = gate.to_str().expect("a UTF-8 temporary directory");
    let env = [("FAKECUDA_COPY_GATE", gate), ("FAKECUDA_DEVICES", "2")];
    let name = "uploads_in_other_modes_and_chunks_while_one_registers";
    let done = child(name, &env, body);
    for dev in 0..2 {
        let _ = std::fs::remove_file(format!("{gate}.{dev}"));
    }
    if let Some(done) = done {
        let done = done.clean();
        assert_eq!(
            done.count("register"),
            1,
            "the other uploads held the first's registration; the driver log:\n{}",
            done.log
        );
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn bad_arguments_are_errors_of_the_cores_kinds() {
    use rzc_core::ErrorKind as Core;
    let body = || {
        let w = sample(2, 100);
        let mut opts = options(Staging::Auto, 0);
        let e = upload(&w, 0, &opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Core(Core::InvalidArgument), "{e}");
        opts.chunk_bytes = 4096;
        let dev = upload(&w, 0, &opts).expect("upload");
        assert_eq!(
            dev.read(2, &mut []).unwrap_err().kind(),
            ErrorKind::Core(Core::OutOfRange)
        );
        let e = dev.read(0, &mut [0u8; 3]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Core(Core::InvalidArgument), "{e}");
        assert!(dev.to_dlpack(9).is_err());
        assert_eq!(dlpack_flags(&dev, 1) & DLPACK_FLAG_BITMASK_READ_ONLY, 0);
    };
    if let Some(done) = child("bad_arguments_are_errors_of_the_cores_kinds", &[], body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn no_device_and_no_driver_say_no_cuda() {
    let name = "no_device_and_no_driver_say_no_cuda";
    if common::is_child(name) {
        let w = sample(1, 10);
        let e = upload(&w, 0, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoCuda, "{e}");
        let e = rzc_cuda::device_count().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoCuda, "{e}");
        match common::case_param().as_str() {
            "no-device" => {
                common::require_standin();
                assert!(e.message().contains("CUDA_ERROR_NO_DEVICE"), "{e}");
            }
            _ => assert!(
                e.message().contains("libcuda"),
                "a CUDA driver is installed on this machine's library path, so the no-driver \
                 path cannot be exercised here: {e}"
            ),
        }
        return;
    }
    let env = [("RZC_CUDA_CASE", "no-device"), ("FAKECUDA_DEVICES", "0")];
    Case::new(name, &env).run();
    // Without the stand-in on the library path (and no driver installed).
    Case::new(name, &[("RZC_CUDA_CASE", "no-driver")])
        .env_remove("LD_LIBRARY_PATH")
        .run();
}
