//! Core benchmark: what opening a 1 GiB, 300-tensor buffer costs (the header
//! is parsed; no tensor data is touched), what exporting every tensor through
//! DLPack costs, and how fast packing copies compared with one plain memcpy of
//! the same bytes, measured in the same run.
//!
//! Run: `cargo bench -p rzc-core --bench core` (or `make bench-core`).
//! Prints a table and writes `bench-results/core.json`.
//! `RZC_BENCH_MB` changes the model size (default 1024).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use rzc_core::pack::{PackOptions, Plan, TensorSpec};
use rzc_core::{Dtype, Weights};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn main() {
    let total_mb: usize = std::env::var("RZC_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let n_tensors = 300;
    // Transformer-like sizes: a few large matrices, many small vectors (odd
    // lengths included, so alignment padding is exercised).
    let mut shapes = Vec::with_capacity(n_tensors);
    let big = total_mb * (1 << 20) / 4 / 150;
    for i in 0..n_tensors {
        if i % 2 == 0 {
            shapes.push(vec![(big / 1024).max(1) as i64, 1024]);
        } else {
            shapes.push(vec![1000 + i as i64]);
        }
    }
    let names: Vec<String> = (0..n_tensors)
        .map(|i| format!("model.layers.{}.w{}", i / 12, i % 12))
        .collect();
    let specs: Vec<TensorSpec<'_>> = names
        .iter()
        .zip(&shapes)
        .map(|(n, s)| TensorSpec {
            name: n,
            dtype: Dtype::F32,
            shape: s,
        })
        .collect();
    let plan = Plan::new(&specs, &BTreeMap::new(), &PackOptions::default()).unwrap();
    let sizes: Vec<usize> = (0..n_tensors).map(|i| plan.nbytes(i).unwrap()).collect();
    let payload: usize = sizes.iter().sum();

    // One contiguous source; the pack reads each tensor from its slice of it,
    // so both copies read exactly the same bytes.
    let src: Vec<u8> = (0..payload).map(|i| (i * 7) as u8).collect();
    let mut slices = Vec::with_capacity(n_tensors);
    let mut at = 0;
    for &n in &sizes {
        slices.push(&src[at..at + n]);
        at += n;
    }
    let mut dst = vec![1u8; plan.total_size()]; // faulted in before timing

    let reps = 5;
    let memcpy = median(time(reps, || {
        dst[..payload].copy_from_slice(&src);
        black_box(&dst);
    }));
    let pack = median(time(reps, || {
        plan.write(&mut dst, &slices).unwrap();
        black_box(&dst);
    }));
    let plan_time = median(time(21, || {
        black_box(Plan::new(&specs, &BTreeMap::new(), &PackOptions::default()).unwrap());
    }));

    let open = median(time(201, || {
        black_box(open_borrowed(&dst));
    }));
    let w = open_borrowed(&dst);
    assert_eq!(w.len(), n_tensors);
    assert_eq!(w.data(0).unwrap(), slices[0]);
    let export = median(time(201, || {
        for i in 0..w.len() {
            let m = w.to_dlpack(i).unwrap();
            // SAFETY: a fresh export, released once.
            unsafe { ((*m).deleter.unwrap())(m) };
        }
    }));

    let gbs = |s: f64| payload as f64 / s / 1e9;
    println!(
        "core benchmark: {} tensors, {:.1} MiB of f32 payload",
        n_tensors,
        payload as f64 / (1 << 20) as f64
    );
    println!("| measure | median | note |");
    println!("| --- | --- | --- |");
    println!(
        "| open (parse + validate header) | {:.1} us | no tensor data touched |",
        open * 1e6
    );
    println!(
        "| export all {} tensors as DLPack and free | {:.1} us | {:.2} us per tensor |",
        n_tensors,
        export * 1e6,
        export * 1e6 / n_tensors as f64
    );
    println!("| plan layout | {:.1} us | |", plan_time * 1e6);
    println!(
        "| plain memcpy of the payload | {:.1} ms | {:.2} GB/s |",
        memcpy * 1e3,
        gbs(memcpy)
    );
    println!(
        "| pack write (header + pads + copies) | {:.1} ms | {:.2} GB/s |",
        pack * 1e3,
        gbs(pack)
    );
    println!(
        "| pack speed / memcpy speed | {:.2} | target >= 0.7 |",
        memcpy / pack
    );

    std::fs::create_dir_all("bench-results").ok();
    let json = format!(
        "{{\"tensors\":{n_tensors},\"payload_bytes\":{payload},\"open_us\":{:.3},\"export_all_us\":{:.3},\"plan_us\":{:.3},\"memcpy_gbs\":{:.3},\"pack_gbs\":{:.3},\"pack_over_memcpy\":{:.3}}}\n",
        open * 1e6, export * 1e6, plan_time * 1e6, gbs(memcpy), gbs(pack), memcpy / pack
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench-results/core.json");
    std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).ok();
    std::fs::write(path, json).unwrap();
}

/// Opens `bytes` in place (no copy), as the C ABI and Python do.
fn open_borrowed(bytes: &[u8]) -> Weights {
    // SAFETY: `bytes` outlives the returned weights in every caller here.
    let b = unsafe { rzc_core::Borrowed::new(bytes.as_ptr(), bytes.len()) }.unwrap();
    Weights::open_borrowed(b, rzc_core::OpenOptions::default()).unwrap()
}
