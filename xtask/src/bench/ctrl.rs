//! `cargo xtask bench ctrl` (M4): what one write of a control flag
//! costs by the path it takes — owned (CR0.MP by `mov cr0` in a kernel call),
//! shadowed (a store to the shadow word) and trapping (a hypercall) — in guest
//! time (TSC → ns) and in KVM exits per write. Each round boots the ktest image
//! under the shim once, filtered to `ctrl::write_paths_compared`, which measures
//! the three paths back to back and prints `report: ctrl-bench` lines.

use std::path::PathBuf;
use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::{infra::build, vmm::shim};

pub struct Ctrl {
    prepared: Option<(PathBuf, PathBuf)>,
}

impl Ctrl {
    pub fn new() -> Self {
        Self { prepared: None }
    }
}

const PATHS: [(&str, &str); 3] = [
    ("owned", "owned: mov cr0 (kernel call)"),
    ("shadowed", "shadowed: store to the shadow"),
    ("trapping", "trapping: hypercall"),
];

/// One `report: ctrl-bench path=P writes=N ns_per_write=T exits=X` line:
/// (path, writes, ns per write, exits).
fn parse(line: &str) -> Option<(String, u64, u64, Option<u64>)> {
    let rest = line.trim().strip_prefix("report: ctrl-bench ")?;
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    Some((
        field("path")?.to_owned(),
        field("writes")?.parse().ok()?,
        field("ns_per_write")?.parse().ok()?,
        field("exits").and_then(|x| x.parse().ok()),
    ))
}

impl Suite for Ctrl {
    fn name(&self) -> &'static str {
        "ctrl"
    }

    fn about(&self) -> String {
        "Shadowed control flags (M4): one guest under the shim writes CR0.MP 100 times \
         owned (a kernel call doing `mov cr0`; ring 0 is emulated on this host), 100,000 \
         times shadowed (a locked store to the shadow word in ring 3; the shim writes CR0 \
         at the next exit) and 100 times trapping (a hypercall). Time per write from the \
         guest's TSC; exits per write are KVM `exits` over the window minus an empty \
         window, from the shim (`CtrlQuery`)."
            .into()
    }

    fn scenarios(&self) -> Vec<Scenario> {
        PATHS.iter().map(|&(id, l)| Scenario::new(id, l)).collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("ns_per_write", "time per write", "ns", Better::Lower),
            Metric::new("exits_per_write", "exits per write", "exits", Better::Lower),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("owned")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("shadowed", "ns_per_write"),
            ("shadowed", "exits_per_write"),
        ]
    }

    fn prepare(&mut self) -> Result<()> {
        let image = build::build_guest(build::find_image("ktest")?)?;
        self.prepared = Some((shim::build()?, image));
        Ok(())
    }

    fn round(&mut self, round: u32, _order: &[Scenario]) -> Result<RoundResult> {
        let (shim_path, image) = self
            .prepared
            .clone()
            .ok_or_else(|| Error::failed("ctrl bench not prepared"))?;
        let guest = shim::Guest {
            name: "ktest".into(),
            image,
            vcpus: 1,
            mem_mib: 256,
            cmdline: "ktest.filter=ctrl::write_paths_compared".into(),
        };
        let run = shim::run(
            &shim_path,
            &[guest],
            &[],
            Duration::from_mins(2),
            &format!("bench-ctrl-{round}"),
            |_| {},
        )?;
        let mut r = RoundResult::default();
        let mut seen = 0;
        for line in shim::guest_lines(&run.lines, "ktest") {
            let Some((path, writes, ns, exits)) = parse(line) else {
                continue;
            };
            let Some(&(id, _)) = PATHS.iter().find(|(id, _)| *id == path) else {
                continue;
            };
            seen += 1;
            #[allow(clippy::cast_precision_loss)] // small counts
            {
                r.set(id, "ns_per_write", ns as f64);
                if let Some(x) = exits {
                    r.set(id, "exits_per_write", x as f64 / writes.max(1) as f64);
                }
            }
        }
        if seen != PATHS.len() {
            return Err(Error::failed(format!(
                "ctrl bench: {seen} of {} paths reported (log {})",
                PATHS.len(),
                run.log.display()
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_parse() {
        assert_eq!(
            parse("report: ctrl-bench path=shadowed writes=100000 ns_per_write=22 exits=0"),
            Some(("shadowed".into(), 100_000, 22, Some(0)))
        );
        assert_eq!(
            parse("report: ctrl-bench path=owned writes=100 ns_per_write=671974"),
            Some(("owned".into(), 100, 671_974, None))
        );
        assert_eq!(parse("report: doorbell: 10 events"), None);
        assert_eq!(
            parse("report: ctrl-bench path=owned writes=x ns_per_write=1"),
            None
        );
    }
}
