//! Sharing between processes on the stand-in driver: one process uploads
//! and serves, another imports, verifies and uses the same memory, and
//! every case where sharing does not apply gives a private upload with the
//! reason. The stand-in's shareable memory is a memfd that really crosses
//! processes over the Unix socket.
//!
//! Run with `make fakecuda`, then
//! `LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored`.

mod common;

use std::time::Duration;

use common::{case_param, dlpack_flags, equal, sample, say_and_wait, Case};
use rzc_core::dlpack::{DLPACK_FLAG_BITMASK_IS_COPIED, DLPACK_FLAG_BITMASK_READ_ONLY};
use rzc_cuda::{upload, DeviceWeights, Fallback, ShareOptions, Sharing, Staging, UploadOptions};

/// In a child: uploads `w` under the parent's key.
fn shared_upload(w: &rzc_core::Weights) -> DeviceWeights {
    let key = std::env::var("RZC_CUDA_KEY").expect("the parent's key");
    let opts = UploadOptions {
        share: Some(ShareOptions {
            key,
            wait: Duration::from_secs(20),
            digest: None,
            dir: None,
            writable: std::env::var_os("RZC_CUDA_WRITABLE").is_some(),
        }),
        ..Default::default()
    };
    upload(w, 0, &opts).expect("upload")
}

/// In a child: an upload that fell back to a private copy, and why.
fn private_because(w: &rzc_core::Weights) -> Fallback {
    private_upload(w).1
}

/// In a child: an upload that fell back to a private copy (kept), and why.
fn private_upload(w: &rzc_core::Weights) -> (DeviceWeights, Fallback) {
    let dev = shared_upload(w);
    assert_eq!(dev.sharing(), Sharing::Private);
    assert_eq!(
        dev.share_dir_note(),
        "",
        "the test's own rendezvous directory"
    );
    assert!(dev.staging().is_some() && dev.readback().is_none());
    assert!(equal(w, &dev));
    assert_ne!(dlpack_flags(&dev, 0) & DLPACK_FLAG_BITMASK_IS_COPIED, 0);
    let why = dev.fallback().cloned().expect("a reason");
    assert_eq!(dev.note(), why.note());
    (dev, why)
}

fn role() {
    let w = sample(8, 10_000);
    match case_param().as_str() {
        "upload" => {
            let dev = shared_upload(&w);
            assert_eq!(dev.sharing(), Sharing::Uploaded);
            assert_eq!(dev.staging(), Some(Staging::Register));
            assert!(dev.fallback().is_none() && dev.readback().is_none());
            assert!(dev.read_only(), "written, then mapped read-only");
            assert!(equal(&w, &dev));
            // A second load in this process uses the same memory.
            let again = shared_upload(&w);
            assert_eq!(again.device_ptr(), dev.device_ptr());
            assert_eq!(again.staging(), None);
            say_and_wait("READY");
        }
        "import" => {
            let dev = shared_upload(&w);
            assert_eq!(dev.sharing(), Sharing::Imported);
            assert_eq!(dev.staging(), None, "this process copied nothing");
            let readback = dev.readback().expect("what was read back");
            assert!(readback.bytes > 0 && readback.copies > 0);
            assert!(dev.read_only());
            assert!(equal(&w, &dev));
            // Not this process's copy: no IS_COPIED; mapped read-only.
            assert_eq!(dlpack_flags(&dev, 3), DLPACK_FLAG_BITMASK_READ_ONLY);
        }
        "other" => {
            let other = sample(8, 10_001);
            assert_eq!(private_because(&other), Fallback::OtherContent);
        }
        "import-refused" => {
            let why = private_because(&w);
            assert!(
                matches!(&why, Fallback::ImportFailed(m) if m.contains("cuMemImportFromShareableHandle")),
                "{why:?}"
            );
        }
        "no-vmm" => {
            let why = private_because(&w);
            assert!(matches!(why, Fallback::Unsupported(_)), "{why:?}");
        }
        "upload-not-read-only" => {
            // The driver refuses to make the upload read-only: kept private,
            // and every loader that comes is told why.
            // Held while the others come: its server answers them.
            let (_kept, why) = private_upload(&w);
            assert!(
                matches!(&why, Fallback::NotReadOnly(m) if m.contains("cuMemSetAccess")),
                "{why:?}"
            );
            say_and_wait("READY");
        }
        "told-not-read-only" => {
            let why = private_because(&w);
            assert!(
                matches!(&why, Fallback::NotReadOnly(m) if m.contains("the process serving")),
                "{why:?}"
            );
        }
        "import-not-read-only" => {
            // The driver maps the import only writable: refused, a private copy.
            let why = private_because(&w);
            assert!(
                matches!(&why, Fallback::NotReadOnly(m) if m.contains("read-only")),
                "{why:?}"
            );
        }
        "upload-writable" => {
            // Writable sharing allowed: served although writable.
            let dev = shared_upload(&w);
            assert_eq!(dev.sharing(), Sharing::Uploaded);
            assert!(dev.fallback().is_none() && !dev.read_only());
            say_and_wait("READY");
        }
        "import-writable" => {
            let dev = shared_upload(&w);
            assert_eq!(dev.sharing(), Sharing::Imported);
            assert!(equal(&w, &dev));
        }
        "not-shareable" => {
            let why = private_because(&w);
            assert!(
                matches!(&why, Fallback::NotShareable(m) if m.contains("cuMemCreate")),
                "{why:?}"
            );
        }
        other => panic!("unknown role {other}"),
    }
}

