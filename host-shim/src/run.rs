//! Running the guests of one command line to completion.

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use tracing::{error, info, warn};

use std::sync::Arc;

use crate::assemble::{AssembleError, Assembly};
use crate::cli::Cli;
use crate::devices::switch::Switch;
use crate::devices::tap::Tap;
use crate::mech::{hints, quantum};
use crate::report::{self, Report};
use crate::vm::{Guest, VmError};

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
    #[error("seccomp: {0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
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

/// Waits up to `timeout` for SIGINT/SIGTERM; true when one arrived.
fn stop_signal_within(timeout: Duration) -> bool {
    let set = stop_signals();
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `ts` are valid; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts) };
    sig > 0
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Builds, boots and runs every guest; returns the report once all have ended.
pub fn run(cli: &Cli, shim_start: Instant) -> Result<Report, RunError> {
    block_stop_signals().map_err(RunError::Signals)?;
    let kvm = Kvm::new().map_err(RunError::Kvm)?;
    let ncpus = host_cpus();
    let switch = Arc::new(Switch::default());
    let tap = cli
        .tap
        .as_deref()
        .map(|name| Tap::attach(name, &switch))
        .transpose()
        .map_err(AssembleError::from)?;
    let counts: Vec<u32> = cli.guests.iter().map(|g| g.vcpus).collect();
    let mut placement = cli.pin.placement(&counts, ncpus).into_iter();
    let mut asm = Assembly::new(switch.clone(), ncpus);
    let mut guests = Vec::with_capacity(cli.guests.len());
    for (i, cfg) in cli.guests.iter().enumerate() {
        let pins: Vec<Option<usize>> = placement.next().unwrap_or_default();
        let g = asm.guest(&kvm, cli, cfg, i, &pins)?;
        guests.push((g, pins));
    }
    let monitors = asm.start_monitors(cli)?;
    let mut running = Vec::with_capacity(guests.len());
    for (mut g, pins) in guests {
        g.start(&pins).map_err(|source| RunError::Guest {
            name: g.name.clone(),
            source,
        })?;
        running.push(g);
    }
    info!(guests = running.len(), "all guests started");
    let ticker = match cli.vcpu_quantum {
        Some(ms) => {
            let vcpus: Vec<_> = running.iter().flat_map(|g| g.vcpus.clone()).collect();
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
            std::mem::take(&mut asm.io_placements),
            Duration::from_millis(ms),
            cpu,
        );
    }

    // Every thread runs: from here on the main thread only waits, kicks,
    // joins and reports.
    crate::seccomp::install(crate::seccomp::Kind::Main)?;
    let deadline = (cli.timeout > 0).then(|| Instant::now() + Duration::from_secs(cli.timeout));
    loop {
        if running.iter().all(Guest::finished) {
            break;
        }
        if stop_signal_within(Duration::from_millis(50)) {
            info!("stop signal: shutting all guests down");
            running.iter().for_each(Guest::interrupt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            error!("--timeout {}s reached: stopping all guests", cli.timeout);
            running.iter().for_each(Guest::interrupt);
        }
    }
    if let Some(t) = ticker {
        t.stop();
    }
    // The monitors' last pass and kick counts, and the VM-queue doorbell
    // workers' last drains, land before the guests report.
    let monitors = monitors.shutdown();
    asm.vmq.finish();
    let guests: Vec<_> = running.into_iter().map(|g| g.join(shim_start)).collect();
    let report = Report {
        guests,
        shim_max_rss_kib: report::max_rss_kib(),
        switch: switch.counters(),
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

/// The process exit code for a finished run: 0 when every guest exited with 0.
#[must_use]
pub fn exit_code(report: &Report) -> i32 {
    i32::from(!report.guests.iter().all(|g| g.exit_status == Some(0)))
}
