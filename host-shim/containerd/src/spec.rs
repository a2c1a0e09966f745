//! What a task's OCI runtime spec (the bundle's `config.json`) asks of its
//! guest: which ELF to boot, its command line, its vCPUs and memory.
//!
//! The spec comes from whoever created the container, so every field is
//! checked here and refused with an error that names the field and the fix.
//!
//! Where the resources come from, first match wins:
//! 1. the annotations `io.exitless.vcpus` and `io.exitless.memory`;
//! 2. `linux.resources.cpu` (quota / period rounded up, else the number of
//!    CPUs in `cpus`) and `linux.resources.memory.limit` (rounded up to MiB);
//! 3. the process environment `EXITLESS_VCPUS` and `EXITLESS_MEMORY`, which
//!    `cargo xtask oci` writes into the image config, so an image carries its
//!    own defaults;
//! 4. 1 vCPU and 256 MiB, the host shim's own defaults.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use thiserror::Error;

/// Annotation naming the guest's vCPU count.
pub const ANNOTATION_VCPUS: &str = "io.exitless.vcpus";
/// Annotation naming the guest's memory: bytes, or with a K/M/G suffix.
pub const ANNOTATION_MEMORY: &str = "io.exitless.memory";
/// Environment variable (from the image config) with the default vCPU count.
pub const ENV_VCPUS: &str = "EXITLESS_VCPUS";
/// Environment variable (from the image config) with the default memory.
pub const ENV_MEMORY: &str = "EXITLESS_MEMORY";

/// The host shim's limits (see `host-shim --help`, `--guest`).
pub const MAX_VCPUS: u32 = 254;
/// RAM must end below the para region at 0xA000_0000.
pub const MAX_MEMORY_MIB: u64 = 2560;
/// Below this a guest cannot hold its own page tables and rings.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Longer command lines than this are certainly a mistake.
pub const MAX_CMDLINE: usize = 2048;

const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 256;

/// A refusal of the runtime spec, naming what to fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "the spec has no process.args: the image needs an Entrypoint naming the guest ELF (e.g. /kernel)"
    )]
    NoArgs,
    #[error(
        "process.args[0] {0:?} must be an absolute path inside the image without `..` (the guest ELF, e.g. /kernel; `ctr run IMAGE ID ARGS...` replaces the Entrypoint too, so start ARGS with /kernel)"
    )]
    BadKernelPath(String),
    #[error(
        "process.args[{index}] {arg:?}: guest command-line words may not be empty or contain whitespace or control characters"
    )]
    BadArg { index: usize, arg: String },
    #[error("the guest command line is {0} bytes; at most {MAX_CMDLINE}")]
    CmdlineTooLong(usize),
    #[error("process.terminal is true: guests have a serial console, not a TTY; run without -t")]
    Terminal,
    #[error("{source_name} = {value:?}: {why}")]
    BadResource {
        source_name: String,
        value: String,
        why: String,
    },
}

/// The annotation the Kubernetes CRI (containerd's and CRI-O's names) puts
/// on every container it creates, saying whether it is the pod's sandbox.
const CRI_CONTAINER_TYPE: [&str; 2] = [
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];

/// Whether `spec` is a Kubernetes pod sandbox (the "pause" container), which
/// this runtime holds without running anything.
#[must_use]
pub fn is_sandbox(spec: &Spec) -> bool {
    spec.annotations().as_ref().is_some_and(|a| {
        CRI_CONTAINER_TYPE
            .iter()
            .any(|k| a.get(*k).is_some_and(|v| v == "sandbox"))
    })
}

