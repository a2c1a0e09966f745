//! The runtime v2 task service: one guest per task, each under its own
//! host-shim child.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    KillRequest, PidsRequest, PidsResponse, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, DeleteResponse, ExitSignal, TtrpcContext, TtrpcResult};
use log::{error, info, warn};

use crate::exit::task_exit_status;
use crate::guest::{self, Running, Sink};
use crate::spec::GuestSpec;

/// The file in the bundle the host shim writes its report to.
pub const STATS_FILE: &str = "exitless-stats.json";
/// Where containerd-shim (the crate) puts every shim's socket.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// The file in the bundle holding the host shim's pid, for `delete` after a crash.
pub const PID_FILE: &str = "exitless-host-shim.pid";

fn rpc_error(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// Where a task is in its life.
#[derive(Debug)]
enum Phase {
    Created {
        stdout: Sink,
        stderr: Sink,
    },
    Running {
        guest: Running,
        signal_sent: Option<i32>,
    },
    /// A started pod sandbox: nothing runs, the shim's own pid stands for it.
    Holding,
    Stopped {
        pid: u32,
        status: u32,
        at: Timestamp,
    },
}

/// What a task runs.
#[derive(Debug)]
enum What {
    /// A guest ELF (its path resolved in the root filesystem).
    Guest { spec: GuestSpec, kernel: PathBuf },
    /// A Kubernetes pod sandbox (the CRI's "pause" container): there is no
    /// process to hold the pod's namespaces, since guests use none of them,
    /// so it only lives until it is killed.
    Sandbox,
}

/// One container's guest.
#[derive(Debug)]
struct Task {
    id: String,
    bundle: String,
    stdin: String,
    stdout: String,
    stderr: String,
    what: What,
    /// The rootfs this shim mounted (and unmounts at delete), if any.
    mounted: Option<PathBuf>,
    /// Held so a writer to the stdin FIFO never blocks on a missing reader.
    _stdin: Option<File>,
    phase: Mutex<Phase>,
    changed: Condvar,
}

impl Task {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        // A panic while holding the lock is a bug; the phase is still
        // meaningful, so carry on rather than wedge containerd.
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stats_path(&self) -> PathBuf {
        Path::new(&self.bundle).join(STATS_FILE)
    }
}

/// The shim's state, shared by the ttrpc handler threads.
pub struct Service {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    tasks: Arc<Mutex<HashMap<String, Arc<Task>>>>,
}

impl Service {
    pub fn new(namespace: String, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> Self {
        Self {
            namespace,
            exit,
            publisher: Arc::new(publisher),
            tasks: Arc::default(),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn task(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Task>> {
        if !exec_id.is_empty() {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                "exec is not supported: a guest has one process",
            ));
        }
        self.tasks()
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("task {id} not found")))
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event);
    }
}

/// Reads and checks a new task's spec, root filesystem and stdio.
fn create_task(req: &CreateTaskRequest) -> Result<Task, String> {
    let config = Path::new(&req.bundle).join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config)
        .map_err(|e| format!("reading {}: {e}", config.display()))?;
    let sandbox = crate::spec::is_sandbox(&spec);
    let spec = if sandbox {
        None
    } else {
        Some(GuestSpec::from_oci(&spec).map_err(|e| e.to_string())?)
    };
    if req.terminal {
        return Err(
            "a terminal was asked for: guests have a serial console, not a TTY; run without -t"
                .into(),
        );
    }
    if !req.checkpoint.is_empty() {
        return Err("restoring from a checkpoint is not supported".into());
    }
    let (rootfs, mounted) = rootfs(&req.bundle, &req.rootfs)?;
    let what = match spec {
        None => What::Sandbox,
        Some(spec) => match guest::resolve_kernel(&rootfs, &spec.kernel) {
            Ok(kernel) => What::Guest { spec, kernel },
            Err(e) => {
                if let Some(m) = &mounted {
                    unmount(m);
                }
                return Err(e.to_string());
            }
        },
    };
    let io = (|| {
        let stdin = guest::open_stdin(&req.stdin)?;
        let stdout = Sink::open("stdout", &req.stdout)?;
        let stderr = Sink::open("stderr", &req.stderr)?;
        Ok::<_, guest::GuestError>((stdin, stdout, stderr))
    })();
    let (stdin, stdout, stderr) = match io {
        Ok(io) => io,
        Err(e) => {
            if let Some(m) = &mounted {
                unmount(m);
            }
            return Err(e.to_string());
        }
    };
    Ok(Task {
        id: req.id.clone(),
        bundle: req.bundle.clone(),
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        what,
        mounted,
        _stdin: stdin,
        phase: Mutex::new(Phase::Created { stdout, stderr }),
        changed: Condvar::new(),
    })
}

