//! The guests of one run as a set that changes while it runs: the command
//! line's, and those the API creates and removes. A guest created at run time
//! is assembled exactly as a command-line guest (`assemble.rs`, the same
//! mechanisms, devices, switch port and seccomp filters); its doorbell rings
//! get monitors of their own, so that removing it stops them and frees
//! everything it held.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use tracing::info;

use crate::api::model::{GuestInfo, GuestList, GuestState};
use crate::api::{ApiError, Command};
use crate::assemble::Assembly;
use crate::cli::Cli;
use crate::devices::switch::Switch;
use crate::kvm::boot;
use crate::mech::doorbell::monitor::Monitors;
use crate::report::{self, Report};
use crate::vcpu::Outcome;
use crate::vm::{Guest, GuestConfig};

/// The most guests the shim holds (command-line ones included) before the
/// API refuses another: each costs threads, memory and a switch port.
pub const MAX_GUESTS: usize = 64;

/// One guest of the run and what belongs to it alone.
pub struct Member {
    pub guest: Guest,
    pub cfg: GuestConfig,
    /// Its own doorbell monitors (guests created through the API).
    monitors: Option<Monitors>,
    /// Whether its failure was announced already.
    pub told: bool,
    /// Its number for the MAC (`assemble::guest_mac`), free again once it is removed.
    mac_index: usize,
    pub from_command_line: bool,
    /// What its boot times count from: the shim's start for the command
    /// line's guests, the request for the API's.
    pub t0: Instant,
}

impl Member {
    fn info(&self) -> GuestInfo {
        let outcome = self.guest.outcome();
        GuestInfo {
            name: self.guest.name.clone(),
            state: if self.guest.finished() {
                GuestState::Ended
            } else {
                GuestState::Running
            },
            vcpus: self.cfg.vcpus,
            mem_mib: self.cfg.mem >> 20,
            kernel: self.cfg.kernel.display().to_string(),
            outcome: outcome
                .as_ref()
                .map_or_else(|| "running".to_owned(), ToString::to_string),
            exit_status: match outcome {
                Some(Outcome::Exited(s)) => Some(s),
                _ => None,
            },
            from_command_line: self.from_command_line,
        }
    }
}

/// Every guest of the run and what building another one needs.
pub struct Fleet<'a> {
    cli: &'a Cli,
    kvm: Kvm,
    ncpus: usize,
    pub asm: Assembly,
    pub members: Vec<Member>,
    /// vCPUs of every guest built so far, in order: a new guest's placement
    /// continues the command line's.
    vcpu_counts: Vec<u32>,
    shim_start: Instant,
    /// Set by a shutdown: no more guests are created.
    pub closing: bool,
}

impl<'a> Fleet<'a> {
    #[must_use]
    pub fn new(
        cli: &'a Cli,
        kvm: Kvm,
        switch: Arc<Switch>,
        ncpus: usize,
        shim_start: Instant,
    ) -> Self {
        Self {
            cli,
            kvm,
            ncpus,
            asm: Assembly::new(switch, ncpus),
            members: Vec::new(),
            vcpu_counts: Vec::new(),
            shim_start,
            closing: false,
        }
    }

    /// KVM and the assembly together, to build a guest with both.
    pub fn kvm_and_assembly(&mut self) -> (&Kvm, &mut Assembly) {
        (&self.kvm, &mut self.asm)
    }

    /// Host CPUs of the next guest's vCPUs.
    pub fn place(&mut self, vcpus: u32) -> Vec<Option<usize>> {
        self.vcpu_counts.push(vcpus);
        self.cli
            .pin
            .placement(&self.vcpu_counts, self.ncpus)
            .pop()
            .unwrap_or_default()
    }

    /// Adds a guest built by the caller (the command line's, before the
    /// shared monitors start).
    pub fn push_built(&mut self, guest: Guest, cfg: GuestConfig, mac_index: usize) {
        self.members.push(Member {
            guest,
            cfg,
            monitors: None,
            told: false,
            mac_index,
            from_command_line: true,
            t0: self.shim_start,
        });
    }

    /// True when every guest's vCPU threads have returned.
    #[must_use]
    pub fn all_finished(&self) -> bool {
        self.members.iter().all(|m| m.guest.finished())
    }

    pub fn interrupt_all(&self) {
        self.members.iter().for_each(|m| m.guest.interrupt());
    }

    fn find(&self, name: &str) -> Result<usize, ApiError> {
        self.members
            .iter()
            .position(|m| m.guest.name == name)
            .ok_or_else(|| ApiError::not_found(format!("no guest named {name:?}")))
    }

