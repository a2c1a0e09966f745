//! `cargo xtask`: builds the guest images and host binaries, boots guests
//! under QEMU, and runs every test leg.
//!
//! One job per module:
//! - `infra/`: processes and their logs, machine setup, builds, the output
//!   of `cargo test` and of a guest's serial console;
//! - `vmm/`: QEMU, the host shim, and typed mirrors of the statistics the
//!   shim writes (`vmm/stats.rs`: a key renamed in the shim fails the parse);
//! - `scenario/`: what runs guests for a purpose (the ping-pong, the VM-queue
//!   pipeline, hints, the doorbell flood...) and parses what they report;
//! - `test/`: `cargo xtask test`, one `Leg` trait, the registry of legs, and
//!   each leg with its judgement in `test/legs/`;
//! - `run/`: `cargo xtask run`, its summaries and `--json` documents;
//! - `bench/`: `cargo xtask bench`, its suites, runner and report;
//! - `app/`: `cargo xtask new` and `cargo xtask run --app`, for apps that live
//!   outside this repository;
//! - `oci.rs`: `cargo xtask oci`, a guest ELF as an OCI image for containerd.

mod app;
mod bench;
mod error;
mod infra;
mod oci;
mod run;
mod scenario;
mod test;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::infra::{build, serial, sys};
use crate::scenario::{pingpong, pipeline};
use crate::test::{leg, registry, runner};
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Exitless developer tasks: build, boot guests under QEMU, run every test leg"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build every guest image (x86_64-unknown-none, release) and the host
    /// binaries; installs the Rust target and QEMU first when missing.
    Build,
    /// Boot a guest image under QEMU by hand: streams its serial console,
    /// keeps it in target/xtask/logs/, and prints the exit status and boot time.
    Qemu(QemuArgs),
    /// Run every test leg (host unit tests, in-guest tests under QEMU TCG and
    /// KVM) and end with `N passed, M failed` over all of them.
    Test(TestArgs),
    /// The main demo: the host shim runs a UDP ping-pong between guests on
    /// its switch and prints packets, RTT p50/p99, pps and VM exits per packet.
    Run(RunArgs),
    /// Create a new unikernel app crate from a template: it builds for the
    /// guest target, says hello and serves TCP echo on port 7. Then:
    /// `cargo xtask run --app DIR/NAME` (under the host shim) or add `--qemu`.
    New(NewArgs),
    /// Run the benchmark suites (all, or those named), write
    /// `target/bench/SUITE.json`, and regenerate docs/benchmarks.md, its plots and
    /// the README's headline ratios.
    Bench(BenchArgs),
    /// Package a guest ELF as an OCI image archive for `ctr image import`,
    /// run by the Exitless containerd shim (docs/containerd.md). E.g.
    /// `cargo xtask oci tcp-echo --cmdline "ip=10.0.0.2/24"`, then
    /// `ctr image import target/oci/tcp-echo.tar` and
    /// `ctr run --rm --runtime io.containerd.exitless.v1 docker.io/exitless/tcp-echo:latest t1`.
    Oci(OciArgs),
}

