//! Calls the built cdylib through `libloading`, declaring the functions and
//! structs from the header as any foreign caller would: nothing from the
//! crate's Rust API is used.
//!
//! Nearly every line here is a call through the C ABI, which is the code
//! under test: each is unsafe for the one reason that the header states the
//! contract (live handles, valid out-pointers), and these tests pass what
//! the header asks, except where a test deliberately passes NULL or a bad
//! value to check the refusal. That is said once here instead of on each of
//! some 90 blocks.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;

use libloading::{Library, Symbol};

#[repr(C)]
struct TensorInfo {
    name: *const c_char,
    name_len: usize,
    dtype: u32,
    ndim: u32,
    shape: *const i64,
    data: *const u8,
    nbytes: u64,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device_type: i32,
    device_id: i32,
    ndim: i32,
    dtype: [u8; 4],
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: [u32; 2],
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

type Weights = c_void;

fn cdylib() -> Library {
    // target/<profile>/deps/abi-<hash> -> target/<profile>/librzc.so
    let exe = std::env::current_exe().unwrap();
    let dir: PathBuf = exe.parent().unwrap().parent().unwrap().into();
    let path = dir.join(format!(
        "{}rzc{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    unsafe { Library::new(&path) }.unwrap_or_else(|e| {
        panic!(
            "load {}: {e} (build it first: `cargo build -p rzc-capi`)",
            path.display()
        )
    })
}

fn official_buffer() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    let a: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = vec![7, 8, 9];
    let views = vec![
        (
            "weight".to_string(),
            TensorView::new(safetensors::Dtype::F32, vec![3, 4], &a).unwrap(),
        ),
        (
            "bias".to_string(),
            TensorView::new(safetensors::Dtype::U8, vec![3], &b).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

struct Api<'l> {
    open_memory: Symbol<'l, unsafe extern "C" fn(*const u8, usize, *mut *mut Weights) -> u32>,
    free: Symbol<'l, unsafe extern "C" fn(*mut Weights)>,
    len: Symbol<'l, unsafe extern "C" fn(*const Weights) -> usize>,
    get: Symbol<'l, unsafe extern "C" fn(*const Weights, usize, *mut TensorInfo) -> u32>,
    find: Symbol<'l, unsafe extern "C" fn(*const Weights, *const c_char, *mut usize) -> u32>,
    to_dlpack: Symbol<
        'l,
        unsafe extern "C" fn(*const Weights, usize, *mut *mut DLManagedTensorVersioned) -> u32,
    >,
    last_error: Symbol<'l, unsafe extern "C" fn() -> *const c_char>,
}

impl<'l> Api<'l> {
    fn new(lib: &'l Library) -> Api<'l> {
        unsafe {
            Api {
                open_memory: lib.get(b"rzc_weights_open_memory").unwrap(),
                free: lib.get(b"rzc_weights_free").unwrap(),
                len: lib.get(b"rzc_weights_len").unwrap(),
                get: lib.get(b"rzc_weights_get").unwrap(),
                find: lib.get(b"rzc_weights_find").unwrap(),
                to_dlpack: lib.get(b"rzc_weights_to_dlpack").unwrap(),
                last_error: lib.get(b"rzc_last_error_message").unwrap(),
            }
        }
    }
    fn message(&self) -> String {
        unsafe { CStr::from_ptr((self.last_error)()) }
            .to_string_lossy()
            .into_owned()
    }
}

const OK: u32 = 0;
const NULL_ARGUMENT: u32 = 1;
const BAD_FORMAT: u32 = 3;
const NOT_FOUND: u32 = 5;
const OUT_OF_RANGE: u32 = 7;

#[test]
fn version_matches_cargo() {
    let lib = cdylib();
    let version: Symbol<unsafe extern "C" fn() -> *const c_char> =
        unsafe { lib.get(b"rzc_version") }.unwrap();
    let v = unsafe { CStr::from_ptr(version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
}

#[test]
fn open_list_read_zero_copy() {
    let lib = cdylib();
    let api = Api::new(&lib);
    let buf = official_buffer();
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api.open_memory)(buf.as_ptr(), buf.len(), &mut w) },
        OK
    );
    assert_eq!(unsafe { (api.len)(w) }, 2);
    let mut idx = usize::MAX;
    let name = CString::new("weight").unwrap();
    assert_eq!(unsafe { (api.find)(w, name.as_ptr(), &mut idx) }, OK);
    let mut info: TensorInfo = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { (api.get)(w, idx, &mut info) }, OK);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    assert!(
        range.contains(&(info.data as usize)),
        "data points into the caller's buffer"
    );
    assert_eq!((info.dtype, info.ndim, info.nbytes), (11, 2, 48));
    let name = unsafe { std::slice::from_raw_parts(info.name.cast::<u8>(), info.name_len) };
    assert_eq!(name, b"weight");
    let values = unsafe { std::slice::from_raw_parts(info.data.cast::<f32>(), 12) };
    assert_eq!(values[11], 11.0);

    let mut t = std::ptr::null_mut();
    assert_eq!(unsafe { (api.to_dlpack)(w, idx, &mut t) }, OK);
    // The handle goes first; the DLPack tensor must keep working.
    unsafe { (api.free)(w) };
    unsafe {
        let dl = &(*t).dl_tensor;
        assert_eq!((*t).version, [1, 1]);
        assert_eq!((*t).flags & 1, 1, "READ_ONLY");
        assert_eq!((dl.device_type, dl.device_id, dl.ndim), (1, 0, 2));
        assert_eq!(dl.dtype, [2, 32, 1, 0]);
        assert_eq!([*dl.shape, *dl.shape.add(1)], [3, 4]);
        assert!(dl.strides.is_null());
        assert_eq!(dl.data as usize, info.data as usize);
        assert_eq!(*dl.data.cast::<f32>().add(5), 5.0);
        ((*t).deleter.unwrap())(t);
    }
}

#[test]
fn errors_are_statuses_with_messages() {
    let lib = cdylib();
    let api = Api::new(&lib);
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api.open_memory)(std::ptr::null(), 10, &mut w) },
        NULL_ARGUMENT
    );
    assert!(api.message().contains("data"), "{}", api.message());
    assert_eq!(
        unsafe { (api.open_memory)(b"abc".as_ptr(), 3, std::ptr::null_mut()) },
        NULL_ARGUMENT
    );
    assert!(api.message().contains("out"));
    let buf = official_buffer();
    assert_eq!(
        unsafe { (api.open_memory)(buf.as_ptr(), buf.len() - 1, &mut w) },
        BAD_FORMAT
    );
    assert!(
        api.message().contains("run past the end"),
        "{}",
        api.message()
    );
    assert!(w.is_null(), "out-params are written only on success");

    assert_eq!(
        unsafe { (api.open_memory)(buf.as_ptr(), buf.len(), &mut w) },
        OK
    );
    assert_eq!(api.message(), "", "a success clears the message");
    let mut idx = 0;
    let missing = CString::new("nope").unwrap();
    assert_eq!(
        unsafe { (api.find)(w, missing.as_ptr(), &mut idx) },
        NOT_FOUND
    );
    assert!(api.message().contains("nope"));
    let mut info: TensorInfo = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { (api.get)(w, 2, &mut info) }, OUT_OF_RANGE);
    assert_eq!(
        unsafe { (api.get)(std::ptr::null(), 0, &mut info) },
        NULL_ARGUMENT
    );
    assert_eq!(unsafe { (api.len)(std::ptr::null()) }, 0);
    unsafe { (api.free)(w) };
    unsafe { (api.free)(std::ptr::null_mut()) };
}

