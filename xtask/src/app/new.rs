//! `cargo xtask new NAME [--dir DIR]`: a new unikernel app crate that builds
//! for the guest target and runs under the host shim and QEMU as it is: it
//! says hello and serves TCP echo on port 7.
//!
//! The crate depends on this checkout's `guest-kernel` by absolute path and
//! links with its link script, so it works wherever the folder lives.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::infra::build::GUEST_IMAGES;
use crate::infra::workspace;

/// The template's files: (path inside the new crate, text with `{{name}}`
/// and `{{exitless}}` placeholders).
const FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../template/Cargo.toml.in")),
    ("build.rs", include_str!("../../template/build.rs.in")),
    (
        ".cargo/config.toml",
        include_str!("../../template/cargo/config.toml.in"),
    ),
    ("src/main.rs", include_str!("../../template/src/main.rs.in")),
];

/// Why `name` cannot name an app, if it cannot: a cargo package and binary
/// name, and not one of this repository's images (their ELFs share a
/// target directory when `cargo xtask run --app` builds).
fn check_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.is_empty() || !ok_chars || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(Error::usage(format!(
            "`{name}` is not an app name: use lowercase letters, digits, `-` and `_`, starting with a letter"
        )));
    }
    if GUEST_IMAGES.iter().any(|i| i.bin == name) {
        return Err(Error::usage(format!(
            "`{name}` is the name of one of this repository's guest images: pick another"
        )));
    }
    Ok(())
}

/// The template's `text` for app `name`.
fn fill(text: &str, name: &str, exitless: &Path) -> String {
    text.replace("{{name}}", name)
        .replace("{{exitless}}", &exitless.display().to_string())
}

/// Creates app `name` in `dir` (its parent folder); returns its path.
pub fn create(name: &str, dir: &Path) -> Result<PathBuf> {
    check_name(name)?;
    let root = dir.join(name);
    if root.exists() {
        return Err(Error::usage(format!(
            "{} already exists: pick another name or --dir",
            root.display()
        )));
    }
    let exitless = workspace::root();
    for (path, text) in FILES {
        let file = root.join(path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", parent.display())))?;
        }
        fs::write(&file, fill(text, name, &exitless))
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", file.display())))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("hello-app").is_ok());
        assert!(check_name("a1_b").is_ok());
        for bad in ["", "Hello", "1app", "a b", "a/b", "ktest", "udp-pingpong"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_template_is_filled_and_written() {
        let dir = std::env::temp_dir().join(format!("xtask-new-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = create("hello-app", &dir).unwrap();
        let cargo = fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"hello-app\""), "{cargo}");
        let kernel = workspace::root().join("guest-kernel");
        assert!(cargo.contains(&kernel.display().to_string()), "{cargo}");
        let main = fs::read_to_string(root.join("src/main.rs")).unwrap();
        assert!(main.contains("hello from hello-app") && !main.contains("{{"));
        assert!(root.join(".cargo/config.toml").is_file() && root.join("build.rs").is_file());
        assert!(
            create("hello-app", &dir).is_err(),
            "an existing folder is kept"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
