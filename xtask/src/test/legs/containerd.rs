//! Leg `containerd`: containerd schedules Exitless guests through
//! `containerd-shim-exitless-v1`. A private containerd (its own root, state
//! directory, socket and config, the `native` snapshotter, the shim on its
//! PATH) imports an image made by `cargo xtask oci`; `ctr run` runs a guest
//! that prints and exits 0, one that refuses its command line (status 4),
//! two long-running ones (resources from ctr's flags and from an annotation)
//! that `ctr task kill` stops with SIGTERM (143) and SIGKILL (137), and a pod
//! sandbox that runs nothing until killed. Each run's task events must reach
//! containerd. Then containerd stops, and no containerd, shim or host shim of
//! this leg may be left running.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::infra::process::{self, Ending, Stderr};
use crate::infra::{setup, sys, workspace};
use crate::oci;
use crate::test::leg::{Images, Leg, LegRun, Options};

pub struct Containerd;

const RUNTIME: &str = "io.containerd.exitless.v1";
const NAMESPACE: &str = "exitless-test";
const REFERENCE: &str = "docker.io/exitless/tcp-echo-test:latest";
/// How long one `ctr` command or one wait for a task state may take.
const STEP: Duration = Duration::from_mins(1);

impl Leg for Containerd {
    fn name(&self) -> &'static str {
        "containerd"
    }

    fn about(&self) -> &'static str {
        "a private containerd runs tcp-echo guests through containerd-shim-exitless-v1: ctr run prints and exits 0, a refused command line exits 4, resources from --cpus/--memory-limit and annotations, ctr task kill stops long-running guests with 143 (SIGTERM) and 137 (SIGKILL), a pod sandbox runs nothing, task events reach containerd; nothing left running"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        if let Err(why) = setup::check_kvm() {
            return LegRun::broken(format!("cannot use KVM: {why}"));
        }
        let image = match images.get("tcp-echo") {
            Ok(image) => image,
            Err(e) => return LegRun::broken(e),
        };
        let tools = setup::ensure_tool("containerd", "containerd")
            .and_then(|c| Ok((c, setup::ensure_tool("ctr", "containerd")?)));
        let (containerd, ctr) = match tools {
            Ok(t) => t,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let dir = workspace::target_dir().join("xtask").join("containerd-leg");
        kill_leftovers(&dir);
        let log = match workspace::new_log_path("containerd") {
            Ok(l) => l,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let mut checks = Vec::new();
        let result = (|| {
            let bin = prepare(&dir, &image)?;
            let daemon = Daemon::start(&containerd, &dir, &bin, &log)?;
            let ctl = Ctl {
                ctr,
                socket: daemon.socket.clone(),
                verbose: opts.verbose,
            };
            scenario(&ctl, &mut checks);
            let stopped = daemon.stop();
            checks.push(("containerd stopped on SIGTERM".to_owned(), stopped.is_ok()));
            checks.push(forwarded_events(&log));
            Ok::<_, Error>(())
        })();
        // Shims exit a moment after containerd asks them to: give them 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut left = leftovers(&dir);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            left = leftovers(&dir);
        }
        for pid in &left {
            kill(*pid);
        }
        checks.push((
            format!(
                "no containerd, shim or host shim of this leg left running (found {})",
                left.len()
            ),
            left.is_empty(),
        ));
        if let Err(e) = result {
            return LegRun {
                log: Some(log),
                ..LegRun::broken(e.to_string())
            };
        }
        let _ = std::fs::remove_dir_all(&dir);
        LegRun::from_checks(&checks, Vec::new(), Some(log))
    }
}

/// Builds the two binaries, lays out the leg's folder, writes the image.
fn prepare(dir: &Path, image: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)
        .map_err(|e| Error::failed(format!("creating {}: {e}", bin.display())))?;
    let status = workspace::cargo()
        .args([
            "build",
            "--release",
            "-p",
            "host-shim",
            "-p",
            "containerd-shim-exitless",
        ])
        .status()
        .map_err(|e| Error::failed(format!("cannot run cargo build: {e}")))?;
    if !status.success() {
        return Err(Error::failed(format!(
            "cargo build -p host-shim -p containerd-shim-exitless failed ({status})"
        )));
    }
    let release = workspace::target_dir().join("release");
    // The shim finds host-shim next to its own (resolved) binary.
    for name in ["containerd-shim-exitless-v1", "host-shim"] {
        symlink(release.join(name), bin.join(name))
            .map_err(|e| Error::failed(format!("linking {name} into {}: {e}", bin.display())))?;
    }
    oci::write_image(&oci::Options {
        elf: image.to_path_buf(),
        reference: REFERENCE.into(),
        cmdline: "ip=10.0.0.2/24 serve.max_connections=0".into(),
        vcpus: Some(1),
        memory: Some("64M".into()),
        output: dir.join("image.tar"),
    })?;
    Ok(bin)
}

