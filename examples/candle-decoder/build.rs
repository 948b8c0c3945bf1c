//! Links against stub CUDA libraries when told where they are.
//!
//! candle makes cudarc link libcuda, libnvrtc, libcurand, libcublas and libcublasLt. A machine
//! with the CUDA toolkit has them and needs nothing from here; `cargo xtask gpu-bundle` builds on
//! machines without, generating stubs (same sonames, empty functions) and naming their folder in
//! `CANDLE_DECODER_LINK_STUBS`. The real libraries are loaded at run time.

fn main() {
    println!("cargo:rerun-if-env-changed=CANDLE_DECODER_LINK_STUBS");
    if let Some(dir) = std::env::var_os("CANDLE_DECODER_LINK_STUBS") {
        println!("cargo:rustc-link-search=native={}", std::path::Path::new(&dir).display());
    }
}
