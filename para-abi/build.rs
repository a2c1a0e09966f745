//! Declares the `loom` cfg so `cfg(loom)` model-checking code passes check-cfg.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rerun-if-changed=build.rs");
}
