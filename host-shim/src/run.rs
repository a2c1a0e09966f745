//! Running the guests of one command line to completion.

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use tracing::{error, info, warn};

use std::sync::Arc;

use crate::api::ApiServer;
use crate::assemble::AssembleError;
use crate::cli::Cli;
use crate::devices::switch::Switch;
use crate::devices::tap::Tap;
use crate::fleet::{Fleet, Member};
use crate::kvm::boot::{self, ImageError};
use crate::mech::{hints, quantum};
use crate::report::{self, Report};
use crate::vcpu::Outcome;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("guest {name}: {source}")]
    Guest { name: String, source: VmError },
    #[error("writing {path}: {source}")]
    StatsJson {
        path: String,
        source: std::io::Error,
    },
    #[error("blocking signals failed: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("starting the --vcpu-quantum ticker failed: {0}")]
    Quantum(std::io::Error),
    #[error("guest {name}: kernel {path} cannot be booted: {source}")]
    Image {
        name: String,
        path: String,
        source: ImageError,
    },
    #[error("seccomp: {0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Api(#[from] crate::api::server::ApiStartError),
}

impl RunError {
    /// A usage error (exit status 2): the command line named something the
    /// shim cannot run.
    #[must_use]
    pub const fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Image { .. }
                | Self::Api(_)
                | Self::Assemble(AssembleError::Gdb(crate::gdb::GdbError::Usage(_)))
        )
    }
}

/// Refuses a kernel that is no PVH ELF before any VM exists.
fn check_images(cli: &Cli) -> Result<(), RunError> {
    for g in &cli.guests {
        boot::check_pvh_image(&g.kernel).map_err(|source| RunError::Image {
            name: g.name.clone(),
            path: g.kernel.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// One line on the shim's stdout, between the guests' console lines, the
/// moment guest `name` ended other than with status 0.
fn failure_line(name: &str, outcome: &Outcome, stopping_others: bool) -> String {
    let what = match outcome {
        Outcome::Exited(1) => "exit status 1 (tests failed)".to_owned(),
        Outcome::Exited(2) => "exit status 2 (the guest panicked)".to_owned(),
        Outcome::Exited(3) => "exit status 3 (a fatal exception)".to_owned(),
        Outcome::Exited(4) => {
            "exit status 4 (the application refused its configuration)".to_owned()
        }
        other => other.to_string(),
    };
    let then = if stopping_others {
        "; stopping every other guest (--end-on-failure)"
    } else {
        ""
    };
    format!("host-shim: guest {name} failed: {what}{then}")
}

/// Says on stdout, once each, which guests failed since the last look; with
/// `end_on_failure`, stops every guest still running.
fn tell_failures(members: &mut [Member], end_on_failure: bool) {
    for i in 0..members.len() {
        let m = &members[i];
        let Some(outcome) = m.guest.outcome().filter(|o| !m.told && failed(o)) else {
            continue;
        };
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{}",
                failure_line(&m.guest.name, &outcome, end_on_failure)
            );
            let _ = out.flush();
        }
        if end_on_failure {
            let why = format!("guest {} failed", m.guest.name);
            members
                .iter()
                .filter(|o| o.guest.outcome().is_none())
                .for_each(|o| o.guest.stop(&why));
        }
        members[i].told = true;
    }
}

/// A guest's outcome that is a failure: anything but status 0 or a stop the
/// shim was asked for.
fn failed(outcome: &Outcome) -> bool {
    !matches!(
        outcome,
        Outcome::Exited(0) | Outcome::Interrupted | Outcome::Stopped(_)
    )
}

/// SIGINT and SIGTERM, blocked in every thread and taken synchronously by the main loop.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid argument for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, crate::mainwake::SIGNAL);
    }
    set
}

fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Waits up to `timeout` (under a second) for SIGINT/SIGTERM or a wake-up
/// (`mainwake`); true when a stop signal arrived.
fn stop_signal_within(timeout: Duration) -> bool {
    let set = stop_signals();
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `ts` are valid; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts) };
    sig == libc::SIGINT || sig == libc::SIGTERM
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Builds, boots and runs every guest; returns the report once all have
/// ended (with `--api-sock`: once a shutdown was asked for and every guest
/// has ended).
#[allow(clippy::too_many_lines)] // one linear run: build, start, serve, wait, report
pub fn run(cli: &Cli, shim_start: Instant) -> Result<Report, RunError> {
    check_images(cli)?;
    block_stop_signals().map_err(RunError::Signals)?;
    crate::mainwake::register_main();
    let kvm = Kvm::new().map_err(RunError::Kvm)?;
    let ncpus = host_cpus();
    let switch = Arc::new(Switch::default());
    let tap = cli
        .tap
        .as_deref()
        .map(|name| Tap::attach(name, &switch))
        .transpose()
        .map_err(AssembleError::from)?;
    let mut fleet = Fleet::new(cli, kvm, switch.clone(), ncpus, shim_start);
    let mut guests = Vec::with_capacity(cli.guests.len());
    for (i, cfg) in cli.guests.iter().enumerate() {
        let pins = fleet.place(cfg.vcpus);
        let g = {
            let (kvm, asm) = fleet.kvm_and_assembly();
            asm.guest(kvm, cli, cfg, i, &pins)?
        };
        guests.push((g, cfg.clone(), i, pins));
    }
    let monitors = fleet.asm.start_monitors(cli)?;
    for (mut g, cfg, i, pins) in guests {
        g.start(&pins).map_err(|source| RunError::Guest {
            name: g.name.clone(),
            source,
        })?;
        fleet.push_built(g, cfg, i);
    }
    info!(guests = fleet.members.len(), "all guests started");
    let ticker = match cli.vcpu_quantum {
        Some(ms) => {
            let vcpus: Vec<_> = fleet
                .members
                .iter()
                .flat_map(|m| m.guest.vcpus.clone())
                .collect();
            if vcpus.len() <= ncpus {
                warn!(
                    vcpus = vcpus.len(),
                    host_cpus = ncpus,
                    "--vcpu-quantum with no more vCPUs than host CPUs: the slices only cost exits"
                );
            }
            Some(
                quantum::Ticker::start(Duration::from_millis(ms), vcpus)
                    .map_err(RunError::Quantum)?,
            )
        }
        None => None,
    };
    if let (Some(ms), Some(cpu)) = (cli.io_cpu_move_after_ms, cli.io_cpu_move_to) {
        hints::schedule_move(
            std::mem::take(&mut fleet.asm.io_placements),
            Duration::from_millis(ms),
            cpu,
        );
    }
    let api = cli.api_sock.as_deref().map(ApiServer::start).transpose()?;

    // Every thread runs: from here on the main thread only waits, kicks,
    // joins and reports, and with the API builds and frees guests.
    crate::seccomp::install(if api.is_some() {
        crate::seccomp::Kind::Control
    } else {
        crate::seccomp::Kind::Main
    })?;
    let deadline = (cli.timeout > 0).then(|| Instant::now() + Duration::from_secs(cli.timeout));
    // A guest's end and an API command wake this loop at once (`mainwake`);
    // the tick only bounds how late `--timeout` is noticed.
    let tick = Duration::from_millis(200);
    loop {
        tell_failures(&mut fleet.members, cli.end_on_failure);
        if let Some(api) = &api {
            while let Ok(cmd) = api.commands.try_recv() {
                fleet.answer(cmd);
            }
        }
        if fleet.all_finished() && (api.is_none() || fleet.closing) {
            break;
        }
        if stop_signal_within(tick) {
            info!("stop signal: shutting all guests down");
            fleet.closing = true;
            fleet.interrupt_all();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !fleet.closing {
            error!("--timeout {}s reached: stopping all guests", cli.timeout);
            fleet.closing = true;
            fleet.interrupt_all();
        }
    }
    if let Some(api) = api {
        api.stop();
    }
    if let Some(t) = ticker {
        t.stop();
    }
    // The monitors' last pass and kick counts, and the VM-queue doorbell
    // workers' last drains, land before the guests report.
    let monitors = monitors.shutdown();
    fleet.stop_own_monitors();
    fleet.asm.vmq.finish();
    let guests: Vec<_> = std::mem::take(&mut fleet.members)
        .into_iter()
        .map(|m| m.guest.join(m.t0))
        .collect();
    let report = Report {
        schema_version: crate::report::SchemaVersion,
        guests,
        shim_max_rss_kib: report::max_rss_kib(),
        log_lines_suppressed: crate::loglimit::suppressed_total(),
        switch: switch.counters(),
        switch_ports: switch.port_reports(),
        tap: tap.map(Tap::finish),
        monitors,
    };
    if let Some(path) = &cli.stats_json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text).map_err(|source| RunError::StatsJson {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(report)
}

/// The process exit code for a finished run: 0 when every guest exited with
/// 0. With the API (`served`), where guests run until a shutdown stops them,
/// 0 unless a guest failed (exited non-zero, faulted, or the shim failed it).
#[must_use]
pub fn exit_code(report: &Report, served: bool) -> i32 {
    let ok = |g: &crate::report::GuestReport| match g.exit_status {
        Some(s) => s == 0,
        None => served && (g.outcome == "interrupted" || g.outcome.starts_with("stopped")),
    };
    i32::from(!report.guests.iter().all(ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_worded_by_what_happened() {
        assert!(!failed(&Outcome::Exited(0)));
        assert!(!failed(&Outcome::Stopped("guest b failed".into())));
        assert!(!failed(&Outcome::Interrupted));
        assert!(failed(&Outcome::Exited(2)));
        assert!(failed(&Outcome::TripleFault { vcpu: 0, rip: 1 }));
        assert_eq!(
            failure_line("client1", &Outcome::Exited(2), true),
            "host-shim: guest client1 failed: exit status 2 (the guest panicked); \
             stopping every other guest (--end-on-failure)"
        );
        assert_eq!(
            failure_line("a", &Outcome::TripleFault { vcpu: 1, rip: 0x10 }, false),
            "host-shim: guest a failed: triple fault on vCPU 1 at rip 0x10"
        );
    }

    #[test]
    fn a_kernel_that_is_no_pvh_elf_is_refused_before_any_vm() {
        let not_elf = std::env::temp_dir().join(format!("shim-not-elf-{}", std::process::id()));
        std::fs::write(&not_elf, b"hello").unwrap();
        let cli = <Cli as clap::Parser>::try_parse_from([
            "host-shim",
            "--guest",
            &format!("name=a,kernel={}", not_elf.display()),
        ])
        .unwrap();
        let e = run(&cli, Instant::now()).unwrap_err();
        let _ = std::fs::remove_file(&not_elf);
        assert!(e.is_usage());
        assert_eq!(
            e.to_string(),
            format!(
                "guest a: kernel {} cannot be booted: it is not an ELF file (it does not start with 0x7f 'ELF')",
                not_elf.display()
            )
        );
    }
}