#[test]
fn messages_are_per_thread() {
    let lib = cdylib();
    let api = Api::new(&lib);
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api.open_memory)(b"x".as_ptr(), 1, &mut w) },
        BAD_FORMAT
    );
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(api.message(), ""));
    });
    assert!(api.message().contains("8-byte header length"));
}

#[test]
fn concurrent_readers_share_one_handle() {
    let lib = cdylib();
    let api = Api::new(&lib);
    let buf = official_buffer();
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api.open_memory)(buf.as_ptr(), buf.len(), &mut w) },
        OK
    );
    let handle = w as usize;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2000 {
                    let mut t = std::ptr::null_mut();
                    assert_eq!(
                        unsafe { (api.to_dlpack)(handle as *const Weights, 1, &mut t) },
                        OK
                    );
                    unsafe { ((*t).deleter.unwrap())(t) };
                }
            });
        }
    });
    unsafe { (api.free)(w) };
}

#[repr(C)]
#[derive(Clone, Copy)]
struct OpenOptions {
    struct_nbytes: usize,
    release: Option<unsafe extern "C" fn(*mut c_void)>,
    release_ctx: *mut c_void,
    flags: u32,
}

unsafe extern "C" fn count_release(ctx: *mut c_void) {
    let n = unsafe { &*(ctx as *const std::sync::atomic::AtomicUsize) };
    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn release_runs_once_after_the_last_tensor() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let lib = cdylib();
    let api = Api::new(&lib);
    let open_ex: Symbol<
        unsafe extern "C" fn(*const u8, usize, *const OpenOptions, *mut *mut Weights) -> u32,
    > = unsafe { lib.get(b"rzc_weights_open_memory_ex") }.unwrap();
    let buf = official_buffer();
    let released = AtomicUsize::new(0);
    let opts = OpenOptions {
        struct_nbytes: std::mem::size_of::<OpenOptions>(),
        release: Some(count_release),
        release_ctx: &released as *const _ as *mut c_void,
        flags: 0,
    };

    // A failed open never calls release: the caller still owns the bytes.
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), 5, &opts, &mut w) },
        BAD_FORMAT
    );
    assert_eq!(released.load(Ordering::SeqCst), 0);
    let bad_flags = OpenOptions {
        flags: 0x80,
        ..opts
    };
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &bad_flags, &mut w) },
        2
    );
    assert!(api.message().contains("flags"));

    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &opts, &mut w) },
        OK
    );
    let mut t1 = std::ptr::null_mut();
    let mut t2 = std::ptr::null_mut();
    assert_eq!(unsafe { (api.to_dlpack)(w, 0, &mut t1) }, OK);
    assert_eq!(unsafe { (api.to_dlpack)(w, 1, &mut t2) }, OK);
    unsafe { (api.free)(w) };
    assert_eq!(released.load(Ordering::SeqCst), 0, "tensors still alive");
    unsafe { ((*t1).deleter.unwrap())(t1) };
    assert_eq!(released.load(Ordering::SeqCst), 0);
    // The last tensor goes on another thread: release runs there, once.
    let t2 = t2 as usize;
    std::thread::spawn(move || unsafe {
        let t2 = t2 as *mut DLManagedTensorVersioned;
        ((*t2).deleter.unwrap())(t2)
    })
    .join()
    .unwrap();
    assert_eq!(released.load(Ordering::SeqCst), 1);
}

