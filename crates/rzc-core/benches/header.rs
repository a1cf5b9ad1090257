//! Our header parser beside the `safetensors` crate's, in one run: the time
//! to parse and validate a header of 400 and of 20,000 tensors (median of
//! many runs), and which of a set of hostile headers each accepts. The
//! answer decides whether the core parses with the crate (see "Header
//! parsing" in docs/internals.md).
//!
//! Run: `cargo bench -p rzc-core --bench header`. Prints one JSON line.

use std::hint::black_box;
use std::time::Instant;

use rzc_core::Weights;
use safetensors::SafeTensors;

fn median_us<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A buffer of `n` small F32 tensors named like a mixture-of-experts model,
/// written by the official crate.
fn model(n: usize) -> Vec<u8> {
    let data = vec![0u8; 64];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = (0..n)
        .map(|i| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16], &data)
                    .expect("view");
            (
                format!(
                    "model.layers.{}.mlp.experts.{}.w{}",
                    i / 600,
                    (i / 3) % 200,
                    i % 3
                ),
                view,
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

fn buf(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    b
}

/// Headers a hostile or careless writer could produce, each of which some
/// reader could take in a way another reader does not.
fn hostile() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "a tensor name given twice, with different dtypes (readers differ on which one counts)",
            buf(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#,
                8,
            ),
        ),
        (
            "a __metadata__ key given twice",
            buf(
                r#"{"__metadata__":{"k":"1"},"__metadata__":{"k":"2"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
        ),
        (
            "header padded with NUL bytes instead of spaces",
            buf(
                "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}\0\0\0",
                1,
            ),
        ),
        (
            "a tensor whose entry has an unknown field",
            buf(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}}"#,
                1,
            ),
        ),
        (
            "a negative extent",
            buf(
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#,
                0,
            ),
        ),
    ]
}

fn main() {
    let mut fields = Vec::new();
    for n in [400usize, 20_000] {
        let b = model(n);
        let reps = if n > 1000 { 31 } else { 301 };
        let ours = median_us(reps, || {
            black_box(rzc_core::header::parse(&b).expect("valid"));
        });
        let theirs = median_us(reps, || {
            black_box(SafeTensors::deserialize(&b).expect("valid"));
        });
        fields.push(format!(
            "\"ours_us_{n}\": {ours:.1}, \"safetensors_us_{n}\": {theirs:.1}, \"ratio_{n}\": {:.2}",
            ours / theirs
        ));
    }
    let mut differ = Vec::new();
    for (what, b) in hostile() {
        let ours = Weights::from_vec(b.clone()).is_ok();
        let theirs = SafeTensors::deserialize(&b).is_ok();
        if ours != theirs {
            differ.push(format!(
                "{{\"case\": {what:?}, \"ours_accepts\": {ours}, \"safetensors_accepts\": {theirs}}}"
            ));
        }
    }
    println!(
        "{{{}, \"disagreements\": [{}]}}",
        fields.join(", "),
        differ.join(", ")
    );
}
