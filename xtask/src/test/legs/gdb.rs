//! Leg `gdb`: Debian's gdb drives the host shim's `--gdb` stub. The shim
//! runs the `ktest` image (2 vCPUs, `ktest.boot_only`) stopped before its
//! first instruction; gdb attaches, lists one thread per vCPU, breaks in the
//! application processor's ring-0 entry (`exitless_kmain_ap`), reads a
//! register (its CPU index) and a kernel static, writes both back and
//! forth, is refused an unmapped
//! address, single-steps, detaches, and
//! the guest then runs to its normal end. A raw client then sends the stub
//! malformed and hostile packets and hangs up: the guest still runs to its
//! end. A last session interrupts a
//! running `udp-pingpong` server with Ctrl-C (SIGINT to gdb, which sends
//! the stub its interrupt byte), lists its threads and kills it: the shim
//! stops. Then the application's main, which is ring-3 code, under the
//! shim (on `kvm_pvm` through the guest's forwarded debug traps): a
//! breakpoint there is hit in ring 3, a register and a static read, a
//! register written in the trap frame, a `stepi` stays in ring-3 code, a
//! second breakpoint is hit, and gdb detaches; a second session breaks in
//! the AP's ring-3 entry on thread 2, then continues from main to the
//! guest's own exit, which gdb reports. Last, the same
//! main through QEMU's stub under TCG (`cargo xtask run --app PATH --qemu
//! --gdb`). Each answer is checked in gdb's output.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::infra::process::{self, Stderr};
use crate::infra::{setup, sys};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::shim;

pub struct Gdb;

const GUEST: &str = "dbg";

impl Leg for Gdb {
    fn name(&self) -> &'static str {
        "gdb"
    }

    fn about(&self) -> &'static str {
        "gdb --batch against the shim's --gdb stub (ktest, 2 vCPUs): one thread per vCPU, a breakpoint in the AP's entry hit on thread 2, a register and a static read, an unmapped address refused, a single step, detach, then the guest exits 0; Ctrl-C stops a running guest and gdb's kill stops the shim; the app's main (ring 3) under the shim: breakpoint hit, registers read and written, stepi in ring 3, a second breakpoint, detach, a breakpoint in the AP's ring-3 entry hit on thread 2, and continue to the guest's exit; and against QEMU's stub (TCG): a breakpoint on the app's main hit in ring 3, a backtrace, a step, detach"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        let gdb = match setup::ensure_tool("gdb", "gdb") {
            Ok(p) => p,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let image = match images.get("ktest") {
            Ok(p) => p,
            Err(e) => return LegRun::broken(format!("building ktest: {e}")),
        };
        let shim_bin = match shim::build() {
            Ok(p) => p,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let guest = shim::Guest {
            name: GUEST.into(),
            image: image.clone(),
            vcpus: 2,
            mem_mib: 256,
            cmdline: "ktest.boot_only".into(),
        };
        let (shim_run, gdb_out) =
            with_stub(&shim_bin, guest, "gdb-shim", opts, |port| match port {
                Some(port) => run_gdb(&gdb, &image, port, opts.timeout),
                None => Err("the shim never listened for gdb".to_owned()),
            });
        let mut checks = Vec::new();
        let mut log = None;
        match &gdb_out {
            Ok(text) => {
                if opts.verbose {
                    println!("{text}");
                }
                checks.extend(judge_gdb(text));
            }
            Err(e) => checks.push((format!("gdb ran: {e}"), false)),
        }
        match shim_run {
            Ok(run) => {
                let exit = run.guest_exit(GUEST);
                checks.push((
                    format!("after detach the guest ran to its end and exited 0 ({exit})"),
                    exit.passed(),
                ));
                checks.push((
                    "the guest's console shows it finished booting after the session".into(),
                    shim::guest_lines(&run.lines, GUEST)
                        .iter()
                        .any(|l| l.contains("ktest: boot only, no test run")),
                ));
                log = Some(run.log.clone());
            }
            Err(e) => checks.push((format!("the shim ran: {e}"), false)),
        }
        if checks.iter().any(|(_, ok)| !ok)
            && let Ok(text) = &gdb_out
        {
            println!("gdb's output:\n{text}");
        }
        checks.extend(hostile_client(&shim_bin, &image, opts));
        match images.get("udp-pingpong") {
            Ok(server) => checks.extend(interrupt_and_kill(&gdb, &shim_bin, &server, opts)),
            Err(e) => checks.push((format!("building udp-pingpong: {e}"), false)),
        }
        checks.extend(app_main_under_shim(&gdb, &shim_bin, &image, opts));
        checks.extend(app_to_exit_under_shim(&gdb, &shim_bin, &image, opts));
        checks.extend(app_main_under_qemu(&gdb, &image, opts));
        LegRun::from_checks(&checks, Vec::new(), log)
    }
}

