//! `rzc inspect`: the tensor table and metadata, as a table or as JSON.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rzc_core::Weights;
use serde_json::json;

use crate::checkpoint::{self, file_name};

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let ckpt = checkpoint::find(path)?;
    let mut files = Vec::new();
    for file in &ckpt.files {
        if let Some(why) = checkpoint::not_regular(file) {
            bail!("{}: {why}", file.display());
        }
        let w = Weights::open_file(file)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        if as_json {
            files.push(to_json(file, &w));
        } else {
            print_table(file, &w);
        }
    }
    if as_json {
        println!("{}", json!({ "files": files }));
    }
    Ok(())
}

fn to_json(file: &Path, w: &Weights) -> serde_json::Value {
    let tensors: Vec<_> = w
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                "nbytes": t.nbytes, "offset": t.offset,
            })
        })
        .collect();
    json!({
        "file": file_name(file),
        "nbytes": w.bytes().len(),
        "header_nbytes": w.data_start(),
        "tensors": tensors,
        "metadata": w.metadata(),
    })
}

fn print_table(file: &Path, w: &Weights) {
    let data: usize = w.tensors().iter().map(|t| t.nbytes).sum();
    println!(
        "{}: {} tensors, {} bytes of tensor data, {} bytes in all (header {} bytes)",
        file_name(file),
        w.len(),
        data,
        w.bytes().len(),
        w.data_start()
    );
    let width = w
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "  {:width$}  {:6}  {:20}  {:>12}  {:>12}",
        "name", "dtype", "shape", "bytes", "offset"
    );
    for t in w.tensors() {
        let shape = format!("{:?}", t.shape);
        println!(
            "  {:width$}  {:6}  {:20}  {:>12}  {:>12}",
            t.name,
            t.dtype.name(),
            shape,
            t.nbytes,
            t.offset
        );
    }
    for (k, v) in w.metadata() {
        println!("  metadata {k} = {v}");
    }
}
