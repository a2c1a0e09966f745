//! `cargo xtask oci`: packages a guest ELF as an OCI image archive that
//! `ctr image import` (and so containerd, and Kubernetes through it) takes.
//!
//! The archive is an OCI image layout in a tar: `oci-layout`, `index.json`
//! and three blobs: one uncompressed layer holding the ELF at `/kernel`, the
//! image config, and the manifest. The config's Entrypoint is `/kernel` and
//! its Cmd the guest's command line, one word each, which the Exitless
//! containerd shim joins with spaces. Resources go into Env
//! (`EXITLESS_VCPUS`, `EXITLESS_MEMORY`, which reach the runtime spec and so
//! the shim) and into labels of the same meaning, for people and tools.
//!
//! Everything is deterministic (fixed times, sorted keys): the same ELF and
//! options give the same digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Where the ELF lives inside the image.
pub const KERNEL_PATH: &str = "/kernel";
/// Labels (and env names) the Exitless containerd shim reads.
pub const LABEL_VCPUS: &str = "io.exitless.vcpus";
pub const LABEL_MEMORY: &str = "io.exitless.memory";
const ENV_VCPUS: &str = "EXITLESS_VCPUS";
const ENV_MEMORY: &str = "EXITLESS_MEMORY";

/// What to put into the image.
#[derive(Debug, Clone)]
pub struct Options {
    pub elf: PathBuf,
    /// The full image reference, e.g. `docker.io/exitless/tcp-echo:latest`.
    pub reference: String,
    /// The guest's command line (split at spaces into Cmd).
    pub cmdline: String,
    pub vcpus: Option<u32>,
    /// Memory as the shim reads it: bytes or with a K/M/G suffix.
    pub memory: Option<String>,
    pub output: PathBuf,
}

#[derive(Debug, Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
struct ImageConfig {
    architecture: &'static str,
    os: &'static str,
    config: ExecConfig,
    rootfs: RootFs,
}

#[derive(Debug, Serialize)]
struct ExecConfig {
    #[serde(rename = "Entrypoint")]
    entrypoint: Vec<String>,
    #[serde(rename = "Cmd")]
    cmd: Vec<String>,
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Labels")]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Layout {
    #[serde(rename = "imageLayoutVersion")]
    version: &'static str,
}

/// `sha256:HEX` of `bytes`, as OCI descriptors name blobs.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in hash {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
    }
    format!("sha256:{hex}")
}

fn descriptor(media_type: &'static str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type,
        digest: digest(bytes),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    }
}

fn json(value: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::failed(format!("encoding JSON: {e}")))
}