/// Where the image's ring-3-accessible part, and its `.text`, begins
/// (`guest-kernel/link.ld`): below it lie the kernel-private stubs and
/// tables, where a step into the guest's own #DB handler would land.
const USER_TEXT: u64 = 0x20_0000;

/// A ktest guest under the shim for the app sessions.
fn app_guest(image: &Path, name: &str) -> shim::Guest {
    shim::Guest {
        name: name.into(),
        image: image.to_path_buf(),
        vcpus: 2,
        mem_mib: 256,
        cmdline: "ktest.boot_only".into(),
    }
}

/// The app's main under the shim: on this host's KVM (`kvm_pvm`) ring-3
/// #DB and #BP reach the guest, not the host, and the guest's kernel hands
/// them to the shim (`Call::DebugTrap`); elsewhere the debug exits do it.
/// Breakpoint on `exitless_app_main` hit in ring 3, RSP and a static read,
/// R11 written and read back (in the trap frame), `stepi` moves RIP and
/// stays in ring-3 text, a second breakpoint (`Cmdline::flag`, called from
/// main) is hit in ring 3 too, detach, and the guest runs to exit 0.
fn app_main_under_shim(
    gdb: &Path,
    shim_bin: &Path,
    image: &Path,
    opts: &Options,
) -> Vec<(String, bool)> {
    const NAME: &str = "app";
    let script = [
        "break exitless_app_main".to_owned(),
        "continue".to_owned(),
        // gdb names the inlined `main`; the symbol is the app's entry.
        "info symbol $pc".to_owned(),
        "printf \"check-cs=%d\\n\", $cs".to_owned(),
        "printf \"check-rsp=%lu\\n\", $rsp".to_owned(),
        "set language c".to_owned(),
        "printf \"check-tsc=%lu\\n\", *(unsigned long *)&exitless_tsc_at_entry".to_owned(),
        "set $saved_r11 = $r11".to_owned(),
        "set $r11 = 0x5a5a5a".to_owned(),
        "printf \"check-r11=%lu\\n\", $r11".to_owned(),
        "set $r11 = $saved_r11".to_owned(),
        "printf \"check-pc0=%lu\\n\", $pc".to_owned(),
        "stepi".to_owned(),
        "printf \"check-pc1=%lu\\n\", $pc".to_owned(),
        "printf \"check-cs1=%d\\n\", $cs".to_owned(),
        "break guest_kernel::cmdline::Cmdline::flag".to_owned(),
        "continue".to_owned(),
        "printf \"check-cs2=%d\\n\", $cs".to_owned(),
        "delete".to_owned(),
        "detach".to_owned(),
    ];
    let (shim_run, out) = shim_app_session(gdb, shim_bin, image, NAME, &script, opts);
    let text = match out {
        Ok(t) => t,
        Err(e) => return vec![(format!("shim app session: gdb ran: {e}"), false)],
    };
    if opts.verbose {
        println!("{text}");
    }
    let mut checks = judge_app_session(&text);
    checks.push(guest_exit_check("shim app session", NAME, shim_run));
    print_on_failure("shim app session", &checks, &text);
    checks
}