#[derive(Debug, Args)]
struct OciArgs {
    /// A guest image name (built first: ktest, udp-pingpong, tcp-echo,
    /// pipeline) or a path to a guest ELF file.
    #[arg(value_name = "NAME|PATH", required_unless_present = "app")]
    image: Option<String>,
    /// Package your own app (a crate made by `cargo xtask new`) instead: it
    /// is built first.
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    app: Option<PathBuf>,
    /// The guest's command line, stored as the image's Cmd (one word per
    /// space); `ctr run IMAGE ID WORDS...` replaces it.
    #[arg(long, value_name = "TEXT", default_value = "")]
    cmdline: String,
    /// Default vCPUs, stored as env EXITLESS_VCPUS (and a label): used when
    /// the container asks for no CPU limit.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=254))]
    vcpus: Option<u32>,
    /// Default memory (bytes, or with a K/M/G suffix), stored as env
    /// EXITLESS_MEMORY (and a label): used when the container has no memory limit.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// The image reference [default: docker.io/exitless/NAME:latest].
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// Where to write the archive [default: target/oci/NAME.tar].
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct QemuArgs {
    /// Accelerator: tcg (emulation) or kvm (needs read-write /dev/kvm).
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    accel: Accel,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    smp: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=65536))]
    mem: u32,
    /// Machine type: q35 (SeaBIOS, slow under this KVM) or microvm (qboot, fast).
    #[arg(long, value_enum, default_value_t = Machine::Q35)]
    machine: Machine,
    /// A guest image name (built first) or a path to an ELF file (booted as is).
    #[arg(long, value_name = "NAME|PATH", default_value = "ktest")]
    image: String,
    /// Kernel command line passed with -append [default: the image's own,
    /// e.g. `ktest.dhcp` for ktest; empty for an image given by path].
    #[arg(long, value_name = "CMDLINE")]
    append: Option<String>,
    /// Network: a virtio-net-pci NIC on QEMU user networking, or none.
    #[arg(long, value_enum, default_value_t = Net::User)]
    net: Net,
    /// Forward a host port to the guest (QEMU hostfwd rule, repeatable),
    /// e.g. `tcp::8080-:80`.
    #[arg(long, value_name = "RULE")]
    hostfwd: Vec<String>,
    /// Start QEMU's gdb stub on 127.0.0.1:PORT with the guest stopped before
    /// its first instruction (-S); prints the gdb command that attaches with
    /// the image's symbols. Raise --timeout for a long session.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    gdb: Option<u16>,
    /// Wall-clock limit in seconds; QEMU is killed after it.
    #[arg(long, value_name = "SECS", default_value_t = qemu::DEFAULT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// The demos `cargo xtask run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DemoKind {
    Pingpong,
    Pipeline,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Build and boot your own app (a crate made by `cargo xtask new`) alone,
    /// instead of a demo; its exit status becomes this command's.
    #[arg(long, value_name = "PATH", help_heading = "Your own app")]
    app: Option<PathBuf>,
    /// With --app: boot it under QEMU (KVM when available, else TCG, user
    /// networking) instead of the host shim.
    #[arg(long, requires = "app", help_heading = "Your own app")]
    qemu: bool,
    /// With --app: the kernel command line [default: a static address on the
    /// VMM's network].
    #[arg(
        long,
        value_name = "CMDLINE",
        requires = "app",
        help_heading = "Your own app"
    )]
    cmdline: Option<String>,
    /// With --app --qemu: forward a host port to the guest (repeatable), e.g.
    /// `tcp::8007-:7`.
    #[arg(
        long,
        value_name = "RULE",
        requires = "qemu",
        help_heading = "Your own app"
    )]
    hostfwd: Vec<String>,
    /// With --app: wait for gdb on 127.0.0.1:PORT before the guest's first
    /// instruction (the shim's --gdb, or QEMU's gdb stub under TCG with
    /// --qemu) and print the gdb command that attaches with the app's symbols.
    #[arg(long, value_name = "PORT", requires = "app", value_parser = clap::value_parser!(u16).range(1..))]
    gdb: Option<u16>,
    /// Which demo: the UDP ping-pong, or the three-guest VM-queue pipeline (M5).
    #[arg(long, value_enum, default_value_t = DemoKind::Pingpong, help_heading = "Demos")]
    demo: DemoKind,
    /// Pipeline: when the shim delivers messages.
    #[arg(long, value_enum, default_value_t = pipeline::Policy::Immediate, help_heading = "Pipeline (--demo pipeline)")]
    policy: pipeline::Policy,
    /// Pipeline: copy the bytes or remap the pages.
    #[arg(long, value_enum, default_value_t = pipeline::Transfer::Copy, help_heading = "Pipeline (--demo pipeline)")]
    transfer: pipeline::Transfer,
    /// Pipeline: MiB to move through the three guests.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096), help_heading = "Pipeline (--demo pipeline)")]
    mib: u64,
    /// Pipeline: bytes per message (a power of two, 4096 to 2097152).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 65536,
        help_heading = "Pipeline (--demo pipeline)"
    )]
    msg: u32,
    /// Guests in all: one server, the rest clients pinging it.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=200), help_heading = "Ping-pong")]
    guests: u32,
    /// Pings each client sends (at most 1,000,000: a client keeps every
    /// round-trip time on its heap).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=pingpong::MAX_COUNT), help_heading = "Ping-pong")]
    count: u64,
    /// UDP payload bytes per ping (12 to 1472).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 64,
        help_heading = "Ping-pong"
    )]
    size: u32,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16), help_heading = "Ping-pong")]
    vcpus: u32,
    /// RX mode of the guests' NICs: interrupt-driven or busy polling.
    #[arg(long, value_enum, default_value_t = pingpong::Rx::Irq, help_heading = "Data path (experiment knobs)")]
    rx: pingpong::Rx,
    /// How guests notify their NIC: exitless doorbells when the shim offers
    /// them (auto), the virtio notify register (trap), or doorbells (fails
    /// when not offered). The summary and JSON say which path was taken.
    #[arg(long, value_enum, default_value_t = pingpong::Notify::Auto, help_heading = "Data path (experiment knobs)")]
    notify: pingpong::Notify,
    /// What carries the frames: each guest's virtio-net NIC on the shim's
    /// switch, or a direct channel the shim maps between the two guests
    /// (no exit and no host thread per frame; two guests; best with --rx poll).
    #[arg(long, value_enum, default_value_t = pingpong::Link::Switch, help_heading = "Data path (experiment knobs)")]
    link: pingpong::Link,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    json: Option<PathBuf>,
    /// Wall-clock limit in seconds for the whole run.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Output")]
    timeout: u64,
    /// Show every line the guests and the shim print.
    #[arg(long, short, help_heading = "Output")]
    verbose: bool,
}

