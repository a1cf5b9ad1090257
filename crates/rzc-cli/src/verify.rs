//! `rzc verify`: everything a load would refuse, and what a load trusts.
//!
//! Per file: the whole header (what "validated" covers in
//! docs/internals.md), and, when the header claims a data digest
//! (`rzc.data_blake3`, written when ray-zerocopy seals a buffer), the digest
//! of every data byte against that claim. Per directory: the index's
//! `weight_map` against the shards (every listed tensor in the shard it
//! names, every shard's tensor listed, no shard missing), and no tensor name
//! in two shards.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use rzc_core::Weights;

use crate::checkpoint::{self, file_name};

/// Prints each problem; `Ok(true)` when there is none.
pub fn run(path: &Path) -> Result<bool> {
    let ckpt = checkpoint::find(path)?;
    let mut problems = Vec::new();
    // tensor name -> shard that holds it
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    let mut tensors = 0usize;
    for file in &ckpt.files {
        let name = file_name(file);
        if let Some(why) = checkpoint::not_regular(file) {
            problems.push(format!("{name}: {why}"));
            continue;
        }
        let w = match Weights::open_file(file) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("{name}: {}", e.message()));
                continue;
            }
        };
        if w.verify_data_digest() == Some(false) {
            problems.push(format!(
                "{name}: the data section does not match the digest its header claims (rzc.data_blake3): \
                 the tensor bytes were changed after sealing"
            ));
        }
        for t in w.tensors() {
            tensors += 1;
            if let Some(other) = holder.insert(t.name.clone(), name.clone()) {
                problems.push(format!("tensor {:?} is in both {other} and {name}", t.name));
            }
        }
    }
    if let Some((index, map)) = &ckpt.index {
        check_index(&file_name(index), map, &holder, &ckpt.files, &mut problems);
    }
    for p in &problems {
        println!("invalid: {p}");
    }
    if problems.is_empty() {
        println!("valid: {} file(s), {tensors} tensors", ckpt.files.len());
    }
    Ok(problems.is_empty())
}

fn check_index(
    index: &str,
    map: &BTreeMap<String, String>,
    holder: &BTreeMap<String, String>,
    files: &[std::path::PathBuf],
    problems: &mut Vec<String>,
) {
    let shards: Vec<String> = files.iter().map(|f| file_name(f)).collect();
    for (tensor, shard) in map {
        if !shards.contains(shard) {
            problems.push(format!(
                "{index}: tensor {tensor:?} is mapped to {shard}, which is not in the directory"
            ));
        } else if holder.get(tensor) != Some(shard) {
            let actual = holder
                .get(tensor)
                .map_or("no shard".to_owned(), |s| s.clone());
            problems.push(format!(
                "{index}: tensor {tensor:?} is mapped to {shard}, but it is in {actual}"
            ));
        }
    }
    for (tensor, shard) in holder {
        if !map.contains_key(tensor) {
            problems.push(format!(
                "{index}: tensor {tensor:?} of {shard} is not listed"
            ));
        }
    }
}