/// A tar of `entries` (path, mode, bytes) with fixed owner and time.
fn tar(entries: &[(&str, u32, &[u8])]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, bytes) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, *bytes)
            .map_err(|e| Error::failed(format!("writing {path} into a tar: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| Error::failed(format!("finishing a tar: {e}")))
}

/// Checks `opts` and writes the archive; returns the manifest's digest.
pub fn write_image(opts: &Options) -> Result<String> {
    let elf = std::fs::read(&opts.elf)
        .map_err(|e| Error::failed(format!("reading the guest ELF {}: {e}", opts.elf.display())))?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(Error::usage(format!(
            "{} is not an ELF file: give a guest image built for x86_64-unknown-none",
            opts.elf.display()
        )));
    }
    if let Some(v) = opts.vcpus
        && !(1..=254).contains(&v)
    {
        return Err(Error::usage(format!("--vcpus {v}: from 1 to 254")));
    }
    if let Some(m) = &opts.memory {
        let digits = m.strip_suffix(['K', 'M', 'G', 'k', 'm', 'g']).unwrap_or(m);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::usage(format!(
                "--memory {m}: give bytes or a number with a K/M/G suffix, e.g. 64M"
            )));
        }
    }
    let mut labels = BTreeMap::new();
    let mut env = Vec::new();
    if let Some(v) = opts.vcpus {
        labels.insert(LABEL_VCPUS.to_owned(), v.to_string());
        env.push(format!("{ENV_VCPUS}={v}"));
    }
    if let Some(m) = &opts.memory {
        labels.insert(LABEL_MEMORY.to_owned(), m.clone());
        env.push(format!("{ENV_MEMORY}={m}"));
    }

    let layer = tar(&[(KERNEL_PATH.trim_start_matches('/'), 0o755, &elf)])?;
    let layer_desc = descriptor(MEDIA_LAYER, &layer);
    let config = json(&ImageConfig {
        architecture: "amd64",
        os: "linux",
        config: ExecConfig {
            entrypoint: vec![KERNEL_PATH.to_owned()],
            cmd: opts.cmdline.split_whitespace().map(str::to_owned).collect(),
            env,
            labels,
        },
        // The layer is stored uncompressed: its digest is its diff id.
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![layer_desc.digest.clone()],
        },
    })?;
    let config_desc = descriptor(MEDIA_CONFIG, &config);
    let manifest = json(&Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST,
        config: config_desc,
        layers: vec![layer_desc],
    })?;
    let mut manifest_desc = descriptor(MEDIA_MANIFEST, &manifest);
    let tag = opts
        .reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map_or("latest", |(_, t)| t);
    // containerd's importer names the image by the first annotation; OCI
    // tools by the second (the tag alone).
    manifest_desc
        .annotations
        .insert("io.containerd.image.name".into(), opts.reference.clone());
    manifest_desc
        .annotations
        .insert("org.opencontainers.image.ref.name".into(), tag.to_owned());
    let manifest_digest = manifest_desc.digest.clone();
    let index = json(&Index {
        schema_version: 2,
        media_type: MEDIA_INDEX,
        manifests: vec![manifest_desc],
    })?;

    let blob = |bytes: &[u8]| format!("blobs/sha256/{}", &digest(bytes)["sha256:".len()..]);
    let layout = json(&Layout { version: "1.0.0" })?;
    let (layer_path, config_path, manifest_path) = (blob(&layer), blob(&config), blob(&manifest));
    let archive = tar(&[
        ("oci-layout", 0o644, &layout),
        ("index.json", 0o644, &index),
        (&layer_path, 0o644, &layer),
        (&config_path, 0o644, &config),
        (&manifest_path, 0o644, &manifest),
    ])?;
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::failed(format!("creating {}: {e}", dir.display())))?;
    }
    std::fs::File::create(&opts.output)
        .and_then(|mut f| f.write_all(&archive))
        .map_err(|e| Error::failed(format!("writing {}: {e}", opts.output.display())))?;
    Ok(manifest_digest)
}

/// The reference an image named `name` gets by default.
#[must_use]
pub fn default_reference(name: &str) -> String {
    format!("docker.io/exitless/{name}:latest")
}

/// A name for an image made from the ELF at `path`: its file name.
#[must_use]
pub fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "guest".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_holds_a_layout_whose_digests_match() {
        let dir = std::env::temp_dir().join(format!("xtask-oci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("guest");
        std::fs::write(&elf, b"\x7fELF not really").unwrap();
        let opts = Options {
            elf: elf.clone(),
            reference: default_reference("guest"),
            cmdline: "ip=10.0.0.2/24  a=b".into(),
            vcpus: Some(2),
            memory: Some("64M".into()),
            output: dir.join("out.tar"),
        };
        let digest_a = write_image(&opts).unwrap();
        let mut files = BTreeMap::new();
        let bytes = std::fs::read(&opts.output).unwrap();
        for entry in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
            files.insert(path, content);
        }
        for (path, content) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(digest(content), format!("sha256:{hex}"), "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["digest"], digest_a);
        let manifest_blob = &files[&format!("blobs/sha256/{}", &digest_a[7..])];
        let manifest: serde_json::Value = serde_json::from_slice(manifest_blob).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{}", &config_digest[7..])])
                .unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/kernel");
        assert_eq!(
            config["config"]["Cmd"],
            serde_json::json!(["ip=10.0.0.2/24", "a=b"])
        );
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!(["EXITLESS_VCPUS=2", "EXITLESS_MEMORY=64M"])
        );
        assert_eq!(config["config"]["Labels"]["io.exitless.vcpus"], "2");
        // The same input gives the same image.
        assert_eq!(write_image(&opts).unwrap(), digest_a);
        let not_elf = Options {
            elf: dir.join("out.tar"),
            ..opts
        };
        assert!(matches!(write_image(&not_elf), Err(Error::Usage(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