#[derive(Debug, Args)]
struct NewArgs {
    /// The app's name (its crate, binary and folder): lowercase letters,
    /// digits, `-` and `_`.
    name: String,
    /// The folder to create it in.
    #[arg(long, value_name = "DIR", default_value = ".")]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Suites to run (default: all, in report order). `--list` shows them.
    #[arg(value_name = "SUITE")]
    suites: Vec<String>,
    /// Rounds per suite; every round measures each scenario once, interleaved.
    #[arg(long, default_value_t = bench::suite::DEFAULT_REPEATS, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: u32,
    /// Only regenerate docs/benchmarks.md from the results in target/bench/.
    #[arg(long, conflicts_with_all = ["suites", "no_report"])]
    report: bool,
    /// Run the suites but leave docs/benchmarks.md as it is.
    #[arg(long)]
    no_report: bool,
    /// List the suites and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// Run only this leg (repeatable); `--list` shows them.
    #[arg(long = "leg", value_name = "NAME")]
    legs: Vec<String>,
    /// Wall-clock limit in seconds for each QEMU run.
    #[arg(long, value_name = "SECS", default_value_t = qemu::DEFAULT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Show all output (every serial line, every cargo test line).
    #[arg(long, short)]
    verbose: bool,
    #[command(flatten)]
    on_failure: OnFailure,
    /// List the legs and exit.
    #[arg(long)]
    list: bool,
}

/// What a failing leg does to the rest of the run.
#[derive(Debug, Args)]
struct OnFailure {
    /// Stop after the first failing leg.
    #[arg(long, conflicts_with = "keep_going")]
    fail_fast: bool,
    /// Run every leg even if one fails (the default; accepted for clarity).
    #[arg(long)]
    keep_going: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sys::kill_children_on_signal();
    let result = match cli.command {
        Command::Build => build::build_all().map(|()| ExitCode::SUCCESS),
        Command::Qemu(args) => qemu_by_hand(&args),
        Command::Test(args) => test(&args),
        Command::New(args) => app::new::create(&args.name, &args.dir).map(|path| {
            println!("created {}", path.display());
            println!("run it: cargo xtask run --app {}", path.display());
            ExitCode::SUCCESS
        }),
        Command::Oci(args) => oci_image(&args).map(|()| ExitCode::SUCCESS),
        Command::Run(args) if args.app.is_some() => run_app(&args),
        Command::Run(args) if args.demo == DemoKind::Pipeline => {
            let opts = pipeline::Options {
                policy: args.policy,
                transfer: args.transfer,
                mib: args.mib,
                msg: args.msg,
                timeout: Duration::from_secs(args.timeout),
            };
            run::pipeline::run(&opts, args.json.as_deref(), args.verbose)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let opts = pingpong::Options {
                guests: args.guests,
                count: args.count,
                size: args.size,
                vcpus: args.vcpus,
                rx: args.rx,
                notify: args.notify,
                link: args.link,
                timeout: Duration::from_secs(args.timeout),
                client_irq_cpu: None,
                ..pingpong::Options::default()
            };
            run::pingpong::run(&opts, args.json.as_deref(), args.verbose)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            if args.list {
                for name in bench::runner::suite_names() {
                    println!("{name}");
                }
                Ok(ExitCode::SUCCESS)
            } else {
                bench::runner::run(&bench::runner::Options {
                    suites: args.suites,
                    repeats: args.repeats,
                    report_only: args.report,
                    no_report: args.no_report,
                })
                .map(|()| ExitCode::SUCCESS)
            }
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(e.exit_code())
    })
}

fn oci_image(args: &OciArgs) -> Result<()> {
    let (name, elf) = if let Some(dir) = &args.app {
        let elf = app::run::build(dir)?;
        (oci::name_of(&elf), elf)
    } else {
        let image = args.image.as_deref().unwrap_or_default();
        let (elf, _) = resolve_image(image)?;
        (oci::name_of(&elf), elf)
    };
    let output = args.output.clone().unwrap_or_else(|| {
        infra::workspace::target_dir()
            .join("oci")
            .join(format!("{name}.tar"))
    });
    let reference = args
        .reference
        .clone()
        .unwrap_or_else(|| oci::default_reference(&name));
    let digest = oci::write_image(&oci::Options {
        elf: elf.clone(),
        reference: reference.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory: args.memory.clone(),
        output: output.clone(),
    })?;
    println!(
        "oci: {} -> {} ({reference}, manifest {digest})",
        elf.display(),
        output.display()
    );
    println!("import it: ctr image import {}", output.display());
    println!(
        "run it:    ctr run --rm --runtime io.containerd.exitless.v1 {reference} ID [CMDLINE WORDS...]"
    );
    Ok(())
}

