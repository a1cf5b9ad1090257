//! Every failure path of an upload, driven through the stand-in driver's
//! fault injection (`FAKECUDA_FAIL`, `FAKECUDA_MEM_MB`): each failure is an
//! error of the right class that names the call, and the process holds no
//! driver resource afterwards. Each case runs in its own process (call
//! counters and settings are per process).
//!
//! Run with `make fakecuda`, then
//! `LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored`.

mod common;

use common::{case_param, child, equal, options, sample, Case, Done};
use rzc_cuda::{upload, ErrorKind, Staging};

fn staging(name: &str) -> Staging {
    match name {
        "auto" => Staging::Auto,
        "register" => Staging::Register,
        "pinned" => Staging::Pinned,
        "pageable" => Staging::Pageable,
        other => panic!("unknown staging {other}"),
    }
}

/// In a child: uploads 8 tensors of `size` elements with the staging the
/// parent names first in `RZC_CUDA_CASE` (`staging:...`); the error, or
/// the staging used after checking every byte.
fn upload_case(size: usize, chunk: usize) -> Result<Staging, rzc_cuda::Error> {
    let param = case_param();
    let mode = staging(param.split(':').next().unwrap_or_default());
    let w = sample(8, size);
    let dev = upload(&w, 0, &options(mode, chunk))?;
    assert!(equal(&w, &dev), "the device holds other bytes");
    Ok(dev.staging().expect("this process copied"))
}

/// Runs test `name` as a child for each `(case, FAKECUDA_FAIL)`.
fn each(name: &str, cases: &[(&str, &str)]) -> Vec<Done> {
    cases
        .iter()
        .map(|(case, fail)| {
            Case::new(name, &[("RZC_CUDA_CASE", case), ("FAKECUDA_FAIL", fail)])
                .run()
                .clean()
        })
        .collect()
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn registration_refused_falls_back_to_pinned_buffers() {
    let name = "registration_refused_falls_back_to_pinned_buffers";
    let env = [
        ("RZC_CUDA_CASE", "auto"),
        (
            "FAKECUDA_FAIL",
            "cuMemHostRegister=CUDA_ERROR_NOT_PERMITTED",
        ),
    ];
    let body = || assert_eq!(upload_case(1000, 1 << 16).expect("upload"), Staging::Pinned);
    if let Some(done) = child(name, &env, body) {
        let done = done.clean();
        assert!(done.count("host_alloc") > 0 && done.count("register") == 0);
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn registration_failing_midway_undoes_the_others() {
    let name = "registration_failing_midway_undoes_the_others";
    let env = [
        ("RZC_CUDA_CASE", "register"),
        (
            "FAKECUDA_FAIL",
            "cuMemHostRegister@3=CUDA_ERROR_INVALID_VALUE",
        ),
    ];
    let body = || {
        let e = upload_case(4000, 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
        assert!(
            e.message().contains("cuMemHostRegister")
                && e.message().contains("CUDA_ERROR_INVALID_VALUE"),
            "{e}"
        );
    };
    if let Some(done) = child(name, &env, body) {
        let done = done.clean();
        assert!(
            done.count("register") >= 2,
            "earlier chunks were registered, then undone"
        );
        assert_eq!(done.count("register"), done.count("unregister"));
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn out_of_device_memory() {
    let name = "out_of_device_memory";
    let body = || {
        let e = upload_case(200_000, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
        assert!(
            e.message().contains("bytes of device memory on cuda:0")
                && e.message().contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{e}"
        );
    };
    let env = [("RZC_CUDA_CASE", "auto"), ("FAKECUDA_MEM_MB", "2")];
    if let Some(done) = child(name, &env, body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn a_copy_failing_midway() {
    let name = "a_copy_failing_midway";
    if common::is_child(name) {
        common::require_standin();
        let e = upload_case(4000, 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
        assert!(
            e.message()
                .contains("cuMemcpyHtoDAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS"),
            "{e}"
        );
        return;
    }
    // Registered and pinned uploads copy in chunks; a pageable one copies
    // tensor by tensor.
    let fail = |n| format!("cuMemcpyHtoDAsync@{n}=CUDA_ERROR_ILLEGAL_ADDRESS");
    let (three, one) = (fail(3), fail(1));
    each(
        name,
        &[("register", &three), ("pinned", &three), ("pageable", &one)],
    );
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn auto_recovers_from_a_failed_registered_copy_with_pinned_buffers() {
    let name = "auto_recovers_from_a_failed_registered_copy_with_pinned_buffers";
    let env = [
        ("RZC_CUDA_CASE", "auto"),
        ("FAKECUDA_FAIL", "cuMemcpyHtoDAsync@2"),
    ];
    let body = || assert_eq!(upload_case(4000, 8192).expect("upload"), Staging::Pinned);
    if let Some(done) = child(name, &env, body) {
        done.clean();
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn a_failing_synchronize() {
    let name = "a_failing_synchronize";
    if common::is_child(name) {
        common::require_standin();
        let e = upload_case(1000, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
        assert!(
            e.message()
                .contains("cuStreamSynchronize failed: CUDA_ERROR_LAUNCH_FAILED"),
            "{e}"
        );
        return;
    }
    let fail = "cuStreamSynchronize@1=CUDA_ERROR_LAUNCH_FAILED";
    each(
        name,
        &[("register", fail), ("pinned", fail), ("pageable", fail)],
    );
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn a_failing_setup_call() {
    let name = "a_failing_setup_call";
    if common::is_child(name) {
        common::require_standin();
        let param = case_param();
        let symbol = param.split(':').nth(1).expect("staging:symbol");
        let e = upload_case(8000, 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
        assert!(e.message().contains(symbol), "{e}");
        return;
    }
    for (staging, symbol) in [
        ("auto", "cuMemAlloc"),
        ("auto", "cuStreamCreate"),
        ("pinned", "cuMemHostAlloc@2"),
        ("pinned", "cuEventCreate@2"),
        ("pinned", "cuEventSynchronize@2"),
    ] {
        let bare = symbol.split('@').next().unwrap_or(symbol);
        let case = format!("{staging}:{bare}");
        let fail = format!("{symbol}=CUDA_ERROR_UNKNOWN");
        each(name, &[(&case, &fail)]);
    }
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn pinned_memory_refused_is_out_of_memory() {
    // Page-locked host memory is memory too: the class says so.
    let name = "pinned_memory_refused_is_out_of_memory";
    let env = [
        ("RZC_CUDA_CASE", "pinned"),
        ("FAKECUDA_FAIL", "cuMemHostAlloc"),
    ];
    let body = || {
        let e = upload_case(1000, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
        assert!(
            e.message()
                .contains("cuMemHostAlloc (pinned bounce buffer)"),
            "{e}"
        );
    };
    if let Some(done) = child(name, &env, body) {
        done.clean();
    }
}
