//! What a PATH names: one file, or a checkpoint directory of shards with an
//! optional `*.safetensors.index.json` that maps each tensor to its shard.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
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
    if let Some(why) = not_regular(path) {
        bail!("{}: {why}", path.display());
    }
    let mut file = open_regular(path)?;
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

/// `path` opened for reading without waiting, and checked again as opened:
/// a FIFO put there after a look at the path is refused, not waited on.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        bail!("{}: is not a regular file", path.display());
    }
    Ok(file)
}

/// Why `path` is not read, when it is not a regular file after symlinks
/// (a Hugging Face cache's shards are links to its blobs): "is a FIFO, not a
/// regular file". Opening a FIFO for reading waits for a writer, forever when
/// none comes, so it must be refused before it is opened. This looks at the
/// path first, for the message; the opens that follow (rzc-core's, and the
/// index's here: `O_NONBLOCK`, then a check of the open descriptor) refuse
/// one put there in between. `None`
/// for a regular file, or for one that cannot be looked at: opening it says
/// why.
pub fn not_regular(path: &Path) -> Option<String> {
    let kind = std::fs::metadata(path).ok()?.file_type();
    let what = if kind.is_file() {
        return None;
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    Some(format!("is {what}, not a regular file"))
}

/// A file's name for messages and the index (its last component).
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a look at the path cannot stop: a FIFO there when it is opened
    /// is refused at once, not waited on.
    #[test]
    fn a_fifo_is_refused_as_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors.index.json");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(open_regular(&fifo).map(|_| ()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO returned within 10 s");
        assert!(format!("{:#}", got.unwrap_err()).contains("is not a regular file"));
        let file = dir.path().join("index.json");
        std::fs::write(&file, "{}").unwrap();
        assert!(open_regular(&file).is_ok());
    }
}