/// The guest one task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Absolute path of the ELF inside the container's root filesystem.
    pub kernel: PathBuf,
    /// The guest's command line: process.args after the first, joined by spaces.
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl GuestSpec {
    /// Reads and checks the guest's side of `spec`.
    pub fn from_oci(spec: &Spec) -> Result<Self, SpecError> {
        let process = spec.process().as_ref();
        if process.and_then(oci_spec::runtime::Process::terminal) == Some(true) {
            return Err(SpecError::Terminal);
        }
        let args: &[String] = process
            .and_then(|p| p.args().as_deref())
            .unwrap_or_default();
        let (kernel, words) = args.split_first().ok_or(SpecError::NoArgs)?;
        let kernel = kernel_path(kernel)?;
        for (i, arg) in words.iter().enumerate() {
            if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(SpecError::BadArg {
                    index: i + 1,
                    arg: arg.clone(),
                });
            }
        }
        let cmdline = words.join(" ");
        if cmdline.len() > MAX_CMDLINE {
            return Err(SpecError::CmdlineTooLong(cmdline.len()));
        }

        let annotations = spec.annotations().as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let env: &[String] = process.and_then(|p| p.env().as_deref()).unwrap_or_default();
        let env_var = |key: &str| {
            env.iter()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());

        let vcpus = if let Some(v) = annotation(ANNOTATION_VCPUS) {
            parse_vcpus(ANNOTATION_VCPUS, v)?
        } else if let Some(v) = resources
            .and_then(|r| r.cpu().as_ref())
            .map(cpu_count)
            .transpose()?
            .flatten()
        {
            v
        } else if let Some(v) = env_var(ENV_VCPUS) {
            parse_vcpus(ENV_VCPUS, v)?
        } else {
            DEFAULT_VCPUS
        };

        let memory_mib = if let Some(v) = annotation(ANNOTATION_MEMORY) {
            check_memory(ANNOTATION_MEMORY, v, parse_size(v))?
        } else if let Some(limit) = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(oci_spec::runtime::LinuxMemory::limit)
            .filter(|l| *l > 0)
        {
            let s = limit.to_string();
            check_memory(
                "linux.resources.memory.limit",
                &s,
                u64::try_from(limit).ok(),
            )?
        } else if let Some(v) = env_var(ENV_MEMORY) {
            check_memory(ENV_MEMORY, v, parse_size(v))?
        } else {
            DEFAULT_MEMORY_MIB
        };

        Ok(Self {
            kernel,
            cmdline,
            vcpus,
            memory_mib,
        })
    }
}

/// `/kernel` → `kernel`: a path relative to the root filesystem that cannot
/// climb out of it by its words (symbolic links are checked when opened).
fn kernel_path(arg: &str) -> Result<PathBuf, SpecError> {
    let bad = || SpecError::BadKernelPath(arg.to_owned());
    let path = Path::new(arg);
    if !path.is_absolute() || arg.contains(',') || arg.chars().any(char::is_control) {
        return Err(bad());
    }
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(Path::new("/").join(rel))
}

fn parse_vcpus(source_name: &str, value: &str) -> Result<u32, SpecError> {
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(SpecError::BadResource {
            source_name: source_name.to_owned(),
            value: value.to_owned(),
            why: format!("a vCPU count must be a whole number from 1 to {MAX_VCPUS}"),
        }),
    }
}

/// vCPUs from `linux.resources.cpu`: quota / period rounded up (what
/// `ctr run --cpus` and Kubernetes CPU limits set), else the size of the
/// `cpus` set. `None` when neither says anything.
fn cpu_count(cpu: &oci_spec::runtime::LinuxCpu) -> Result<Option<u32>, SpecError> {
    if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period())
        && quota > 0
        && period > 0
    {
        let quota = quota.unsigned_abs();
        let n = quota.div_ceil(period);
        return u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_VCPUS)
            .map(Some)
            .ok_or_else(|| SpecError::BadResource {
                source_name: "linux.resources.cpu quota/period".into(),
                value: format!("{quota}/{period}"),
                why: format!("asks for {n} vCPUs; at most {MAX_VCPUS}"),
            });
    }
    match cpu.cpus().as_deref() {
        Some(set) if !set.trim().is_empty() => cpuset_size(set)
            .filter(|n| (1..=MAX_VCPUS).contains(n))
            .map(Some)
            .ok_or_else(|| SpecError::BadResource {
                source_name: "linux.resources.cpu.cpus".into(),
                value: set.to_owned(),
                why: format!("must be a CPU list like 0-3,6 of 1 to {MAX_VCPUS} CPUs"),
            }),
        _ => Ok(None),
    }
}

/// The number of CPUs in a Linux CPU list (`0-3,6`); `None` when malformed.
fn cpuset_size(set: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in set.trim().split(',') {
        let part = part.trim();
        let count = if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
            b.checked_sub(a)?.checked_add(1)?
        } else {
            part.parse::<u32>().ok()?;
            1
        };
        n = n.checked_add(count)?;
    }
    Some(n)
}