/// One gdb session running `script` against the shim's stub on the app
/// guest `name`: the shim's run and gdb's output.
fn shim_app_session(
    gdb: &Path,
    shim_bin: &Path,
    image: &Path,
    name: &str,
    script: &[String],
    opts: &Options,
) -> (crate::error::Result<shim::Run>, Result<String, String>) {
    with_stub(
        shim_bin,
        app_guest(image, name),
        &format!("gdb-shim-{name}"),
        opts,
        |port| match port {
            Some(port) => gdb_batch(gdb, image, port, script, opts.timeout),
            None => Err("the shim never listened for gdb".to_owned()),
        },
    )
}

/// After a session: guest `name` ran on to its own end and exited 0.
fn guest_exit_check(
    session: &str,
    name: &str,
    shim_run: crate::error::Result<shim::Run>,
) -> (String, bool) {
    match shim_run {
        Ok(run) => {
            let exit = run.guest_exit(name);
            (
                format!("{session}: the guest ran to its end and exited 0 ({exit})"),
                exit.passed(),
            )
        }
        Err(e) => (format!("{session}: the shim ran: {e}"), false),
    }
}

/// Prints gdb's output when a check of `session` failed.
fn print_on_failure(session: &str, checks: &[(String, bool)], text: &str) {
    if checks.iter().any(|(_, ok)| !ok) {
        println!("gdb's output ({session}):\n{text}");
    }
}

/// `info symbol $pc` named function `func`: "FUNC in section …" or
/// "FUNC + OFFSET in section …" (a stop may be reported in code inlined
/// into it, under another name).
fn stopped_in(text: &str, func: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(func).is_some_and(|r| r.starts_with(' ')) && l.contains(" in section ")
    })
}

/// The `check-NAME` value printed is a code selector with RPL 3.
fn ring3(text: &str, name: &str) -> bool {
    value(text, name).is_some_and(|c| c & 3 == 3)
}

/// One check per answer of the shim app session.
fn judge_app_session(text: &str) -> Vec<(String, bool)> {
    let ring3 = |name: &str| ring3(text, name);
    let (pc0, pc1) = (value(text, "pc0"), value(text, "pc1"));
    vec![
        (
            "shim app session: the breakpoint on the app's main (exitless_app_main) was hit".into(),
            text.contains("hit Breakpoint 1") && stopped_in(text, "exitless_app_main"),
        ),
        (
            format!(
                "shim app session: it stopped in ring 3 (CS RPL {:?})",
                value(text, "cs").map(|c| c & 3)
            ),
            ring3("cs"),
        ),
        (
            format!(
                "shim app session: RSP is ring 3's stack ({:?}), the static exitless_tsc_at_entry reads non-zero ({:?})",
                value(text, "rsp"),
                value(text, "tsc")
            ),
            value(text, "rsp").is_some_and(|v| v >= USER_TEXT)
                && value(text, "tsc").is_some_and(|v| v > 0),
        ),
        (
            format!(
                "shim app session: a ring-3 register write reads back (R11 = 0x5a5a5a: {:?})",
                value(text, "r11")
            ),
            value(text, "r11") == Some(0x5a_5a5a),
        ),
        (
            // The first instruction may be a jump or call: any move counts,
            // as long as it stays in ring-3 text.
            format!(
                "shim app session: stepi moved RIP in ring 3 and stayed in app text ({pc0:?} -> {pc1:?}, CS RPL {:?})",
                value(text, "cs1").map(|c| c & 3)
            ),
            pc0.zip(pc1).is_some_and(|(a, b)| a != b && b >= USER_TEXT) && ring3("cs1"),
        ),
        (
            "shim app session: a second ring-3 breakpoint (Cmdline::flag) was hit after the step"
                .into(),
            text.contains("hit Breakpoint 2") && text.contains("Cmdline::flag") && ring3("cs2"),
        ),
        (
            "shim app session: gdb detached".into(),
            text.contains("[Inferior 1 (process 1) detached]"),
        ),
    ]
}

