//! With the `cuda` feature, compiles `kernels/*.cu` to PTX (embedded by `src/kernels/mod.rs`).
//! Without it, does nothing: the CPU build needs no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "cuda")]
    cuda_ptx();
}

#[cfg(feature = "cuda")]
fn cuda_ptx() {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = cudaforge::KernelBuilder::new()
        .source_dir("kernels")
        // No multiply-add contraction: the kernels round like their CPU twins.
        .arg("-fmad=false")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()
        .unwrap_or_else(|e| panic!("compiling kernels/*.cu to PTX failed: {e}"));
    ptx.write(out_dir.join("ptx.rs")).unwrap_or_else(|e| panic!("writing ptx.rs failed: {e}"));
}
