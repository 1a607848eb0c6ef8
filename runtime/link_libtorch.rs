//! Link libtorch so that the `losscc` binary runs with no environment variables set:
//! the libtorch directory goes into RUNPATH, and `--no-as-needed` keeps `libtorch_cuda`
//! linked even though no symbol of it is referenced directly, so a GPU is used when the
//! machine has one. torch-sys publishes the library directory as `DEP_TCH_LIBTORCH_LIB`.

use std::path::{Path, PathBuf};

/// The project environment's ONNX Runtime library (`onnxruntime/capi/libonnxruntime.so.*`).
fn find_onnxruntime() -> Option<PathBuf> {
    let venv = std::env::var_os("VIRTUAL_ENV")?;
    let lib = Path::new(&venv).join("lib");
    for python in std::fs::read_dir(&lib).ok()?.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("libonnxruntime.so.") {
                return Some(entry.path());
            }
        }
    }
    None
}

pub fn main() {
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    if let Some(ort) = find_onnxruntime() {
        println!("cargo:rustc-env=LOSSCC_ORT_DEFAULT={}", ort.display());
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; the binary will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