/// Ring 3 on the second vCPU, then from the app's main to the guest's own
/// end: break in the AP's ring-3 entry (`exitless_user_ap`, thread 2),
/// then on main (thread 1), delete, continue; gdb reports the guest's exit
/// status as a process's (`exited normally` for 0).
fn app_to_exit_under_shim(
    gdb: &Path,
    shim_bin: &Path,
    image: &Path,
    opts: &Options,
) -> Vec<(String, bool)> {
    const NAME: &str = "app-exit";
    let script = [
        "break exitless_user_ap".to_owned(),
        "continue".to_owned(),
        // The stop may be reported in code inlined into the function:
        // name the function the PC is in.
        "info symbol $pc".to_owned(),
        "printf \"check-apcs=%d\\n\", $cs".to_owned(),
        "printf \"check-aprsp=%lu\\n\", $rsp".to_owned(),
        "delete".to_owned(),
        "break exitless_app_main".to_owned(),
        "continue".to_owned(),
        "delete".to_owned(),
        "continue".to_owned(),
    ];
    let (shim_run, out) = shim_app_session(gdb, shim_bin, image, NAME, &script, opts);
    let text = out.unwrap_or_else(|e| format!("(gdb: {e})"));
    let mut checks = vec![
        (
            format!(
                "shim app session 2: a breakpoint in the AP's ring-3 entry (exitless_user_ap) was hit on thread 2, in ring 3 (CS RPL {:?}) on ring 3's stack ({:?})",
                value(&text, "apcs").map(|c| c & 3),
                value(&text, "aprsp")
            ),
            text.contains("Thread 2 hit Breakpoint 1")
                && stopped_in(&text, "exitless_user_ap")
                && ring3(&text, "apcs")
                && value(&text, "aprsp").is_some_and(|v| v >= USER_TEXT),
        ),
        (
            "shim app session 2: main hit on thread 1, then continue ran the guest to its exit, reported to gdb (`exited normally`)".into(),
            text.contains("Thread 1 hit Breakpoint 2")
                && text.contains("[Inferior 1 (process 1) exited normally]"),
        ),
    ];
    checks.push(guest_exit_check("shim app session 2", NAME, shim_run));
    print_on_failure("shim app session 2", &checks, &text);
    checks
}

/// The same main through QEMU's stub under TCG, as `cargo xtask run --app
/// PATH --qemu --gdb PORT` does. Breakpoint on `exitless_app_main`, hit in
/// ring 3 (CS's RPL 3), a backtrace, a single step, detach, and the guest
/// runs to its end.
fn app_main_under_qemu(gdb: &Path, image: &Path, opts: &Options) -> Vec<(String, bool)> {
    use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};
    let port = free_port();
    let cfg = qemu::Config {
        accel: Accel::Tcg,
        machine: Machine::Q35,
        smp: 2,
        mem_mib: 256,
        image: image.to_path_buf(),
        append: "ktest.boot_only".into(),
        net: Net::User,
        hostfwd: Vec::new(),
        netdev: None,
        mac: None,
        nic_options: Vec::new(),
        extra_args: qemu::gdb_args(port),
        timeout: opts.timeout,
    };
    let script = [
        "hbreak exitless_app_main".to_owned(),
        "continue".to_owned(),
        "printf \"check-cs=%d\\n\", $cs".to_owned(),
        "bt 3".to_owned(),
        "printf \"check-pc0=%lu\\n\", $pc".to_owned(),
        "stepi".to_owned(),
        "printf \"check-pc1=%lu\\n\", $pc".to_owned(),
        "printf \"check-cs1=%d\\n\", $cs".to_owned(),
        "delete".to_owned(),
        "detach".to_owned(),
    ];
    let (run, out) = std::thread::scope(|s| {
        let vm = s.spawn(|| qemu::boot(&cfg, "gdb-qemu-app", &Echo::Quiet));
        let out = if wait_listening(port, Duration::from_mins(1)) {
            gdb_batch(gdb, image, port, &script, opts.timeout)
        } else {
            Err(format!("QEMU never listened on 127.0.0.1:{port}"))
        };
        let run = vm
            .join()
            .unwrap_or_else(|_| Err(crate::error::Error::failed("the QEMU thread panicked")));
        (run, out)
    });
    let text = match out {
        Ok(t) => t,
        Err(e) => return vec![(format!("QEMU app session: gdb ran: {e}"), false)],
    };
    let (pc0, pc1) = (value(&text, "pc0"), value(&text, "pc1"));
    let checks = vec![
        (
            "QEMU (TCG) app session: the breakpoint on the app's main (exitless_app_main) was hit".into(),
            text.contains("exitless_app_main") && text.contains("Breakpoint 1"),
        ),
        (
            format!(
                "QEMU app session: it stopped in ring 3 (CS RPL {:?})",
                value(&text, "cs").map(|c| c & 3)
            ),
            ring3(&text, "cs"),
        ),
        (
            "QEMU app session: the backtrace names the runtime's caller (#1 in the ring-3 start code)".into(),
            text.lines().any(|l| l.trim_start().starts_with("#1 ")),
        ),
        (
            // The first instruction may be a jump or call: any move counts.
            format!(
                "QEMU app session: stepi executed one instruction, still in ring 3 (RIP {pc0:?} -> {pc1:?}, CS RPL {:?})",
                value(&text, "cs1").map(|c| c & 3)
            ),
            pc0.zip(pc1).is_some_and(|(a, b)| a != b) && ring3(&text, "cs1"),
        ),
        (
            "QEMU app session: gdb detached".into(),
            text.contains("detached"),
        ),
        (
            format!(
                "QEMU app session: the guest then ran to its end ({})",
                run.as_ref()
                    .map_or_else(ToString::to_string, |r| format!("{:?}", r.exit))
            ),
            run.as_ref().is_ok_and(|r| r.exit.passed()),
        ),
    ];
    print_on_failure("QEMU app session", &checks, &text);
    checks
}