    /// Builds and starts guest `spec` (named `name`) at run time.
    fn create(&mut self, name: &str, spec: &crate::spec::GuestSpec) -> Result<GuestInfo, ApiError> {
        if self.closing {
            return Err(ApiError::new(503, "the shim is shutting down"));
        }
        if self.cli.vmq {
            return Err(ApiError::conflict(
                "guests join VM queues and direct channels (--vmq on) only when the shim \
                 starts; run the shim with --vmq off to create guests through the API",
            ));
        }
        if self.cli.vcpu_quantum.is_some() {
            return Err(ApiError::conflict(
                "--vcpu-quantum slices only the vCPUs of the command line's guests; \
                 run the shim without it to create guests through the API",
            ));
        }
        if self.members.iter().any(|m| m.guest.name == name) {
            return Err(ApiError::conflict(format!(
                "a guest named {name:?} exists already (DELETE /guests/{name} first)"
            )));
        }
        if self.members.len() >= MAX_GUESTS {
            return Err(ApiError::conflict(format!(
                "the shim holds {MAX_GUESTS} guests, the most it takes; DELETE one first"
            )));
        }
        let cfg = spec.check().map_err(ApiError::bad_request)?;
        // The image is read whole: a file larger than the guest's RAM
        // cannot fit in it anyway and must not cost the shim its size.
        let size = std::fs::metadata(&cfg.kernel).map_or(0, |m| m.len());
        if size > cfg.mem {
            return Err(ApiError::bad_request(format!(
                "kernel {} is {size} bytes, more than the guest's {} MiB of RAM",
                cfg.kernel.display(),
                cfg.mem >> 20
            )));
        }
        boot::check_pvh_image(&cfg.kernel).map_err(|e| {
            ApiError::bad_request(format!(
                "kernel {} cannot be booted: {e}",
                cfg.kernel.display()
            ))
        })?;
        let used: BTreeSet<usize> = self.members.iter().map(|m| m.mac_index).collect();
        // One more number than guests: one of them is free.
        let mac_index = (0..=self.members.len())
            .find(|i| !used.contains(i))
            .unwrap_or(self.members.len());
        let t0 = Instant::now();
        let pins = self.place(cfg.vcpus);
        let failed = |e: &dyn std::fmt::Display| ApiError::new(500, format!("guest {name}: {e}"));
        let mut guest = match self.asm.guest(&self.kvm, self.cli, &cfg, mac_index, &pins) {
            Ok(g) => g,
            Err(e) => {
                // Its NIC may have taken a port before the failure.
                self.asm
                    .switch
                    .remove_nic_port(crate::assemble::guest_mac(mac_index));
                return Err(failed(&e));
            }
        };
        // The placement of a run-time guest is not moved by
        // --io-cpu-move-after-ms; keep the list to the command line's.
        let _ = self.asm.io_placements.pop();
        let monitors = self.asm.start_monitors(self.cli).map_err(|e| failed(&e))?;
        if let Err(e) = guest.start(&pins) {
            guest.stop("its start failed");
            let _ = monitors.shutdown();
            let ports: Vec<usize> = guest.nics.iter().map(|n| n.switch_port).collect();
            let _ = guest.join(t0);
            for p in ports {
                self.asm.switch.remove_port(p);
            }
            return Err(failed(&e));
        }
        let member = Member {
            guest,
            cfg,
            monitors: Some(monitors),
            told: false,
            mac_index,
            from_command_line: false,
            t0,
        };
        let info = member.info();
        info!(
            guest = name,
            vcpus = info.vcpus,
            mem_mib = info.mem_mib,
            kernel = %info.kernel,
            "API: guest created and started"
        );
        self.members.push(member);
        Ok(info)
    }

    /// Stops guest `name`, joins its threads, frees it; its final report.
    fn delete(&mut self, name: &str) -> Result<serde_json::Value, ApiError> {
        let i = self.find(name)?;
        if self.members[i].from_command_line {
            return Err(ApiError::conflict(format!(
                "guest {name:?} came from the command line: its doorbell rings share the \
                 command line's monitors, so it ends with the shim (PUT /actions shutdown)"
            )));
        }
        let m = self.members.remove(i);
        m.guest.stop("removed through the API");
        while !m.guest.finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Its monitors' last pass lands before the report, as at the end of a run.
        if let Some(mon) = m.monitors {
            let _ = mon.shutdown();
        }
        let ports: Vec<usize> = m.guest.nics.iter().map(|n| n.switch_port).collect();
        let report = m.guest.join(m.t0);
        // Its NIC is gone with it: the port's number and MAC are free again.
        // (Command-line guests keep theirs to the end, for the final report.)
        for p in ports {
            self.asm.switch.remove_port(p);
        }
        info!(guest = name, outcome = %report.outcome, "API: guest stopped and removed");
        Ok(serde_json::to_value(&report).unwrap_or_default())
    }

    /// The stats document as it stands (`--stats-json`'s keys; no TAP or
    /// monitor figures, which are taken when the shim ends).
    #[must_use]
    pub fn snapshot(&self) -> Report {
        Report {
            schema_version: report::SchemaVersion,
            guests: self.members.iter().map(|m| m.guest.report(m.t0)).collect(),
            shim_max_rss_kib: report::max_rss_kib(),
            log_lines_suppressed: crate::loglimit::suppressed_total(),
            switch: self.asm.switch.counters(),
            switch_ports: self.asm.switch.port_reports(),
            tap: None,
            monitors: Vec::new(),
        }
    }

    /// Answers one API command; true when it asked for a shutdown.
    pub fn answer(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::List(reply) => {
                let guests = self.members.iter().map(Member::info).collect();
                let _ = reply.send(Ok(GuestList { guests }));
            }
            Command::Create { name, spec, reply } => {
                let _ = reply.send(self.create(&name, &spec));
            }
            Command::Delete { name, reply } => {
                let _ = reply.send(self.delete(&name));
            }
            Command::Stats { name, reply } => {
                let r = self.find(&name).map(|i| {
                    let m = &self.members[i];
                    serde_json::to_value(m.guest.report(m.t0)).unwrap_or_default()
                });
                let _ = reply.send(r);
            }
            Command::Metrics(reply) => {
                let _ = reply.send(Ok(serde_json::to_value(self.snapshot()).unwrap_or_default()));
            }
            Command::Shutdown(reply) => {
                info!("API: shutdown asked for: stopping every guest");
                self.closing = true;
                self.interrupt_all();
                let _ = reply.send(Ok(()));
                return true;
            }
        }
        false
    }

    /// Stops the monitors of run-time guests still there (at the end of the run).
    pub fn stop_own_monitors(&mut self) {
        for m in &mut self.members {
            if let Some(mon) = m.monitors.take() {
                let _ = mon.shutdown();
            }
        }
    }
}