fn publish(publisher: &RemotePublisher, namespace: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher.publish(Context::default(), topic, namespace, event) {
        error!("publishing {topic}: {e}");
    }
}

/// The directory holding the container's files. A single bind mount (the
/// `native` snapshotter's) is read in place; other mounts (overlay) are
/// mounted on the bundle's `rootfs`, which needs CAP_SYS_ADMIN.
fn rootfs(
    bundle: &str,
    mounts: &[containerd_shim::protos::types::mount::Mount],
) -> Result<(PathBuf, Option<PathBuf>), String> {
    let target = Path::new(bundle).join("rootfs");
    match mounts {
        [] => Ok((target, None)),
        [m] if m.type_ == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            Ok((PathBuf::from(&m.source), None))
        }
        _ => {
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("creating {}: {e}", target.display()))?;
            for (i, m) in mounts.iter().enumerate() {
                if let Err(e) = containerd_shim::mount::mount_rootfs(
                    Some(&m.type_),
                    Some(&m.source),
                    &m.options,
                    &target,
                ) {
                    if i > 0 {
                        unmount(&target);
                    }
                    return Err(format!(
                        "mounting the rootfs ({} {}) on {}: {e}",
                        m.type_,
                        m.source,
                        target.display()
                    ));
                }
            }
            Ok((target.clone(), Some(target)))
        }
    }
}

fn unmount(target: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), 0) {
        warn!("unmounting {}: {e}", target.display());
    }
}

