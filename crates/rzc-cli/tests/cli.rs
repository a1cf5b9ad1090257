//! The `rzc` program as a user runs it, on checkpoints written by the
//! official safetensors crate (and one sealed by ray-zerocopy's packer).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rzc_core::pack::{PackOptions, Plan, TensorSpec};
use rzc_core::Dtype;
use safetensors::tensor::TensorView;

fn rzc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rzc"))
        .args(args)
        .output()
        .expect("run rzc")
}

/// `rzc(args)`, but killed, failing the test, if it has not exited within
/// 10 s: what would block forever (opening a FIFO for reading) fails
/// instead of hanging the test run.
fn rzc_within(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rzc"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rzc");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("rzc {args:?} was still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes a file of `names` (F32 tensors of shape [2, 3]) with the official
/// writer.
fn write(path: &Path, names: &[&str]) {
    let data: Vec<u8> = (0..24u8).collect();
    let views: Vec<(&str, TensorView<'_>)> = names
        .iter()
        .map(|&n| {
            (
                n,
                TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data).unwrap(),
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn index(dir: &Path, map: &[(&str, &str)]) {
    let entries: Vec<String> = map.iter().map(|(t, f)| format!("{t:?}: {f:?}")).collect();
    let json = format!(
        "{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}",
        entries.join(", ")
    );
    std::fs::write(dir.join("model.safetensors.index.json"), json).unwrap();
}

fn sharded(dir: &Path) {
    write(
        &dir.join("model-00001-of-00002.safetensors"),
        &["a.weight", "a.bias"],
    );
    write(&dir.join("model-00002-of-00002.safetensors"), &["b.weight"]);
}

#[test]
fn inspect_lists_tensors_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.safetensors");
    write(&f, &["encoder.weight", "encoder.bias"]);
    let o = rzc(&["inspect", f.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("2 tensors, 48 bytes of tensor data"), "{out}");
    assert!(
        out.contains("encoder.weight") && out.contains("F32") && out.contains("[2, 3]"),
        "{out}"
    );
    assert!(out.contains("metadata format = pt"), "{out}");
}

#[test]
fn inspect_json_describes_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let o = rzc(&["inspect", "--json", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["file"], "model-00001-of-00002.safetensors");
    let names: Vec<&str> = files[0]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"a.weight") && names.contains(&"a.bias"));
    assert_eq!(files[1]["tensors"][0]["shape"], serde_json::json!([2, 3]));
    assert_eq!(files[1]["tensors"][0]["nbytes"], 24);
}

#[test]
fn verify_accepts_a_valid_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    index(
        dir.path(),
        &[
            ("a.weight", "model-00001-of-00002.safetensors"),
            ("a.bias", "model-00001-of-00002.safetensors"),
            ("b.weight", "model-00002-of-00002.safetensors"),
        ],
    );
    let o = rzc(&["verify", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("valid: 2 file(s), 3 tensors"));
}

#[test]
fn verify_names_a_corrupt_header() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.safetensors");
    write(&f, &["w"]);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.truncate(bytes.len() - 4); // the last tensor now runs past the end
    std::fs::write(&f, &bytes).unwrap();
    let o = rzc(&["verify", f.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("invalid: m.safetensors:") && out.contains("\"w\""),
        "{out}"
    );
}

#[test]
fn verify_checks_the_index_against_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    index(
        dir.path(),
        &[
            ("a.weight", "model-00002-of-00002.safetensors"),
            ("b.weight", "model-00003-of-00003.safetensors"),
        ],
    );
    let o = rzc(&["verify", dir.path().to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "\"a.weight\" is mapped to model-00002-of-00002.safetensors, but it is in model-00001"
        ),
        "{out}"
    );
    assert!(
        out.contains("model-00003-of-00003.safetensors, which is not in the directory"),
        "{out}"
    );
    assert!(
        out.contains("\"a.bias\" of model-00001-of-00002.safetensors is not listed"),
        "{out}"
    );
}

#[test]
fn verify_finds_a_tensor_in_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("one.safetensors"), &["x", "y"]);
    write(&dir.path().join("two.safetensors"), &["y"]);
    let o = rzc(&["verify", dir.path().to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("tensor \"y\" is in both one.safetensors and two.safetensors"),
        "{out}"
    );
}

/// A buffer sealed by the packer: its header claims the digest of its data.
fn sealed() -> Vec<u8> {
    let shape = [4i64, 4];
    let specs = [TensorSpec {
        name: "w",
        dtype: Dtype::F32,
        shape: &shape,
    }];
    let opts = PackOptions {
        reserve_digest: true,
        ..PackOptions::default()
    };
    let plan = Plan::new(&specs, &BTreeMap::new(), &opts).unwrap();
    let mut buf = vec![0u8; plan.total_size()];
    let data: Vec<u8> = (0..64u8).collect();
    plan.write(&mut buf, &[&data]).unwrap();
    rzc_core::digest::seal(&mut buf).unwrap();
    buf
}

#[test]
fn verify_checks_the_digest_a_sealed_buffer_claims() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sealed.safetensors");
    let mut buf = sealed();
    std::fs::write(&f, &buf).unwrap();
    let o = rzc(&["verify", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let last = buf.len() - 1;
    buf[last] ^= 1; // one bit of the data, after sealing
    std::fs::write(&f, &buf).unwrap();
    let o = rzc(&["verify", f.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("does not match the digest its header claims"),
        "{out}"
    );
}

#[test]
fn a_missing_path_and_a_bad_command_are_errors() {
    let o = rzc(&["verify", "/nonexistent/model.safetensors"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("cannot read /nonexistent/model.safetensors"),
        "{}",
        text(&o)
    );
    let dir = tempfile::tempdir().unwrap();
    let o = rzc(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("holds no .safetensors file"),
        "{}",
        text(&o)
    );
    let o = rzc(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2), "usage errors exit with 2");
}

#[test]
fn a_fifo_named_like_a_shard_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let fifo = dir.path().join("model-00003-of-00003.safetensors");
    mkfifo(&fifo);
    let refused = "model-00003-of-00003.safetensors: is a FIFO, not a regular file";
    for path in [dir.path(), fifo.as_path()] {
        let o = rzc_within(&["verify", path.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(out.contains(&format!("invalid: {refused}")), "{out}");
        let o = rzc_within(&["inspect", path.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains(&format!("rzc: {}: is a FIFO", fifo.display())),
            "{out}"
        );
    }
    std::fs::remove_file(&fifo).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    mkfifo(&index);
    let o = rzc_within(&["verify", dir.path().to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("rzc: {}: is a FIFO", index.display())),
        "{out}"
    );
    // A shard that is a symlink, as in a Hugging Face cache, is read.
    std::fs::remove_file(&index).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(dir.path().join("model-00002-of-00002.safetensors"), &link).unwrap();
    let o = rzc_within(&["verify", link.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
