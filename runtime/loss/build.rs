//! Build script of the loss library: links libtorch as every libtorch-linked package of the
//! workspace does (`../link_libtorch.rs`), and compiles the library's one C++ part, the
//! autograd function that hands the fused kernel's gradient to libtorch
//! (`cpp/linearized.cpp`), against the headers of the same libtorch.

#[path = "../link_libtorch.rs"]
mod link_libtorch;

use std::path::Path;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=cpp/linearized.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys publishes DEP_TCH_LIBTORCH_LIB; build with LIBTORCH_USE_PYTORCH=1 as the Makefile does");
    let root = Path::new(&lib).parent().expect("libtorch's library folder has a parent");
    // PyTorch's wheels since 2.7 (2.11 is pinned) use the C++11 ABI, as torch-sys assumes too.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("cpp/linearized.cpp")
        .compile("losscc_linearized");
}
