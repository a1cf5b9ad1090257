//! Buffers written by the official safetensors crate open and read back.

use std::collections::HashMap;

use rzc_core::{Dtype, ErrorKind, Weights};
use safetensors::tensor::TensorView;

fn official(
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, meta).unwrap()
}

#[test]
fn every_dtype_zero_sized_and_scalar() {
    use safetensors::Dtype as D;
    let cases: Vec<(&str, D, Vec<usize>, Vec<u8>)> = vec![
        ("bool", D::BOOL, vec![3], vec![1, 0, 1]),
        ("u8", D::U8, vec![2, 2], vec![1, 2, 3, 4]),
        ("i8", D::I8, vec![1], vec![0xff]),
        ("i16", D::I16, vec![2], vec![1, 0, 2, 0]),
        ("u16", D::U16, vec![1], vec![9, 9]),
        ("f16", D::F16, vec![2], vec![0, 0x3c, 0, 0x40]),
        ("bf16", D::BF16, vec![2], vec![0x80, 0x3f, 0, 0x40]),
        ("i32", D::I32, vec![1], 7i32.to_le_bytes().to_vec()),
        ("u32", D::U32, vec![1], 7u32.to_le_bytes().to_vec()),
        (
            "f32",
            D::F32,
            vec![2],
            [1.5f32, -2.0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        ("f64", D::F64, vec![], 3.25f64.to_le_bytes().to_vec()),
        ("i64", D::I64, vec![1], (-5i64).to_le_bytes().to_vec()),
        ("u64", D::U64, vec![1], 5u64.to_le_bytes().to_vec()),
        ("c64", D::C64, vec![1], vec![0; 8]),
        ("f8e4m3", D::F8_E4M3, vec![4], vec![1, 2, 3, 4]),
        ("f8e5m2", D::F8_E5M2, vec![4], vec![5, 6, 7, 8]),
        ("f8e8m0", D::F8_E8M0, vec![2], vec![127, 128]),
        ("empty", D::F32, vec![0, 5], vec![]),
        ("f4", D::F4, vec![4], vec![0x12, 0x34]),
    ];
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let buf = official(&cases, Some(meta));
    let w = Weights::from_vec(buf).unwrap();
    assert_eq!(w.len(), cases.len());
    assert_eq!(w.metadata().get("format").map(String::as_str), Some("pt"));
    for (name, _, shape, bytes) in &cases {
        let i = w.find(name).unwrap();
        let t = w.get(i).unwrap();
        assert_eq!(
            t.shape,
            shape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(w.data(i).unwrap(), &bytes[..], "{name}");
        assert_eq!(
            t.dtype.name().to_lowercase().replace('_', ""),
            name.replace("empty", "f32")
        );
    }
    assert_eq!(w.get(w.find("f64").unwrap()).unwrap().dtype, Dtype::F64);
    // Sub-byte dtypes are listed, but DLPack export says why it refuses them.
    let e = w.to_dlpack(w.find("f4").unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsupportedDtype);
    assert!(e.message().contains("F4"), "{}", e.message());
}

#[test]
fn data_points_into_the_buffer() {
    let buf = official(
        &[("a", safetensors::Dtype::F32, vec![4], vec![0; 16])],
        None,
    );
    let w = Weights::from_vec(buf).unwrap();
    let base = w.bytes().as_ptr() as usize;
    let p = w.data(0).unwrap().as_ptr() as usize;
    assert!(p >= base && p + 16 <= base + w.bytes().len());
    let m = w.to_dlpack(0).unwrap();
    // SAFETY: a live export; its deleter runs once, at the end.
    unsafe {
        assert_eq!((*m).dl_tensor.data as usize, p);
        assert_eq!(
            (*m).flags & rzc_core::dlpack::DLPACK_FLAG_BITMASK_READ_ONLY,
            1
        );
        assert!((*m).dl_tensor.strides.is_null());
        ((*m).deleter.unwrap())(m);
    }
}

#[test]
fn dlpack_outlives_the_handle() {
    let buf = official(
        &[(
            "a",
            safetensors::Dtype::I32,
            vec![2],
            vec![1, 0, 0, 0, 2, 0, 0, 0],
        )],
        None,
    );
    let w = Weights::from_vec(buf).unwrap();
    let m = w.to_dlpack(0).unwrap();
    let l = w.to_dlpack_legacy(0).unwrap();
    drop(w);
    // SAFETY: the exports keep the storage alive after the handle is gone
    // (what this test checks); each deleter runs once.
    unsafe {
        let d = (*m).dl_tensor.data as *const i32;
        assert_eq!([*d, *d.add(1)], [1, 2]);
        ((*m).deleter.unwrap())(m);
        let d = (*l).dl_tensor.data as *const i32;
        assert_eq!(*d.add(1), 2);
        ((*l).deleter.unwrap())(l);
    }
}

#[test]
fn lookup_errors() {
    let w = Weights::from_vec(official(&[], None)).unwrap();
    assert!(w.is_empty());
    assert_eq!(w.find("x").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(w.get(0).unwrap_err().kind(), ErrorKind::OutOfRange);
    let e = Weights::open_file(std::path::Path::new("/nonexistent/model.safetensors")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.message().contains("/nonexistent/model.safetensors"));
}

/// Only regular files are mapped: a FIFO named like a checkpoint is refused
/// at once (opening it for reading would wait for a writer forever), and so
/// is a directory, each by what it is.
#[test]
fn a_fifo_or_a_directory_is_refused_not_waited_on() {
    let dir = std::env::temp_dir().join(format!("rzc-core-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("model.safetensors");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Weights::open_file(&path).map(|_| ()).unwrap_err());
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("opening a FIFO returned within 10 s");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        e.message()
            .contains("model.safetensors: is a FIFO, not a regular file"),
        "{}",
        e.message()
    );
    let e = Weights::open_file(&dir).unwrap_err();
    assert!(
        e.message().contains(": is a directory, not a regular file"),
        "{}",
        e.message()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn data_section_export_covers_every_tensor() {
    let buf = official(
        &[
            ("a", safetensors::Dtype::U8, vec![3], vec![1, 2, 3]),
            ("b", safetensors::Dtype::U8, vec![2], vec![4, 5]),
        ],
        None,
    );
    let w = Weights::from_vec(buf).unwrap();
    let m = w.data_section_to_dlpack();
    // SAFETY: a live export; its deleter runs once, at the end.
    unsafe {
        assert_eq!(
            *(*m).dl_tensor.shape,
            (w.data_end() - w.data_start()) as i64
        );
        let base = (*m).dl_tensor.data as *const u8;
        for (i, t) in w.tensors().iter().enumerate() {
            let view = std::slice::from_raw_parts(base.add(t.offset - w.data_start()), t.nbytes);
            assert_eq!(view, w.data(i).unwrap());
        }
        ((*m).deleter.unwrap())(m);
    }
}
