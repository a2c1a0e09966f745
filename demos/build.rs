//! Demo images are guest images: linked with the guest kernel's `link.ld`.
fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-kernel/link.ld");
    println!("cargo:rerun-if-changed={script}");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
