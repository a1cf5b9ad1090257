//! `rzc`: looks into safetensors checkpoints with the same validator every
//! ray-zerocopy load runs.
//!
//! - `rzc inspect PATH`: tensors (name, dtype, shape, size, offset) and
//!   metadata of a file, or of every shard of a checkpoint directory.
//! - `rzc verify PATH`: full validation of an untrusted checkpoint: every
//!   header, the shard index against the shards, and the data digest a
//!   sealed buffer claims. Exit status 0 when valid, 1 when not (each problem
//!   is printed), 2 for a usage error.
//!
//! Error plumbing is `anyhow`: this is a program, whose errors end in a
//! message for a person; the libraries keep typed errors with C status codes.

mod checkpoint;
mod inspect;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rzc",
    version,
    about = "Inspect and verify safetensors checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors and metadata of a .safetensors file or of every shard
    /// of a checkpoint directory.
    Inspect {
        /// A .safetensors file or a directory of them.
        path: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate an untrusted checkpoint completely; exit status 0 when it is
    /// valid, 1 when it is not.
    Verify {
        /// A .safetensors file or a directory of them.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Inspect { path, json } => inspect::run(&path, json).map(|()| true),
        Command::Verify { path } => verify::run(&path),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rzc: {e:#}");
            ExitCode::from(1)
        }
    }
}