/// The second session: Ctrl-C stops a guest that would run forever, gdb's
/// `kill` stops the shim.
fn interrupt_and_kill(
    gdb: &Path,
    shim_bin: &Path,
    image: &Path,
    opts: &Options,
) -> Vec<(String, bool)> {
    const NAME: &str = "srv";
    let guest = shim::Guest {
        name: NAME.into(),
        image: image.to_path_buf(),
        vcpus: 2,
        mem_mib: 256,
        cmdline: "pingpong.role=server ip=10.0.0.1/24".into(),
    };
    let (shim_run, out) = with_stub(shim_bin, guest, "gdb-interrupt", opts, |port| match port {
        Some(port) => interrupt_session(gdb, image, port, opts.timeout),
        None => Err("the shim never listened for gdb".to_owned()),
    });
    let text = out.unwrap_or_else(|e| format!("(gdb: {e})"));
    if opts.verbose {
        println!("{text}");
    }
    let has = |s: &str| text.contains(s);
    let mut checks = vec![
        (
            "Ctrl-C stopped the running guest (`received signal SIGINT`)".into(),
            has("received signal SIGINT"),
        ),
        (
            "after the interrupt both vCPUs are listed".into(),
            has("Thread 1.1") && has("Thread 1.2"),
        ),
        (
            "gdb sent its kill (`Kill the program being debugged`)".into(),
            has("Kill the program being debugged"),
        ),
    ];
    match shim_run {
        Ok(run) => checks.push((
            "the shim stopped on gdb's kill, not at its --timeout".into(),
            run.stderr.contains("gdb asked to kill") && !run.stderr.contains("--timeout"),
        )),
        Err(e) => checks.push((format!("the shim ran: {e}"), false)),
    }
    print_on_failure("interrupt session", &checks, &text);
    checks
}