/// A rendezvous directory of this user closed to others, and a key, both
/// of this test alone (tests run at once, with equal buffers). The
/// directory's path is kept short: a socket's path holds at most 107 bytes,
/// and a directory too long for one is passed over for the user's shared
/// fallback directory, where the other tests meet too.
fn rendezvous(test: &str) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::DirBuilderExt;
    let short: String = test.split('_').filter_map(|w| w.chars().next()).collect();
    let dir = std::env::temp_dir().join(format!("rzc-{}-{short}", std::process::id()));
    assert!(
        dir.as_os_str().len() + "/0123456789abcdef0123456789abcdef.sock".len() < 108,
        "{} is too long a path for the rendezvous",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("the rendezvous directory");
    (dir, format!("rust-test-{}-{test}", std::process::id()))
}

fn case(name: &str, role: &str, dir: &std::path::Path, key: &str) -> Case {
    Case::new(name, &[("RZC_CUDA_CASE", role), ("RZC_CUDA_KEY", key)]).env("RZC_SHARE_DIR", dir)
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn two_processes_share_one_copy() {
    let name = "two_processes_share_one_copy";
    if common::is_child(name) {
        common::require_standin();
        return role();
    }
    let (dir, key) = rendezvous(name);
    let uploader = case(name, "upload", &dir, &key).start_until("READY");
    let importer = case(name, "import", &dir, &key).run().clean();
    assert_eq!(importer.count("import"), 1);
    assert_eq!(
        importer.count("alloc") + importer.count("create"),
        0,
        "it copied nothing"
    );
    case(name, "other", &dir, &key).run().clean();
    case(name, "import-refused", &dir, &key)
        .env("FAKECUDA_FAIL", "cuMemImportFromShareableHandle")
        .run()
        .clean();
    let uploader = uploader.finish().clean();
    assert_eq!(uploader.count("create"), 1);
    assert!(uploader.count("export") >= 2, "one per importer that asked");
    let _ = std::fs::remove_dir_all(&dir);
}

/// No process is handed memory that another process can write to, unless
/// both allowed writable sharing: where the driver will not map shared
/// memory read-only, the uploader keeps its copy (and lets the next loader
/// upload at once), the importer refuses the mapping, and uploads that allow
/// writable sharing never meet protected ones.
#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn memory_another_process_can_write_is_shared_only_when_allowed() {
    let name = "memory_another_process_can_write_is_shared_only_when_allowed";
    if common::is_child(name) {
        common::require_standin();
        return role();
    }
    // The second cuMemSetAccess of an uploader is the one making it read-only
    // (the first maps the new memory read-write to fill it); the first of an
    // importer asks for read-only.
    let (dir, key) = rendezvous(name);
    let kept = case(name, "upload-not-read-only", &dir, &key)
        .env("FAKECUDA_FAIL", "cuMemSetAccess@2")
        .start_until("READY");
    // It tells the next loader why at once (no wait of its 20 s for a lock
    // that would only be taken to fail the same way).
    let started = std::time::Instant::now();
    case(name, "told-not-read-only", &dir, &key).run().clean();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let kept = kept.finish().clean();
    assert_eq!(
        kept.count("export"),
        0,
        "memory that stayed writable was exported"
    );
    // Gone, it lets the next uploader share; an importer the driver maps
    // only writable refuses what it is given.
    let uploader = case(name, "upload", &dir, &key).start_until("READY");
    case(name, "import-not-read-only", &dir, &key)
        .env("FAKECUDA_FAIL", "cuMemSetAccess@1")
        .run()
        .clean();
    case(name, "import", &dir, &key).run().clean();
    uploader.finish().clean();

    // Writable sharing, allowed by both: shared; a protected loader with the
    // same key does not meet them.
    let writable = case(name, "upload-writable", &dir, &key)
        .env("RZC_CUDA_WRITABLE", "1")
        .env("FAKECUDA_FAIL", "cuMemSetAccess@2")
        .start_until("READY");
    case(name, "import-writable", &dir, &key)
        .env("RZC_CUDA_WRITABLE", "1")
        .run()
        .clean();
    let protected = case(name, "upload", &dir, &key).start_until("READY");
    protected.finish().clean();
    let writable = writable.finish().clean();
    assert_eq!(
        writable.count("export"),
        1,
        "one export, for the writable importer"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the stand-in CUDA driver: make fakecuda, then LD_LIBRARY_PATH=$PWD/build/fakecuda cargo test -p rzc-cuda -- --include-ignored"]
fn without_shareable_memory_the_upload_is_private() {
    let name = "without_shareable_memory_the_upload_is_private";
    if common::is_child(name) {
        common::require_standin();
        return role();
    }
    let (dir, key) = rendezvous(name);
    case(name, "no-vmm", &dir, &key)
        .env("FAKECUDA_NO_VMM", "1")
        .run()
        .clean();
    case(name, "not-shareable", &dir, &key)
        .env("FAKECUDA_FAIL", "cuMemCreate=CUDA_ERROR_NOT_SUPPORTED")
        .run()
        .clean();
    let _ = std::fs::remove_dir_all(&dir);
}
