//! What a PATH names: one file, or a checkpoint directory of shards with an
//! optional `*.safetensors.index.json` that maps each tensor to its shard.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The files of a checkpoint and its index, if it has one.
pub struct Checkpoint {
    /// The `.safetensors` files, sorted by name.
    pub files: Vec<PathBuf>,
    /// The index file and its `weight_map` (tensor name -> shard file name).
    pub index: Option<(PathBuf, BTreeMap<String, String>)>,
}

/// Finds the checkpoint at `path`.
pub fn find(path: &Path) -> Result<Checkpoint> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(Checkpoint {
            files: vec![path.to_path_buf()],
            index: None,
        });
    }
    let (mut files, mut indexes) = (Vec::new(), Vec::new());
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
    {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(p);
        } else if name.ends_with(".safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} holds no .safetensors file", path.display());
    }
    let index = match indexes.as_slice() {
        [] => None,
        [one] => Some((one.clone(), weight_map(one)?)),
        _ => bail!(
            "{} holds more than one *.safetensors.index.json",
            path.display()
        ),
    };
    Ok(Checkpoint { files, index })
}

/// The `weight_map` of an index file.
fn weight_map(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut file = rzc_core::open_regular(path)?; // "PATH: is a FIFO, not a regular file"
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{} has no \"weight_map\" object", path.display());
    };
    map.iter()
        .map(|(tensor, file)| match file.as_str() {
            Some(f) => Ok((tensor.clone(), f.to_owned())),
            None => bail!(
                "{}: the shard of {tensor:?} is not a string",
                path.display()
            ),
        })
        .collect()
}

/// Why `path` is not read, when it is not a regular file after symlinks
/// (a Hugging Face cache's shards are links to its blobs): "is a FIFO, not a
/// regular file", in the words of rzc-core's [`rzc_core::not_regular`].
/// Opening a FIFO for reading waits for a writer, forever when none comes,
/// so it must be refused before it is opened; this looks at the path first,
/// for the "invalid: NAME: ..." message, and the opens that follow
/// (rzc-core's [`rzc_core::open_regular`]) refuse one put there in between.
/// `None` for a regular file, or for one that cannot be looked at: opening
/// it says why.
pub fn not_regular(path: &Path) -> Option<String> {
    let what = rzc_core::not_regular(std::fs::metadata(path).ok()?.file_type())?;
    Some(format!("is {what}, not a regular file"))
}

/// A file's name for messages and the index (its last component).
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