/// Bytes, or a number with a K, M or G suffix (powers of 1024, as the host
/// shim reads `mem=`), in bytes.
fn parse_size(value: &str) -> Option<u64> {
    let v = value.trim();
    let (digits, unit) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// Bytes rounded up to whole MiB, within the host shim's range.
fn check_memory(source_name: &str, value: &str, bytes: Option<u64>) -> Result<u64, SpecError> {
    let mib = bytes.map(|b| b.div_ceil(1 << 20));
    match mib {
        Some(m) if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) => Ok(m),
        _ => Err(SpecError::BadResource {
            source_name: source_name.to_owned(),
            value: value.to_owned(),
            why: format!(
                "guest memory must be {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB (bytes, or with a K/M/G suffix)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `json` with the `process.user` every valid spec carries.
    fn spec(json: &str) -> Spec {
        let json = json.replace(r#""process":{"#, r#""process":{"user":{"uid":0,"gid":0},"#);
        serde_json::from_str(&json).unwrap()
    }

    fn guest(json: &str) -> Result<GuestSpec, SpecError> {
        GuestSpec::from_oci(&spec(json))
    }

    #[test]
    fn args_become_kernel_and_cmdline_with_defaults() {
        let g = guest(r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/kernel","ip=10.0.0.2/24","app.idle_s=1"]}}"#).unwrap();
        assert_eq!(g.kernel, PathBuf::from("/kernel"));
        assert_eq!(g.cmdline, "ip=10.0.0.2/24 app.idle_s=1");
        assert_eq!((g.vcpus, g.memory_mib), (1, 256));
    }

    #[test]
    fn annotations_beat_resources_beat_image_env() {
        let base = r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/kernel"],"env":["EXITLESS_VCPUS=3","EXITLESS_MEMORY=64M"]}"#;
        let g = guest(&format!("{base}}}")).unwrap();
        assert_eq!((g.vcpus, g.memory_mib), (3, 64));
        let res = r#","linux":{"resources":{"cpu":{"quota":150000,"period":100000},"memory":{"limit":134217729}}}"#;
        let g = guest(&format!("{base}{res}}}")).unwrap();
        assert_eq!((g.vcpus, g.memory_mib), (2, 129));
        let ann = r#","annotations":{"io.exitless.vcpus":"4","io.exitless.memory":"1G"}"#;
        let g = guest(&format!("{base}{res}{ann}}}")).unwrap();
        assert_eq!((g.vcpus, g.memory_mib), (4, 1024));
    }

    #[test]
    fn pod_sandboxes_are_told_apart_by_the_cri_annotation() {
        let j = |v: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["/pause"]}},"annotations":{{"io.kubernetes.cri.container-type":"{v}"}}}}"#
            )
        };
        assert!(is_sandbox(&spec(&j("sandbox"))));
        assert!(!is_sandbox(&spec(&j("container"))));
        assert!(!is_sandbox(&spec(r#"{"ociVersion":"1.0.2"}"#)));
    }

    #[test]
    fn a_cpu_set_counts_its_cpus() {
        let g = guest(r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/k"]},"linux":{"resources":{"cpu":{"cpus":"0-2,5"}}}}"#).unwrap();
        assert_eq!(g.vcpus, 4);
        assert_eq!(cpuset_size("3-1"), None);
        assert_eq!(cpuset_size("a"), None);
    }

    #[test]
    fn hostile_specs_are_refused_by_name() {
        assert_eq!(guest(r#"{"ociVersion":"1.0.2"}"#), Err(SpecError::NoArgs));
        for k in ["kernel", "/../etc/passwd", "/a/../../b", "/", "/a,b"] {
            let j = format!(r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["{k}"]}}}}"#);
            assert_eq!(guest(&j), Err(SpecError::BadKernelPath(k.into())), "{k}");
        }
        let j = r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/k","a b"]}}"#;
        assert!(matches!(guest(j), Err(SpecError::BadArg { index: 1, .. })));
        let j = r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/k","a\nb"]}}"#;
        assert!(matches!(guest(j), Err(SpecError::BadArg { index: 1, .. })));
        let j = r#"{"ociVersion":"1.0.2","process":{"terminal":true,"cwd":"/","args":["/k"]}}"#;
        assert_eq!(guest(j), Err(SpecError::Terminal));
        let long = "x".repeat(MAX_CMDLINE + 1);
        let j =
            format!(r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["/k","{long}"]}}}}"#);
        assert_eq!(guest(&j), Err(SpecError::CmdlineTooLong(MAX_CMDLINE + 1)));
        for (k, v) in [
            ("io.exitless.vcpus", "0"),
            ("io.exitless.vcpus", "255"),
            ("io.exitless.vcpus", "two"),
            ("io.exitless.memory", "3G"),
            ("io.exitless.memory", "1K"),
            ("io.exitless.memory", "99999999999999999999G"),
        ] {
            let j = format!(
                r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["/k"]}},"annotations":{{"{k}":"{v}"}}}}"#
            );
            assert!(
                matches!(guest(&j), Err(SpecError::BadResource { ref source_name, .. }) if source_name == k),
                "{k}={v}"
            );
        }
        let j = r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/k"]},"linux":{"resources":{"cpu":{"quota":100000000,"period":1000}}}}"#;
        assert!(matches!(guest(j), Err(SpecError::BadResource { .. })));
    }
}
