//! Packed buffers are standard safetensors: the official crate reads them bit
//! for bit, every tensor is aligned, and padding stays hidden from our reader.

use std::collections::BTreeMap;

use rzc_core::pack::{PackOptions, Plan, TensorSpec};
use rzc_core::{Dtype, ErrorKind, Weights};

fn sample() -> Vec<(String, Dtype, Vec<i64>, Vec<u8>)> {
    (0..20)
        .map(|i| {
            let shape = vec![i % 3 + 1, i * 7 % 5];
            let dtype = [Dtype::F32, Dtype::Bf16, Dtype::U8, Dtype::I64][i as usize % 4];
            let n = dtype.nbytes((shape[0] * shape[1]) as u64).unwrap() as usize;
            (
                format!("layer.{i}.w"),
                dtype,
                shape,
                (0..n).map(|b| (b * 31 + i as usize) as u8).collect(),
            )
        })
        .collect()
}

fn pack(
    items: &[(String, Dtype, Vec<i64>, Vec<u8>)],
    meta: &BTreeMap<String, String>,
    opts: PackOptions,
) -> Vec<u8> {
    let specs: Vec<TensorSpec<'_>> = items
        .iter()
        .map(|(n, d, s, _)| TensorSpec {
            name: n,
            dtype: *d,
            shape: s,
        })
        .collect();
    let plan = Plan::new(&specs, meta, &opts).unwrap();
    let mut out = vec![0xAAu8; plan.total_size()];
    let data: Vec<&[u8]> = items.iter().map(|t| t.3.as_slice()).collect();
    plan.write(&mut out, &data).unwrap();
    for i in 0..plan.len() {
        assert_eq!(plan.offset(i).unwrap() % opts.alignment, 0);
    }
    out
}

#[test]
fn official_reader_reads_it_bit_for_bit() {
    let items = sample();
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), "pt".into());
    let buf = pack(&items, &meta, PackOptions::default());
    let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
    for (name, _, shape, bytes) in &items {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.data(), &bytes[..], "{name}");
        assert_eq!(
            v.shape(),
            shape.iter().map(|&d| d as usize).collect::<Vec<_>>()
        );
    }
    let (_, m) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
    assert_eq!(m.metadata().as_ref().unwrap().get("format").unwrap(), "pt");

    let w = Weights::from_vec(buf).unwrap();
    assert_eq!(w.len(), items.len(), "padding entries are hidden");
    for (i, (name, dtype, shape, bytes)) in items.iter().enumerate() {
        let t = w.get(w.find(name).unwrap()).unwrap();
        assert_eq!((&t.dtype, &t.shape), (dtype, shape));
        assert_eq!(t.offset % 64, 0);
        assert_eq!(w.data(w.find(name).unwrap()).unwrap(), &bytes[..]);
        assert_eq!(w.tensors()[i].name, *name, "input order is kept");
    }
}

#[test]
fn guard_bytes_surround_the_tensors() {
    let items = sample();
    let opts = PackOptions {
        alignment: 64,
        guard_bytes: 4096,
        ..Default::default()
    };
    let buf = pack(&items, &BTreeMap::new(), opts);
    let w = Weights::from_vec(buf).unwrap();
    let first = w.tensors().iter().map(|t| t.offset).min().unwrap();
    let last = w
        .tensors()
        .iter()
        .map(|t| t.offset + t.nbytes)
        .max()
        .unwrap();
    assert!(first >= 4096);
    assert!(w.bytes().len() - last >= 4096);
}

#[test]
fn bad_plans() {
    let shape = [2i64];
    let spec = |name| TensorSpec {
        name,
        dtype: Dtype::F32,
        shape: &shape,
    };
    let meta = BTreeMap::new();
    let err = |specs: &[TensorSpec<'_>], opts| Plan::new(specs, &meta, &opts).unwrap_err();
    let d = PackOptions::default();
    assert!(err(&[spec("a"), spec("a")], d)
        .message()
        .contains("given twice"));
    assert!(err(&[spec("__metadata__")], d)
        .message()
        .contains("reserved"));
    assert!(err(&[spec("__rzc_pad__.3")], d)
        .message()
        .contains("reserved"));
    assert!(err(
        &[spec("a")],
        PackOptions {
            alignment: 48,
            guard_bytes: 0,
            ..Default::default()
        }
    )
    .message()
    .contains("power of two"));
    let neg = [-1i64];
    let e = err(
        &[TensorSpec {
            name: "n",
            dtype: Dtype::U8,
            shape: &neg,
        }],
        d,
    );
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("negative"));

    let plan = Plan::new(&[spec("a")], &meta, &d).unwrap();
    let mut small = vec![0u8; plan.total_size() - 1];
    assert_eq!(
        plan.write(&mut small, &[&[0u8; 8]]).unwrap_err().kind(),
        ErrorKind::BufferTooSmall
    );
    let mut out = vec![0u8; plan.total_size()];
    assert!(plan
        .write(&mut out, &[&[0u8; 7]])
        .unwrap_err()
        .message()
        .contains("need 8"));
}