fn run_app(args: &RunArgs) -> Result<ExitCode> {
    let opts = app::run::Options {
        path: args.app.clone().unwrap_or_default(),
        vmm: if args.qemu {
            app::run::Vmm::Qemu
        } else {
            app::run::Vmm::Shim
        },
        cmdline: args.cmdline.clone(),
        hostfwd: args.hostfwd.clone(),
        vcpus: args.vcpus,
        timeout: Duration::from_secs(args.timeout),
        show: true,
        gdb: args.gdb,
    };
    let (exit, _) = app::run::boot(&opts)?;
    println!("app: {exit}");
    Ok(if exit.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn qemu_by_hand(args: &QemuArgs) -> Result<ExitCode> {
    let (image, default_append) = resolve_image(&args.image)?;
    if args.net == Net::None && !args.hostfwd.is_empty() {
        return Err(Error::usage("--hostfwd needs --net user"));
    }
    let cfg = qemu::Config {
        accel: args.accel,
        machine: args.machine,
        smp: args.smp,
        mem_mib: args.mem,
        image,
        append: args
            .append
            .clone()
            .unwrap_or_else(|| default_append.to_owned()),
        net: args.net,
        hostfwd: args.hostfwd.clone(),
        netdev: None,
        mac: None,
        nic_options: Vec::new(),
        extra_args: args.gdb.map(qemu::gdb_args).unwrap_or_default(),
        timeout: Duration::from_secs(args.timeout),
    };
    if let Some(port) = args.gdb {
        app::run::print_gdb_hint(port, &cfg.image, cfg.timeout);
    }
    let leg = format!("qemu-{}", args.accel.name());
    let image_name = cfg
        .image
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    let run = qemu::boot(&cfg, &format!("{leg}-{image_name}"), &Echo::All)?;
    let serial = run.serial();

    println!(
        "==== {leg}: {} on {} with {} CPUs",
        cfg.image.display(),
        cfg.machine.name(),
        cfg.smp
    );
    for report in &serial.reports {
        println!("{leg} report: {report}");
    }
    match serial.boot {
        Some((index, tsc_us)) => {
            let guest = tsc_us.map_or_else(
                || "no TSC figure on the line".to_owned(),
                |us| format!("{us} us after entry (TSC)"),
            );
            println!(
                "{leg}: boot time: main reached {:.3} s after QEMU start (wall); guest: {guest}",
                run.lines[index].at.as_secs_f64()
            );
        }
        None => println!(
            "{leg}: boot time: unknown, the guest never printed `{}`",
            serial::BOOT_MARKER
        ),
    }
    if !run.exit.passed() && !run.stderr.trim().is_empty() {
        println!("{leg}: QEMU stderr:\n{}", run.stderr.trim_end());
    }
    println!("{leg}: serial log: {}", run.log.display());
    println!(
        "{leg}: guest exit: {} after {:.1} s",
        run.exit,
        run.elapsed.as_secs_f64()
    );
    Ok(if run.exit.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A path (contains `/` or names an existing file) is booted as is; a name
/// is looked up in the image list and built. Returns the image's default
/// kernel command line too.
fn resolve_image(image: &str) -> Result<(PathBuf, &'static str)> {
    let path = PathBuf::from(image);
    if image.contains('/') || path.is_file() {
        if !path.is_file() {
            return Err(Error::failed(format!(
                "guest image {image} does not exist or is not a file"
            )));
        }
        return Ok((path, ""));
    }
    let known = build::find_image(image)?;
    Ok((build::build_guest(known)?, known.qemu_append))
}

fn test(args: &TestArgs) -> Result<ExitCode> {
    let legs = registry::select(&args.legs)?;
    if args.list {
        for leg in registry::LEGS {
            println!("{:<10} {}", leg.name(), leg.about());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = leg::Options {
        timeout: Duration::from_secs(args.timeout),
        verbose: args.verbose,
    };
    let mut legs_run = runner::Runner::default();
    let mut results = Vec::new();
    for leg in legs {
        let result = legs_run.run(leg, &opts);
        let failed = !result.outcome.ok();
        results.push(result);
        if failed && args.on_failure.fail_fast {
            println!("stopping after the first failing leg (--fail-fast)");
            break;
        }
    }
    for line in runner::summary_lines(&results) {
        println!("{line}");
    }
    Ok(ExitCode::from(runner::exit_code(&results)))
}
