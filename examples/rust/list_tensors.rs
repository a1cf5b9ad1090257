//! Lists the tensors of a safetensors file with the Rust core.
//! Run: `cargo run -p rzc-core --example list_tensors -- FILE.safetensors`

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: list_tensors FILE.safetensors");
        std::process::exit(2);
    };
    let w = match rzc_core::Weights::open_file(std::path::Path::new(&path)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!("{} tensors, metadata {:?}", w.len(), w.metadata());
    for t in w.tensors() {
        println!(
            "  {} {} {:?} at byte {}",
            t.name, t.dtype, t.shape, t.offset
        );
    }
}