/// The leg's containerd; killed with everything it started when dropped.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(binary: &Path, dir: &Path, bin: &Path, log: &Path) -> Result<Self> {
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        // CRI is off (ctr needs none of it and it wants a CNI set-up); the
        // native snapshotter copies layers instead of stacking them, so it
        // works where overlayfs mounts are refused.
        let text = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[debug]\n  level = \"debug\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(&config, text)
            .map_err(|e| Error::failed(format!("writing {}: {e}", config.display())))?;
        let out = std::fs::File::create(log)
            .map_err(|e| Error::failed(format!("creating {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::failed(format!("{}: {e}", log.display())))?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        sys::contain(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Error::failed(format!("cannot start {}: {e}", binary.display())))?;
        let mut daemon = Self {
            child: Some(child),
            socket,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.socket.exists() {
            if let Some(c) = daemon.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                daemon.child = None;
                return Err(Error::failed(format!(
                    "containerd exited at start ({status}); see {}",
                    log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::failed(format!(
                    "containerd made no socket in 30 s; see {}",
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(daemon)
    }

    /// SIGTERM, then up to 20 s for containerd to exit.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::failed("containerd was not running"));
        };
        kill_with(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    sys::kill_group(child.id());
                    let _ = child.wait();
                    return Err(Error::failed("containerd ignored SIGTERM for 20 s"));
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sys::kill_group(child.id());
            let _ = child.wait();
        }
        for pid in leftovers(&self.dir) {
            kill(pid);
        }
    }
}

/// `ctr` against the leg's containerd.
struct Ctl {
    ctr: PathBuf,
    socket: PathBuf,
    verbose: bool,
}

/// What one `ctr` command did.
struct Ran {
    status: Option<i32>,
    output: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        if self.verbose {
            println!("containerd: ctr {}", args.join(" "));
        }
        match process::run(&mut cmd, STEP, Stderr::Merge, |l| {
            if self.verbose {
                println!("  {}", l.text);
            }
        }) {
            Ok(done) => Ran {
                status: match done.ending {
                    Ending::Exited(c) => Some(c),
                    Ending::Signalled(_) | Ending::TimedOut => None,
                },
                output: done
                    .lines
                    .iter()
                    .map(|l| l.text.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
            Err(e) => Ran {
                status: None,
                output: e.to_string(),
            },
        }
    }

    /// The task's (pid, status) from `ctr task ls`.
    fn task(&self, id: &str) -> Option<(u32, String)> {
        let ls = self.run(&["task", "ls"]);
        ls.output.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(id)).then_some(())?;
            let pid = words.next()?.parse().ok()?;
            Some((pid, words.next()?.to_owned()))
        })
    }

    /// Waits until the task's status is `want`; its pid then.
    fn await_status(&self, id: &str, want: &str) -> Option<u32> {
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            match self.task(id) {
                Some((pid, status)) if status == want => return Some(pid),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        None
    }
}

fn ok_status(ran: &Ran, want: i32) -> bool {
    ran.status == Some(want)
}

/// Long-running guests (no max_connections) stopped by `ctr task kill`.
fn long_running(ctl: &Ctl, run: &[&str], checks: &mut Vec<(String, bool)>) {
    // Long-running guests (no max_connections), with resources from ctr's
    // flags, and from an annotation, which wins over them.
    let runs: [(&str, &str, u32, &[&str], &str); 2] = [
        ("long-term", "SIGTERM", 143, &[], "vcpus=2,mem=128M,"),
        (
            "long-kill",
            "SIGKILL",
            137,
            &["--annotation", "io.exitless.vcpus=3"],
            "vcpus=3,mem=128M,",
        ),
    ];
    for (id, signal, want, extra, resources) in runs {
        let task_log = ctl.socket.with_file_name(format!("{id}.log"));
        let log_uri = format!("file://{}", task_log.display());
        let mut args = run.to_vec();
        args.extend(["-d", "--log-uri", &log_uri]);
        args.extend(["--cpus", "2", "--memory-limit", "134217728"]);
        args.extend(extra);
        args.extend([REFERENCE, id, "/kernel", "ip=10.0.0.3/24"]);
        let started = ctl.run(&args);
        let pid = ctl.await_status(id, "RUNNING");
        let cmdline = pid
            .and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        checks.push((
            format!(
                "{id}: ctr run -d {} starts a host shim with {resources}",
                extra.join(" ")
            ),
            ok_status(&started, 0) && cmdline.contains(resources),
        ));
        let status = kill_and_delete(ctl, id, signal);
        let gone = pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
        let console = std::fs::read_to_string(&task_log).unwrap_or_default();
        if status == Some(128 + 31) {
            println!(
                "containerd: {id}: the host shim died of SIGSYS: its seccomp filter refused a system call"
            );
        }
        checks.push((
            format!(
                "{id}: ctr task kill --signal {signal} stops it with exit status {want} (got {status:?}), its host shim is gone"
            ),
            status == Some(want) && gone,
        ));
        checks.push((
            format!("{id}: ctr run -d --log-uri file://…: the console reaches the file"),
            console.contains("tcp-echo: TCP echo on 7"),
        ));
    }
}

/// A Kubernetes pod sandbox ("pause" container): held, runs nothing.
fn pod_sandbox(ctl: &Ctl, run: &[&str], checks: &mut Vec<(String, bool)>) {
    let id = "pod-sandbox";
    let mut args = run.to_vec();
    args.extend([
        "-d",
        "--null-io",
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        REFERENCE,
        id,
        "/pause",
    ]);
    let started = ctl.run(&args);
    let running = ctl.await_status(id, "RUNNING").is_some();
    let status = kill_and_delete(ctl, id, "SIGKILL");
    checks.push((
        format!("a pod sandbox (CRI annotation) runs no guest, stays RUNNING until ctr task kill, then exits 137 (got {status:?})"),
        ok_status(&started, 0) && running && status == Some(137),
    ));
}

/// `ctr task kill` then delete and remove: the task's exit status (from
/// ctr's warning about a non-zero one) when every step worked.
fn kill_and_delete(ctl: &Ctl, id: &str, signal: &str) -> Option<u32> {
    let killed = ctl.run(&["task", "kill", "--signal", signal, id]);
    let stopped = ctl.await_status(id, "STOPPED");
    let deleted = ctl.run(&["task", "delete", id]);
    let removed = ctl.run(&["container", "rm", id]);
    let status = deleted.output.split("exit code ").nth(1).and_then(|rest| {
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    (ok_status(&killed, 0) && stopped.is_some() && ok_status(&removed, 0))
        .then_some(status)
        .flatten()
}

fn scenario(ctl: &Ctl, checks: &mut Vec<(String, bool)>) {
    let run = ["run", "--snapshotter", "native", "--runtime", RUNTIME];
    let tar = ctl.socket.with_file_name("image.tar");
    let import = ctl.run(&[
        "image",
        "import",
        "--snapshotter",
        "native",
        &tar.to_string_lossy(),
    ]);
    let listed = ctl.run(&["image", "ls", "-q"]);
    checks.push((
        format!("ctr image import takes the cargo xtask oci archive ({REFERENCE})"),
        ok_status(&import, 0) && listed.output.lines().any(|l| l.trim() == REFERENCE),
    ));
    if !checks.iter().all(|(_, ok)| *ok) {
        println!("containerd: import said: {}", import.output);
        return;
    }

    // A guest that prints and exits 0 on its own, the image's own Cmd.
    let hello = ctl.run(&[&run[..], &["--rm", REFERENCE, "hello"]].concat());
    checks.push((
        format!(
            "ctr run --rm: the guest's console is the task's stdout without the host shim's prefix, exit status 0 (got {:?})",
            hello.status
        ),
        ok_status(&hello, 0)
            && hello
                .output
                .lines()
                .any(|l| l.starts_with("report: tcp-echo served 0 connections")),
    ));

    // The guest's own non-zero exit status becomes the task's.
    let bad = ctl.run(
        &[
            &run[..],
            &["--rm", REFERENCE, "refused", "/kernel", "ip=bad"],
        ]
        .concat(),
    );
    checks.push((
        format!(
            "ctr run --rm with ip=bad: the guest refuses its configuration, the task exits 4 (got {:?})",
            bad.status
        ),
        ok_status(&bad, 4) && bad.output.contains("ip= wants"),
    ));

    long_running(ctl, &run, checks);
    pod_sandbox(ctl, &run, checks);
    shim_crash(ctl, &run, checks);
    let sockets: Vec<PathBuf> = [
        "hello",
        "refused",
        "long-term",
        "long-kill",
        "pod-sandbox",
        "shim-crash",
    ]
    .iter()
    .map(|id| shim_socket(&ctl.socket, id))
    .filter(|s| s.exists())
    .collect();
    checks.push((
        format!("every shim's socket is gone, the killed one's too (left: {sockets:?})"),
        sockets.is_empty(),
    ));
    let ls = ctl.run(&["task", "ls", "-q"]);
    checks.push((
        "no task left in containerd".into(),
        ok_status(&ls, 0) && ls.output.trim().is_empty(),
    ));
}

/// Where the shim for task `id` listens: containerd-shim's naming, a hash
/// of containerd's socket, the namespace and the id.
fn shim_socket(containerd: &Path, id: &str) -> PathBuf {
    let digest = oci::digest(format!("{}/{NAMESPACE}/{id}", containerd.display()).as_bytes());
    Path::new("/run/containerd/s").join(digest.trim_start_matches("sha256:"))
}

/// A shim killed under a running guest: containerd runs `shim delete` in
/// the bundle, which must stop the orphaned host shim.
fn shim_crash(ctl: &Ctl, run: &[&str], checks: &mut Vec<(String, bool)>) {
    let id = "shim-crash";
    let mut args = run.to_vec();
    args.extend([
        "-d",
        "--null-io",
        REFERENCE,
        id,
        "/kernel",
        "ip=10.0.0.4/24",
    ]);
    let started = ctl.run(&args);
    let host = ctl.await_status(id, "RUNNING");
    let needle = format!("\0-id\0{id}\0");
    let shim = leftovers(ctl.socket.parent().unwrap_or(Path::new("/")))
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let program = c.split(|b| *b == 0).next().unwrap_or_default();
                program.ends_with(b"containerd-shim-exitless-v1")
                    && c.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
        });
    if let Some(pid) = shim {
        kill(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let host_gone = |p: u32| !Path::new(&format!("/proc/{p}")).exists();
    while host.is_some_and(|p| !host_gone(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctl.run(&["task", "delete", id]);
    let removed = ctl.run(&["container", "rm", id]);
    checks.push((
        "a shim killed by SIGKILL under a running guest: containerd's clean-up (shim delete) stops the host shim".into(),
        ok_status(&started, 0)
            && shim.is_some()
            && host.is_some_and(host_gone)
            && ok_status(&removed, 0),
    ));
}

/// The five runs' task events, each forwarded by the shim: containerd's
/// debug log says `event forwarded` for what a shim published.
fn forwarded_events(log: &Path) -> (String, bool) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // The killed shim's run forwards only its create and start.
    let counts: Vec<(&str, usize)> = ["create", "start", "exit", "delete"]
        .into_iter()
        .map(|topic| {
            let needle = format!("msg=\"event forwarded\" ns={NAMESPACE} topic=/tasks/{topic} ");
            (topic, text.lines().filter(|l| l.contains(&needle)).count())
        })
        .collect();
    (
        format!(
            "the shims published TaskCreate, TaskStart (6 runs), TaskExit, TaskDelete (the 5 whose shim lived): {counts:?}"
        ),
        counts == [("create", 6), ("start", 6), ("exit", 5), ("delete", 5)],
    )
}

/// Processes whose command line names the leg's folder: the containerd,
/// shims and host shims this leg started (their sockets, bundles and stats
/// files are all under it).
fn leftovers(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// Kills what an interrupted earlier run of this leg left behind.
fn kill_leftovers(dir: &Path) {
    let left = leftovers(dir);
    if !left.is_empty() {
        let _ = writeln!(
            std::io::stdout(),
            "containerd: killing {} process(es) an earlier run left behind",
            left.len()
        );
    }
    for pid in left {
        kill(pid);
    }
}

fn kill(pid: u32) {
    kill_with(pid, libc::SIGKILL);
}

fn kill_with(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill has no memory-safety preconditions; the pid is one
        // of this leg's processes (found by its unique folder) or our child.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