impl containerd_shim::Task for Service {
    fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.task(&req.id, "").map_or(0, |t| match &*t.phase() {
            Phase::Running { guest, .. } => guest.pid(),
            Phase::Holding => std::process::id(),
            Phase::Stopped { pid, .. } => *pid,
            Phase::Created { .. } => 0,
        });
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        if self.tasks().contains_key(&req.id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let task = create_task(&req).map_err(|e| {
            warn!("create {}: {e}", req.id);
            rpc_error(Code::INVALID_ARGUMENT, format!("exitless: {e}"))
        })?;
        match &task.what {
            What::Guest { spec, kernel } => info!(
                "created task {}: {} with {} vCPU(s), {} MiB, cmdline {:?}",
                task.id,
                kernel.display(),
                spec.vcpus,
                spec.memory_mib,
                spec.cmdline
            ),
            What::Sandbox => info!("created task {}: a pod sandbox (runs nothing)", task.id),
        }
        // Checked again under the lock: two creates of one id may race.
        {
            let mut tasks = self.tasks();
            if tasks.contains_key(&req.id) {
                if let Some(m) = &task.mounted {
                    unmount(m);
                }
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("task {} already exists", req.id),
                ));
            }
            tasks.insert(req.id.clone(), Arc::new(task));
        }
        self.publish(
            "/tasks/create",
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                // The host shim's pid is known only at start.
                pid: 0,
                ..Default::default()
            }),
        );
        Ok(CreateTaskResponse::default())
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let task = self.task(&req.id, &req.exec_id)?;
        let mut phase = task.phase();
        let Phase::Created { stdout, stderr } = &mut *phase else {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("task {} was already started", req.id),
            ));
        };
        let What::Guest { spec, kernel } = &task.what else {
            *phase = Phase::Holding;
            drop(phase);
            let pid = std::process::id();
            info!("task {}: pod sandbox started", task.id);
            self.publish(
                "/tasks/start",
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        };
        let name = guest::guest_name(&task.id);
        let stats = task.stats_path();
        let _ = std::fs::remove_file(&stats);
        let args = guest::host_shim_args(&name, kernel, spec, &stats);
        let binary = guest::host_shim_binary();
        let stdout = std::mem::replace(stdout, Sink::Null);
        let stderr = std::mem::replace(stderr, Sink::Null);
        let mut running = Running::spawn(&binary, &args, &name, stdout, stderr)
            .map_err(|e| rpc_error(Code::INTERNAL, format!("exitless: {e}")))?;
        let pid = running.pid();
        info!(
            "task {}: host shim {} started as pid {pid}",
            task.id,
            binary.display()
        );
        let pid_file = Path::new(&task.bundle).join(PID_FILE);
        if let Err(e) = std::fs::write(&pid_file, pid.to_string()) {
            warn!("writing {}: {e}", pid_file.display());
        }
        let pumps = running.take_pumps();
        *phase = Phase::Running {
            guest: running,
            signal_sent: None,
        };
        drop(phase);

        let waiter_task = Arc::clone(&task);
        let publisher = Arc::clone(&self.publisher);
        let namespace = self.namespace.clone();
        std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || watch(&waiter_task, pid, pumps, &publisher, &namespace))
            .map_err(|e| rpc_error(Code::INTERNAL, format!("exitless: a thread: {e}")))?;

        self.publish(
            "/tasks/start",
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let task = self.task(&req.id, &req.exec_id)?;
        let (status, pid, exit_status, exited_at) = match &*task.phase() {
            Phase::Created { .. } => (Status::CREATED, 0, 0, None),
            Phase::Running { guest, .. } => (Status::RUNNING, guest.pid(), 0, None),
            Phase::Holding => (Status::RUNNING, std::process::id(), 0, None),
            Phase::Stopped { pid, status, at } => {
                (Status::STOPPED, *pid, *status, Some(at.clone()))
            }
        };
        Ok(StateResponse {
            id: task.id.clone(),
            bundle: task.bundle.clone(),
            pid,
            status: status.into(),
            stdin: task.stdin.clone(),
            stdout: task.stdout.clone(),
            stderr: task.stderr.clone(),
            terminal: false,
            exit_status,
            exited_at: exited_at.into(),
            ..Default::default()
        })
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let task = self.task(&req.id, &req.exec_id)?;
        let mut phase = task.phase();
        loop {
            if let Phase::Stopped { status, at, .. } = &*phase {
                return Ok(WaitResponse {
                    exit_status: *status,
                    exited_at: MessageField::some(at.clone()),
                    ..Default::default()
                });
            }
            phase = task
                .changed
                .wait(phase)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id, &req.exec_id)?;
        let mut phase = task.phase();
        match &mut *phase {
            Phase::Running { guest, signal_sent } => {
                guest
                    .signal(req.signal)
                    .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("exitless: {e}")))?;
                if req.signal != 0 {
                    *signal_sent = i32::try_from(req.signal).ok();
                }
                info!(
                    "task {}: sent signal {} to the host shim",
                    task.id, req.signal
                );
                Ok(api::Empty::default())
            }
            Phase::Created { .. } | Phase::Holding => {
                // Nothing runs (not yet, or a sandbox): the task ends as if
                // killed by any real signal; signal 0 only asks whether it lives.
                if !(1..=64).contains(&req.signal) {
                    return if req.signal == 0 {
                        Ok(api::Empty::default())
                    } else {
                        Err(rpc_error(
                            Code::INVALID_ARGUMENT,
                            format!("exitless: signal {} is not a signal number", req.signal),
                        ))
                    };
                }
                let status = 128 + req.signal;
                let at = now();
                let pid = if matches!(*phase, Phase::Holding) {
                    std::process::id()
                } else {
                    0
                };
                info!("task {}: stopped by signal {}", task.id, req.signal);
                *phase = Phase::Stopped {
                    pid,
                    status,
                    at: at.clone(),
                };
                task.changed.notify_all();
                drop(phase);
                self.publish(
                    "/tasks/exit",
                    Box::new(TaskExit {
                        container_id: task.id.clone(),
                        id: task.id.clone(),
                        pid,
                        exit_status: status,
                        exited_at: MessageField::some(at),
                        ..Default::default()
                    }),
                );
                Ok(api::Empty::default())
            }
            Phase::Stopped { .. } => Err(rpc_error(
                Code::NOT_FOUND,
                format!("task {}: process already finished", task.id),
            )),
        }
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let task = self.task(&req.id, &req.exec_id)?;
        let (pid, status, at) = match &*task.phase() {
            Phase::Running { .. } | Phase::Holding => {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("task {} is running: kill it first", task.id),
                ));
            }
            Phase::Created { .. } => (0, 0, now()),
            Phase::Stopped { pid, status, at } => (*pid, *status, at.clone()),
        };
        self.tasks().remove(&task.id);
        if let Some(m) = &task.mounted {
            unmount(m);
        }
        let _ = std::fs::remove_file(Path::new(&task.bundle).join(PID_FILE));
        info!("deleted task {} (exit status {status})", task.id);
        self.publish(
            "/tasks/delete",
            Box::new(TaskDelete {
                container_id: task.id.clone(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let task = self.task(&req.id, "")?;
        let processes = match &*task.phase() {
            Phase::Running { guest, .. } => vec![ProcessInfo {
                pid: guest.pid(),
                ..Default::default()
            }],
            _ => Vec::new(),
        };
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn close_io(&self, _: &TtrpcContext, _: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // Guests read no console input, so there is nothing to close.
        Ok(api::Empty::default())
    }

    fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.tasks().is_empty() {
            info!("shutting down");
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

/// Waits for a task's host shim to end, records the task's exit status and
/// publishes TaskExit.
fn watch(
    task: &Task,
    pid: u32,
    pumps: Vec<std::thread::JoinHandle<()>>,
    publisher: &RemotePublisher,
    namespace: &str,
) {
    Running::wait_ended(pid, pumps);
    let mut phase = task.phase();
    let placeholder = Phase::Stopped {
        pid,
        status: crate::exit::NO_STATUS,
        at: now(),
    };
    let (guest, signal_sent) = match std::mem::replace(&mut *phase, placeholder) {
        Phase::Running { guest, signal_sent } => (guest, signal_sent),
        other => {
            // Only this thread ends a running task; nothing else to do.
            *phase = other;
            return;
        }
    };
    let (end, report) = guest.reap(&task.stats_path());
    let name = guest::guest_name(&task.id);
    let guest_stats = report
        .as_ref()
        .and_then(|s| s.guests.iter().find(|g| g.name == name));
    let status = task_exit_status(end, guest_stats, signal_sent);
    let at = now();
    info!(
        "task {}: host shim {pid} ended ({end:?}); guest: {}; task exit status {status}",
        task.id,
        guest_stats.map_or("no report", |g| g.outcome.as_str())
    );
    *phase = Phase::Stopped {
        pid,
        status,
        at: at.clone(),
    };
    task.changed.notify_all();
    drop(phase);
    publish(
        publisher,
        namespace,
        "/tasks/exit",
        Box::new(TaskExit {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        }),
    );
}

/// `containerd-shim-exitless-v1 delete`, run by containerd in the bundle
/// when the shim process itself is gone: stop a host shim left behind.
pub fn cleanup_bundle(bundle: &Path) -> DeleteResponse {
    let pid_file = bundle.join(PID_FILE);
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        // Only a process whose command line names this bundle's stats file
        // is ours: the pid may have been reused since.
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let stats = bundle.join(STATS_FILE);
            c.split(|b| *b == 0)
                .any(|arg| arg == stats.as_os_str().as_encoded_bytes())
        });
        if ours {
            warn!("killing the host shim {pid} left behind");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    let rootfs = bundle.join("rootfs");
    if rootfs.is_dir() {
        unmount(&rootfs);
    }
    // A dead server could not remove its socket. Only a socket in
    // containerd's shim socket folder is removed, whatever the file says.
    if let Some(socket) = std::fs::read_to_string(bundle.join("address"))
        .ok()
        .and_then(|a| a.trim().strip_prefix("unix://").map(PathBuf::from))
        .filter(|p| p.parent() == Some(Path::new(SHIM_SOCKETS)))
        && socket
            .symlink_metadata()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&socket);
    }
    DeleteResponse {
        exit_status: 128 + 9,
        exited_at: MessageField::some(now()),
        ..Default::default()
    }
}
