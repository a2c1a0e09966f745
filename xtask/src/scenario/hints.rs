//! Interrupt-vCPU hints (M2) on the ping-pong: one server and one client, two
//! vCPUs each, pinned `--pin 0,1` (each guest's vCPU n on host CPU n), the NIC
//! I/O threads pinned by `--io-cpu`. The client's own per-CPU RX interrupt
//! counts and hint decisions come from its `pingpong-result:` line; the shim's
//! hint counters from its stats JSON. Used by the `shim-hints` leg and
//! `cargo xtask bench hints`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::infra::build;
use crate::scenario::pingpong::{ClientResult, GuestHints, parse_result};
use crate::vmm::shim;
use crate::vmm::stats::{HintsStats, QueueHints, UpcallStats};

pub const SERVER: &str = "server";
pub const CLIENT: &str = "client1";

/// One run's set-up.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `hints=off` on both guests' command lines when false.
    pub hints: bool,
    /// `--io-cpu`.
    pub io_cpu: usize,
    /// `net.irq_cpu=` for both guests (then `hints=on` when `hints`, so that
    /// the hint may override this initial placement).
    pub irq_cpu: Option<u32>,
    /// `--io-cpu-move-after-irqs N --io-cpu-move-to CPU`.
    pub move_after_irqs: Option<(u64, usize)>,
    pub count: u64,
    pub timeout: Duration,
}

/// What one run gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub client: Option<ClientResult>,
    /// The shim's `hints` key for the client.
    pub shim_hints: Option<HintsStats>,
    /// The shim's `upcalls` key for the client (M3).
    pub shim_upcalls: Option<UpcallStats>,
    /// Both guests exited with status 0.
    pub exited_ok: bool,
    /// KVM `exits` of the client over the run.
    pub client_exits: u64,
    pub log: PathBuf,
}

impl Outcome {
    /// RX interrupts the client took on `cpu`.
    #[must_use]
    pub fn irqs_on(&self, cpu: usize) -> u64 {
        self.client
            .as_ref()
            .and_then(|c| c.rx_irqs_by_cpu.get(cpu).copied())
            .unwrap_or(0)
    }

    #[must_use]
    pub fn irqs_total(&self) -> u64 {
        self.client
            .as_ref()
            .map_or(0, |c| c.rx_irqs_by_cpu.iter().sum())
    }

    /// The client's `hints` object from its result line.
    #[must_use]
    pub fn guest_hints(&self) -> Option<&GuestHints> {
        self.client.as_ref().map(|c| &c.hints)
    }

    /// [`Self::guest_hints`] as JSON, for check names.
    #[must_use]
    pub fn guest_hints_text(&self) -> String {
        json_text(&self.guest_hints())
    }

    /// Interrupts the client's hint follower moved.
    #[must_use]
    pub fn retargeted(&self) -> u64 {
        self.guest_hints().map_or(0, |h| h.retargeted)
    }

    /// The shim's RX-queue record for the client's NIC.
    #[must_use]
    pub fn shim_rx(&self) -> Option<&QueueHints> {
        self.shim_hints.as_ref()?.queues.first()
    }

    /// [`Self::shim_rx`] as JSON, for check names.
    #[must_use]
    pub fn shim_rx_text(&self) -> String {
        json_text(&self.shim_rx())
    }

    /// `hint_update` upcalls (requested, delivered) per the shim.
    #[must_use]
    pub fn hint_upcalls(&self) -> (u64, u64) {
        self.shim_upcalls.as_ref().map_or((0, 0), |u| {
            (u.requested.hint_update, u.delivered.hint_update)
        })
    }
}

/// `value` as compact JSON (`null` for `None`).
fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn cmdline(role_server: bool, s: &Setup) -> String {
    // Hints steer the RX interrupt: these runs take it (`net.wait=halt`); the
    // default exitless wait withholds it and would leave nothing to steer.
    let hints = match (s.hints, s.irq_cpu) {
        (false, None) => " net.wait=halt hints=off".to_owned(),
        (false, Some(c)) => format!(" net.wait=halt hints=off net.irq_cpu={c}"),
        (true, None) => " net.wait=halt".to_owned(),
        (true, Some(c)) => format!(" net.wait=halt hints=on net.irq_cpu={c}"),
    };
    if role_server {
        format!("pingpong.role=server ip=10.0.0.1/24 pingpong.clients=1{hints}")
    } else {
        format!(
            "pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1 pingpong.count={} pingpong.size=64{hints}",
            s.count
        )
    }
}

/// Builds the shim and the ping-pong image (once per process is enough).
pub fn prepare() -> Result<(PathBuf, PathBuf)> {
    let shim_path = shim::build()?;
    let image = build::build_guest(build::find_image("udp-pingpong")?)?;
    Ok((shim_path, image))
}

/// Runs the ping-pong once with `setup`.
pub fn run(
    shim_path: &Path,
    image: &Path,
    setup: &Setup,
    label: &str,
    echo: impl FnMut(&str),
) -> Result<Outcome> {
    let guests: Vec<shim::Guest> = [(SERVER, true), (CLIENT, false)]
        .iter()
        .map(|&(name, server)| shim::Guest {
            name: name.to_owned(),
            image: image.to_path_buf(),
            vcpus: 2,
            mem_mib: 256,
            cmdline: cmdline(server, setup),
        })
        .collect();
    // Hints name the vCPUs beside the NIC's I/O thread: the frames must go
    // through that thread (`--run-to-completion off`), not the sender's.
    let mut extra: Vec<String> = vec![
        "--pin".into(),
        "0,1".into(),
        "--io-cpu".into(),
        setup.io_cpu.to_string(),
        "--run-to-completion".into(),
        "off".into(),
    ];
    if let Some((n, to)) = setup.move_after_irqs {
        extra.extend([
            "--io-cpu-move-after-irqs".into(),
            n.to_string(),
            "--io-cpu-move-to".into(),
            to.to_string(),
        ]);
    }
    let run = shim::run(
        &shim_path.to_path_buf(),
        &guests,
        &extra,
        setup.timeout,
        label,
        echo,
    )?;
    let lines = shim::guest_lines(&run.lines, CLIENT);
    let client = parse_result(CLIENT, lines);
    let stats = run.guest_stats(CLIENT).ok_or_else(|| {
        Error::failed(format!(
            "no shim stats for {CLIENT} (log {})",
            run.log.display()
        ))
    })?;
    Ok(Outcome {
        client,
        shim_hints: stats.hints.clone(),
        shim_upcalls: stats.upcalls.clone(),
        exited_ok: [SERVER, CLIENT].iter().all(|n| run.guest_exit(n).passed()),
        client_exits: stats.exits,
        log: run.log.clone(),
    })
}
