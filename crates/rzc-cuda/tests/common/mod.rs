//! What the device layer's tests share: running a test's body in a child
//! process with the stand-in driver's settings, the stand-in's resource log,
//! and sample weights.
//!
//! The stand-in (`tests/fakecuda`, built by `make fakecuda`) reads its
//! settings once, when it is loaded, so each case runs in a child: the test
//! binary itself, re-run with `--exact` on the same test and the case's
//! environment. The child's body makes the assertions; the parent checks
//! that the child ran that one test, passed, and left no driver resource
//! behind (the log's `leaks` at exit).
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use rzc_core::Weights;

/// The environment variable that tells a child which test it runs.
const CHILD: &str = "RZC_CUDA_TEST_CHILD";

/// Whether this process is the child running test `name`.
pub fn is_child(name: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == name)
}

/// A child process running test `name` with `env` and a fresh driver log.
pub struct Case {
    pub log: PathBuf,
    command: Command,
    name: String,
}

impl Case {
    pub fn new(name: &str, env: &[(&str, &str)]) -> Case {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "rzc-cuda-test-{}-{name}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args([name, "--exact", "--include-ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD, name)
            .env("FAKECUDA_LOG", &log);
        for (k, v) in env {
            command.env(k, v);
        }
        Case {
            log,
            command,
            name: name.to_owned(),
        }
    }

    /// Sets one more variable of the child's environment.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Case {
        self.command.env(key, value);
        self
    }

    /// Removes a variable from the child's environment.
    pub fn env_remove(mut self, key: &str) -> Case {
        self.command.env_remove(key);
        self
    }

    /// Runs the child to the end; panics unless it ran the test and passed.
    pub fn run(mut self) -> Done {
        let out = self.command.output().expect("the test binary runs");
        Done::check(self.name, self.log, out)
    }

    /// Starts the child with its stdin and stdout piped, and waits until it
    /// prints `line` at the end of a line.
    pub fn start_until(mut self, line: &str) -> Running {
        let mut child = self
            .command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test binary starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut seen = String::new();
        loop {
            let mut l = String::new();
            if stdout.read_line(&mut l).expect("the child's output") == 0 {
                let _ = child.wait();
                panic!(
                    "child {} ended before printing {line:?}:\n{seen}",
                    self.name
                );
            }
            seen.push_str(&l);
            // libtest may print "test NAME ... " before the body's output.
            if l.trim_end().ends_with(line) {
                break;
            }
        }
        Running {
            child,
            stdout,
            seen,
            name: self.name,
            log: self.log,
        }
    }
}

/// A child started by [`Case::start_until`].
pub struct Running {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    seen: String,
    name: String,
    log: PathBuf,
}

impl Running {
    /// Closes the child's stdin (its cue to finish) and waits for it.
    pub fn finish(mut self) -> Done {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        let mut out = self.child.wait_with_output().expect("the child ends");
        out.stdout = format!("{}{rest}", self.seen).into_bytes();
        Done::check(self.name, self.log, out)
    }
}

/// In a child: waits until the parent closes stdin, after saying `line`.
pub fn say_and_wait(line: &str) {
    use std::io::Write;
    println!("{line}");
    std::io::stdout().flush().expect("stdout");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
}

/// A child that passed, and what its driver log says.
pub struct Done {
    pub stdout: String,
    pub log: String,
}

impl Done {
    fn check(name: String, log: PathBuf, out: Output) -> Done {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed"),
            "child {name} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        Done { stdout, log: text }
    }

    /// The log's lines with `"op": "<op>"`.
    pub fn count(&self, op: &str) -> usize {
        let needle = format!("\"op\": \"{op}\"");
        self.log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Panics unless the child's driver wrote its exit line with no leak.
    pub fn clean(self) -> Done {
        let exit = self
            .log
            .lines()
            .find(|l| l.contains("\"op\": \"exit\""))
            .unwrap_or_else(|| panic!("no exit line in the driver log:\n{}", self.log));
        assert!(
            exit.contains("\"leaks\": 0,"),
            "the child still held driver resources at exit: {exit}"
        );
        self
    }
}

/// In a child: panics unless the driver this process loaded is the stand-in.
pub fn require_standin() {
    assert!(
        rzc_cuda::library_present(),
        "no CUDA driver could be loaded: build the stand-in (make fakecuda) and put build/fakecuda on LD_LIBRARY_PATH"
    );
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    assert!(
        maps.lines()
            .any(|l| l.contains("libcuda.so") && l.contains("fakecuda")),
        "the CUDA driver loaded is not the stand-in (tests/fakecuda): these tests inject faults and must not run on a real GPU"
    );
}

/// A safetensors buffer of `tensors` float32 tensors of `size * (i + 1)`
/// elements each, with values that tell them apart.
pub fn sample(tensors: usize, size: usize) -> Weights {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for i in 0..tensors {
        let n = size * (i + 1);
        let start = data.len();
        for k in 0..n {
            data.extend_from_slice(&((k * (i + 1)) as f32 + i as f32 / 8.0).to_le_bytes());
        }
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"w{i}\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    Weights::from_vec(bytes).expect("a valid buffer")
}

/// Whether every tensor of `dev` reads back as `w`'s bytes.
pub fn equal(w: &Weights, dev: &rzc_cuda::DeviceWeights) -> bool {
    (0..w.len()).all(|i| {
        let want = w.data(i).expect("tensor");
        let mut got = vec![0u8; want.len()];
        dev.read(i, &mut got).expect("read back");
        got == want
    })
}

/// Upload options with `staging` and `chunk` bytes per chunk.
pub fn options(staging: rzc_cuda::Staging, chunk: usize) -> rzc_cuda::UploadOptions {
    rzc_cuda::UploadOptions {
        staging,
        chunk_bytes: chunk,
        ..Default::default()
    }
}

/// Runs `body` if this process is the child running test `name` (after
/// checking that the driver is the stand-in), and returns `None`; else runs
/// that child with `env` and returns what it did.
pub fn child(name: &str, env: &[(&str, &str)], body: impl FnOnce()) -> Option<Done> {
    if is_child(name) {
        require_standin();
        body();
        return None;
    }
    Some(Case::new(name, env).run())
}

/// The value of the case variable a parent passed to its child.
pub fn case_param() -> String {
    std::env::var("RZC_CUDA_CASE").expect("RZC_CUDA_CASE is set by the parent")
}

/// The versioned DLPack flags of tensor `index` (the tensor is released).
pub fn dlpack_flags(dev: &rzc_cuda::DeviceWeights, index: usize) -> u64 {
    let t = dev.to_dlpack(index).expect("a DLPack tensor");
    // SAFETY: `to_dlpack` returns a live tensor, ours to read and to release
    // once through its own deleter.
    unsafe {
        let flags = (*t).flags;
        if let Some(deleter) = (*t).deleter {
            deleter(t);
        }
        flags
    }
}