/// gdb continues the guest; after 3 s it gets SIGINT, as from Ctrl-C at its
/// terminal, lists the threads and kills the guest.
fn interrupt_session(
    gdb: &Path,
    image: &Path,
    port: u16,
    limit: Duration,
) -> Result<String, String> {
    let mut cmd = Command::new(gdb);
    cmd.args(["--batch", "-nx", "-ex"])
        .arg(format!("target remote 127.0.0.1:{port}"))
        .args(["-ex", "continue", "-ex", "info threads", "-ex", "kill"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::contain(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("cannot start gdb: {e}"))?;
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let end = Instant::now() + limit;
    while !waiter.is_finished() {
        if Instant::now() > end {
            sys::kill_group(pid);
            let _ = waiter.join();
            return Err(format!("gdb did not end within {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = waiter
        .join()
        .map_err(|_| "the gdb waiter panicked".to_owned())?
        .map_err(|e| format!("waiting for gdb: {e}"))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Packets a broken or hostile gdb client might send, each well framed
/// (`$...#cs`) so that the stub parses it: unmapped and absurd memory
/// ranges, a fifth breakpoint, a thread that does not exist, short register
/// data, an absurd read of the target description, bad hex, a step with no
/// thread; then garbage framing.
const HOSTILE: &[&[u8]] = &[
    b"m700000000000,8",
    b"mffffffffffffffff,ffffffff",
    b"Z0,1000,1",
    b"Z0,2000,1",
    b"Z0,3000,1",
    b"Z0,4000,1",
    b"Z0,5000,1",
    b"Hgp1.9",
    b"g",
    b"Hgp1.1",
    b"qXfer:features:read:target.xml:0,ffffffff",
    // gdbstub ends the session on these (registers too short, a malformed
    // command): last.
    b"G0011",
    b"M100180,4:zzzzzzzz",
    b"vCont;s",
];

/// The packets of [`HOSTILE`] before the first that ends the session: each
/// gets a reply.
const HOSTILE_ANSWERED: usize = 11;

/// A raw client sends [`HOSTILE`] and hangs up: the shim must neither panic
/// nor stop, and the guest runs to its end.
fn hostile_client(shim_bin: &Path, image: &Path, opts: &Options) -> Vec<(String, bool)> {
    use std::io::{Read, Write};
    const NAME: &str = "hostile";
    let guest = shim::Guest {
        name: NAME.into(),
        image: image.to_path_buf(),
        vcpus: 2,
        mem_mib: 256,
        cmdline: "ktest.boot_only".into(),
    };
    let (shim_run, answers) = with_stub(shim_bin, guest, "gdb-hostile", opts, |port| {
        let mut answers = 0usize;
        if let Some(port) = port
            && let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port))
        {
            let _ = c.set_read_timeout(Some(Duration::from_millis(300)));
            let mut buf = [0u8; 4096];
            for body in HOSTILE {
                let sum = body.iter().fold(0u8, |a, &b| a.wrapping_add(b));
                let mut packet = b"$".to_vec();
                packet.extend_from_slice(body);
                packet.extend_from_slice(format!("#{sum:02x}").as_bytes());
                if c.write_all(&packet).is_err() {
                    break;
                }
                // Replies start with '$' (acks are '+').
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // A few bytes per reply: a crate for counting them
                    // would be more than the job.
                    #[allow(clippy::naive_bytecount)]
                    let replies = buf[..n].iter().filter(|&&b| b == b'$').count();
                    answers += replies;
                }
            }
            let _ = c.write_all(b"$\xff\xfe#zz+-+$#00");
        }
        answers
    });
    let mut checks = vec![(
        format!(
            "the stub answered every hostile packet before the session-ending ones ({answers} replies, {HOSTILE_ANSWERED} expected)"
        ),
        answers >= HOSTILE_ANSWERED,
    )];
    match shim_run {
        Ok(run) => {
            let exit = run.guest_exit(NAME);
            checks.push((
                format!("after a hostile gdb client hung up, the guest ran to its end and exited 0 ({exit})"),
                exit.passed(),
            ));
            checks.push((
                "the shim did not panic on what the client sent".into(),
                !run.stderr.contains("panicked"),
            ));
        }
        Err(e) => checks.push((format!("the shim ran: {e}"), false)),
    }
    checks
}

/// Runs `image` alone under the shim with `--gdb` on a free port (`label`
/// names its log), waits until the stub listens, and runs `session` against
/// that port while the shim runs; the shim's run and the session's result.
/// `session` gets `None` if the stub never listened.
fn with_stub<T>(
    shim_bin: &Path,
    guest: shim::Guest,
    label: &str,
    opts: &Options,
    session: impl FnOnce(Option<u16>) -> T,
) -> (crate::error::Result<shim::Run>, T) {
    let port = free_port();
    let extra = vec!["--gdb".to_owned(), port.to_string()];
    let verbose = opts.verbose;
    std::thread::scope(|s| {
        let shim_thread = s.spawn(|| {
            shim::run(
                &shim_bin.to_path_buf(),
                &[guest],
                &extra,
                opts.timeout,
                label,
                |l| {
                    if verbose {
                        println!("{l}");
                    }
                },
            )
        });
        let out = session(wait_listening(port, Duration::from_mins(1)).then_some(port));
        let run = shim_thread
            .join()
            .unwrap_or_else(|_| Err(crate::error::Error::failed("the shim thread panicked")));
        (run, out)
    })
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(23_456, |a| a.port())
}

/// Waits until something listens on 127.0.0.1:`port`, read from
/// /proc/net/tcp: a test connection would use up the stub's one session.
fn wait_listening(port: u16, within: Duration) -> bool {
    let want = format!("0100007F:{port:04X}");
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok(table) = std::fs::read_to_string("/proc/net/tcp")
            && table.lines().any(|l| {
                let mut cols = l.split_whitespace();
                cols.nth(1) == Some(want.as_str()) && cols.nth(1) == Some("0A")
            })
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The session, as one gdb batch run; its whole output.
fn run_gdb(gdb: &Path, image: &Path, port: u16, timeout: Duration) -> Result<String, String> {
    let script = [
        "info threads".to_owned(),
        "break exitless_kmain_ap".to_owned(),
        "continue".to_owned(),
        "printf \"check-rdi=%d\\n\", $rdi".to_owned(),
        // The image is Rust; the cast reads best in C.
        "set language c".to_owned(),
        "printf \"check-tsc=%lu\\n\", *(unsigned long *)&exitless_tsc_at_entry".to_owned(),
        // Writes, each read back and undone: a register and kernel memory.
        "set $saved_r11 = $r11".to_owned(),
        "set $r11 = 0x5a5a5a".to_owned(),
        "printf \"check-r11=%lu\\n\", $r11".to_owned(),
        "set $r11 = $saved_r11".to_owned(),
        "set $saved_tsc = *(unsigned long *)&exitless_tsc_at_entry".to_owned(),
        "set *(unsigned long *)&exitless_tsc_at_entry = 4242".to_owned(),
        "printf \"check-written=%lu\\n\", *(unsigned long *)&exitless_tsc_at_entry".to_owned(),
        "set *(unsigned long *)&exitless_tsc_at_entry = $saved_tsc".to_owned(),
        "printf \"check-restored=%lu\\n\", *(unsigned long *)&exitless_tsc_at_entry".to_owned(),
        // Canonical but outside the guest's page tables (they map 0-4 GiB).
        "x/gx 0x700000000000".to_owned(),
        "printf \"check-pc0=%lu\\n\", $pc".to_owned(),
        "stepi".to_owned(),
        "printf \"check-pc1=%lu\\n\", $pc".to_owned(),
        "delete".to_owned(),
        "detach".to_owned(),
    ];
    gdb_batch(gdb, image, port, &script, timeout)
}

/// `gdb --batch` on `image`, attached to the stub at 127.0.0.1:`port`
/// (no pager, no questions), then running `script`; its whole output.
fn gdb_batch(
    gdb: &Path,
    image: &Path,
    port: u16,
    script: &[String],
    timeout: Duration,
) -> Result<String, String> {
    let mut cmd = Command::new(gdb);
    cmd.args(["--batch", "-nx"]);
    let attach = [
        "set pagination off".to_owned(),
        "set confirm off".to_owned(),
        format!("target remote 127.0.0.1:{port}"),
    ];
    for line in attach.iter().chain(script) {
        cmd.arg("-ex").arg(line);
    }
    cmd.arg(image);
    let finished =
        process::run(&mut cmd, timeout, Stderr::Merge, |_| {}).map_err(|e| e.to_string())?;
    Ok(finished
        .lines
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The number gdb printed after `check-NAME=`.
fn value(text: &str, name: &str) -> Option<u64> {
    let key = format!("check-{name}=");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&key)?.trim().parse().ok())
}

/// One check per answer of the session.
fn judge_gdb(text: &str) -> Vec<(String, bool)> {
    let has = |s: &str| text.contains(s);
    let pc0 = value(text, "pc0");
    let pc1 = value(text, "pc1");
    let step = pc0.zip(pc1).map(|(a, b)| b.wrapping_sub(a));
    vec![
        (
            "gdb attached to a guest still at its first instruction (exitless_pvh_start)".into(),
            text.lines()
                .next()
                .is_some_and(|l| l.contains("in exitless_pvh_start")),
        ),
        (
            "`info threads` lists one thread per vCPU (Thread 1.1, Thread 1.2)".into(),
            has("Thread 1.1") && has("Thread 1.2") && !has("Thread 1.3"),
        ),
        (
            "the breakpoint in exitless_kmain_ap was hit on thread 2 (vCPU 1)".into(),
            has("Thread 2 hit Breakpoint 1") && has("exitless_kmain_ap"),
        ),
        (
            format!(
                "RDI, the AP's CPU index, reads 1 ({:?})",
                value(text, "rdi")
            ),
            value(text, "rdi") == Some(1),
        ),
        (
            format!(
                "the kernel static exitless_tsc_at_entry reads non-zero ({:?})",
                value(text, "tsc")
            ),
            value(text, "tsc").is_some_and(|v| v > 0),
        ),
        (
            format!(
                "a register write reads back (R11 = 0x5a5a5a: {:?})",
                value(text, "r11")
            ),
            value(text, "r11") == Some(0x5a_5a5a),
        ),
        (
            format!(
                "a memory write reads back (4242: {:?}) and the old value is restored ({:?})",
                value(text, "written"),
                value(text, "restored")
            ),
            value(text, "written") == Some(4242)
                && value(text, "restored").is_some()
                && value(text, "restored") == value(text, "tsc"),
        ),
        (
            format!("stepi moved RIP by one instruction, 1 to 15 bytes ({step:?})"),
            step.is_some_and(|d| (1..=15).contains(&d)),
        ),
        (
            "an unmapped address is refused: `Cannot access memory at address 0x700000000000`"
                .into(),
            has("Cannot access memory at address 0x700000000000"),
        ),
        (
            "gdb detached".into(),
            has("[Inferior 1 (process 1) detached]"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::{judge_app_session, judge_gdb, value};

    #[test]
    fn an_app_session_that_never_reached_ring_3_fails_its_checks() {
        // What the shim's stub gave before ring-3 traps were forwarded: the
        // breakpoint never hit, the guest ran to its end.
        let checks = judge_app_session(
            "Breakpoint 1 at 0x22c899: file guest-kernel/src/lib.rs, line 46.\n\
             Program terminated with signal SIGKILL, Killed.\n",
        );
        assert!(checks.iter().all(|(_, ok)| !ok), "{checks:?}");
        // A step that lands in the guest's own #DB handler (ring 0, below
        // the ring-3 text) fails the step check.
        let checks = judge_app_session("check-pc0=2279577\ncheck-pc1=1064976\ncheck-cs1=8\n");
        assert!(!checks[4].1, "{checks:?}");
    }

    #[test]
    fn a_session_missing_its_answers_fails_every_check_it_misses() {
        let checks = judge_gdb("0x0000000000100180 in exitless_pvh_start ()\ncheck-rdi=0\n");
        assert!(checks[0].1);
        assert!(checks[1..].iter().all(|(_, ok)| !ok), "{checks:?}");
        assert_eq!(value("  check-pc0=42 \n", "pc0"), Some(42));
        assert_eq!(value("check-pc0=x", "pc0"), None);
    }
}
