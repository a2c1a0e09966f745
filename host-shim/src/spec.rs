//! One guest as a user describes it: the keys of `--guest`, of a
//! `[[guest]]` table in `--config` and of the API's `PUT /guests/{name}`
//! body, checked by one function so the three cannot drift apart.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::kvm::memory;
use crate::vm::{GuestConfig, MAX_VCPUS};

/// The guest keys, as every error about an unknown key lists them.
pub const KEYS: &str = "name, kernel, vcpus, mem, cmdline";

/// A guest's description before it is checked. Every key but `kernel` is
/// optional; unknown keys are refused (by serde, naming the key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// At most 24 bytes of `[A-Za-z0-9_-]`; unset: named by position (`g0`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A PVH ELF image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// 1..=254; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// A size such as `256M` (K/M/G suffixes); default 256M.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// The guest's kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Checks a guest name: what the VM-queue directory and the logs can hold.
///
/// # Errors
/// A name that is empty, has other characters than `[A-Za-z0-9_-]`, or is
/// longer than the VM-queue directory's names.
pub fn check_name(value: &str) -> Result<(), String> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "guest name {value:?} must be non-empty [A-Za-z0-9_-]"
        ));
    }
    if value.len() > para_abi::vmq::NAME_LEN {
        // Cut short in the VM-queue directory, two names could read the
        // same and a lookup find the wrong guest.
        return Err(format!(
            "guest name {value:?} is {} bytes; at most {} fit in the VM-queue directory",
            value.len(),
            para_abi::vmq::NAME_LEN
        ));
    }
    Ok(())
}

impl GuestSpec {
    /// Parses `--guest`'s `name=a,kernel=PATH,vcpus=2,mem=256M,cmdline=...`
    /// (`cmdline=` takes the rest of the text, commas included).
    ///
    /// # Errors
    /// Text that is not `key=value` pairs, an unknown or repeated key.
    pub fn parse_flag(spec: &str) -> Result<Self, String> {
        let mut out = Self::default();
        let mut rest = spec;
        while !rest.is_empty() {
            let (key, after) = rest
                .split_once('=')
                .ok_or_else(|| format!("expected key=value in {rest:?}"))?;
            if key == "cmdline" {
                out.cmdline = Some(after.trim_matches('"').to_owned());
                break;
            }
            let (value, next) = after.split_once(',').unwrap_or((after, ""));
            rest = next;
            match key {
                "name" => out.name = Some(value.to_owned()),
                "kernel" => out.kernel = Some(PathBuf::from(value)),
                "vcpus" => {
                    out.vcpus = Some(
                        value
                            .parse()
                            .map_err(|_| format!("vcpus={value:?} is not a number"))?,
                    );
                }
                "mem" => out.mem = Some(value.to_owned()),
                other => return Err(format!("unknown guest key {other:?} ({KEYS})")),
            }
        }
        Ok(out)
    }

    /// The guest to build: defaults filled in, every value checked, the
    /// kernel file present. An unnamed guest keeps an empty name for its
    /// owner to fill in (by position on the command line).
    ///
    /// # Errors
    /// Names the key whose value is wrong and what it must be.
    pub fn check(&self) -> Result<GuestConfig, String> {
        let name = self.name.clone().unwrap_or_default();
        if self.name.is_some() {
            check_name(&name)?;
        }
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(format!("vcpus={vcpus} is outside 1..={MAX_VCPUS}"));
        }
        let mem = match &self.mem {
            None => 256 << 20,
            Some(text) => {
                let mem = memory::parse_size(text)
                    .ok_or_else(|| format!("mem={text:?} is not a size like 256M"))?;
                if !(memory::MIN_RAM..=memory::MAX_RAM).contains(&mem) || !mem.is_multiple_of(4096)
                {
                    return Err(format!(
                        "mem={text} must be 4 KiB-aligned and within 4M..=2560M \
                         (guest RAM must end below the para region at 0xA0000000)"
                    ));
                }
                mem
            }
        };
        let kernel = match &self.kernel {
            Some(k) if !k.as_os_str().is_empty() => k.clone(),
            _ => return Err("kernel=PATH is required".into()),
        };
        if !kernel.is_file() {
            return Err(format!(
                "kernel {} does not exist or is not a file",
                kernel.display()
            ));
        }
        Ok(GuestConfig {
            name,
            kernel,
            vcpus,
            mem,
            cmdline: self.cmdline.clone().unwrap_or_default(),
        })
    }

    /// The spec as `--guest` text, `cmdline` last (it takes the rest).
    #[must_use]
    pub fn to_flag(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = &self.name {
            parts.push(format!("name={n}"));
        }
        if let Some(k) = &self.kernel {
            parts.push(format!("kernel={}", k.display()));
        }
        if let Some(v) = self.vcpus {
            parts.push(format!("vcpus={v}"));
        }
        if let Some(m) = &self.mem {
            parts.push(format!("mem={m}"));
        }
        if let Some(c) = &self.cmdline {
            parts.push(format!("cmdline={c}"));
        }
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_text_and_json_give_the_same_spec() {
        let flag =
            GuestSpec::parse_flag("name=a,kernel=/k,vcpus=2,mem=64M,cmdline=x=1,y=2").unwrap();
        let json: GuestSpec = serde_json::from_str(
            r#"{"name":"a","kernel":"/k","vcpus":2,"mem":"64M","cmdline":"x=1,y=2"}"#,
        )
        .unwrap();
        assert_eq!(flag, json);
        assert_eq!(GuestSpec::parse_flag(&flag.to_flag()).unwrap(), flag);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = GuestSpec::parse_flag("colour=red").unwrap_err();
        assert!(e.contains("\"colour\""), "{e}");
        let e = serde_json::from_str::<GuestSpec>(r#"{"kernel":"/k","colour":"red"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn check_fills_defaults_and_needs_a_kernel() {
        let exe = std::env::current_exe().unwrap();
        let s = GuestSpec {
            kernel: Some(exe),
            ..GuestSpec::default()
        };
        let g = s.check().unwrap();
        assert_eq!((g.name.as_str(), g.vcpus, g.mem), ("", 1, 256 << 20));
        let e = GuestSpec::default().check().unwrap_err();
        assert!(e.contains("kernel"), "{e}");
    }
}