type OpenEx = unsafe extern "C" fn(*const u8, usize, *const OpenOptions, *mut *mut Weights) -> u32;

/// Opens `buf` with a release callback counting into `released`.
fn open_counted(
    lib: &Library,
    buf: &[u8],
    released: &std::sync::atomic::AtomicUsize,
) -> *mut Weights {
    let open_ex: Symbol<OpenEx> = unsafe { lib.get(b"rzc_weights_open_memory_ex") }.unwrap();
    let opts = OpenOptions {
        struct_nbytes: std::mem::size_of::<OpenOptions>(),
        release: Some(count_release),
        release_ctx: released as *const _ as *mut c_void,
        flags: 0,
    };
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &opts, &mut w) },
        OK
    );
    w
}

/// Every export that creates something checks its out-pointer first: a NULL
/// one is an error that leaves nothing behind (the buffer is still released
/// once the handle goes).
#[test]
fn null_out_pointers_create_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let lib = cdylib();
    let api = Api::new(&lib);
    let buf = official_buffer();
    let released = AtomicUsize::new(0);
    let w = open_counted(&lib, &buf, &released);
    type Export = unsafe extern "C" fn(*const Weights, *mut *mut DLManagedTensorVersioned) -> u32;
    type ExportAt = unsafe extern "C" fn(*const Weights, usize, *mut *mut c_void) -> u32;
    let data_to_dlpack: Symbol<Export> = unsafe { lib.get(b"rzc_weights_data_to_dlpack") }.unwrap();
    assert_eq!(
        unsafe { data_to_dlpack(w, std::ptr::null_mut()) },
        NULL_ARGUMENT
    );
    assert!(api.message().contains("out"), "{}", api.message());
    for name in [
        &b"rzc_weights_to_dlpack"[..],
        b"rzc_weights_to_dlpack_legacy",
    ] {
        let f: Symbol<ExportAt> = unsafe { lib.get(name) }.unwrap();
        assert_eq!(unsafe { f(w, 0, std::ptr::null_mut()) }, NULL_ARGUMENT);
    }
    let get_layout: Symbol<unsafe extern "C" fn(*const Weights, *mut c_void) -> u32> =
        unsafe { lib.get(b"rzc_weights_get_layout") }.unwrap();
    assert_eq!(
        unsafe { get_layout(w, std::ptr::null_mut()) },
        NULL_ARGUMENT
    );
    unsafe { (api.free)(w) };
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "no export kept the buffer alive"
    );
}

#[test]
fn options_structs_carry_their_size() {
    let lib = cdylib();
    let api = Api::new(&lib);
    let open_ex: Symbol<OpenEx> = unsafe { lib.get(b"rzc_weights_open_memory_ex") }.unwrap();
    let buf = official_buffer();
    let size = std::mem::size_of::<OpenOptions>();
    let base = OpenOptions {
        struct_nbytes: size,
        release: None,
        release_ctx: std::ptr::null_mut(),
        flags: 0,
    };
    let mut w = std::ptr::null_mut();
    // Unset (zero-initialised without the size): refused with what to do.
    let unset = OpenOptions {
        struct_nbytes: 0,
        ..base
    };
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &unset, &mut w) },
        2
    );
    assert!(
        api.message().contains("sizeof(rzc_open_options)"),
        "{}",
        api.message()
    );
    // A newer caller's larger struct: fine while the fields we do not know are zero.
    #[repr(C)]
    struct Newer {
        base: OpenOptions,
        future: u64,
    }
    let mut newer = Newer {
        base: OpenOptions {
            struct_nbytes: std::mem::size_of::<Newer>(),
            ..base
        },
        future: 0,
    };
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &newer.base, &mut w) },
        OK
    );
    unsafe { (api.free)(w) };
    newer.future = 1;
    let mut w2 = std::ptr::null_mut();
    assert_eq!(
        unsafe { open_ex(buf.as_ptr(), buf.len(), &newer.base, &mut w2) },
        2
    );
    assert!(api.message().contains("newer rzc.h"), "{}", api.message());
    assert!(w2.is_null());
}

#[test]
fn one_call_describes_every_tensor() {
    let lib = cdylib();
    let api = Api::new(&lib);
    type GetAll = unsafe extern "C" fn(*const Weights, *mut TensorInfo, usize) -> u32;
    let get_all: Symbol<GetAll> = unsafe { lib.get(b"rzc_weights_get_all") }.unwrap();
    let buf = official_buffer();
    let mut w = std::ptr::null_mut();
    assert_eq!(
        unsafe { (api.open_memory)(buf.as_ptr(), buf.len(), &mut w) },
        OK
    );
    let mut infos: Vec<TensorInfo> = (0..3).map(|_| unsafe { std::mem::zeroed() }).collect();
    assert_eq!(
        unsafe { get_all(w, infos.as_mut_ptr(), 1) },
        8,
        "BUFFER_TOO_SMALL"
    );
    assert!(infos[0].name.is_null(), "nothing written on failure");
    assert_eq!(unsafe { get_all(w, infos.as_mut_ptr(), 3) }, OK);
    for (i, info) in infos.iter().take(2).enumerate() {
        let mut one: TensorInfo = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { (api.get)(w, i, &mut one) }, OK);
        assert_eq!(
            (info.name, info.data, info.nbytes, info.dtype),
            (one.name, one.data, one.nbytes, one.dtype)
        );
    }
    assert!(
        infos[2].name.is_null(),
        "only rzc_weights_len entries are written"
    );
    unsafe { (api.free)(w) };
}

#[test]
fn every_status_has_its_name() {
    let lib = cdylib();
    let name: Symbol<unsafe extern "C" fn(u32) -> *const c_char> =
        unsafe { lib.get(b"rzc_status_name") }.unwrap();
    let get = |code| {
        unsafe { CStr::from_ptr(name(code)) }
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(get(0), "RZC_OK");
    assert_eq!(get(3), "RZC_BAD_FORMAT");
    assert_eq!(get(13), "RZC_PANIC");
    assert_eq!(get(14), "RZC_UNKNOWN");
    assert_eq!(get(u32::MAX), "RZC_UNKNOWN");
}
