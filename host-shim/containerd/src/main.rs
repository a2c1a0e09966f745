//! `containerd-shim-exitless-v1`: a containerd runtime v2 shim that runs one
//! Exitless unikernel guest per task, each under its own `host-shim` process.
//!
//! containerd starts this binary itself (runtime `io.containerd.exitless.v1`);
//! `--help` says how to install and use it.

mod exit;
mod guest;
mod service;
mod spec;

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

/// The runtime name containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.exitless.v1";

const HELP: &str = "\
containerd-shim-exitless-v1: a containerd runtime v2 shim for Exitless unikernel guests

containerd starts this binary itself; you do not run it by hand. Each task
(container) is one guest run by its own `host-shim` process: the image's
Entrypoint is the guest ELF inside the image (e.g. /kernel), its Cmd the
guest's command line. The guest's console is the task's stdout, the guest's
exit status the task's, and `ctr task kill` sends the signal to the host
shim (SIGTERM stops the guest cleanly: status 143).

Install: put this binary on containerd's PATH (e.g. /usr/local/bin) and
`host-shim` next to it (or on PATH, or name it in EXITLESS_HOST_SHIM).

Run a guest:
  cargo xtask oci hello --app DIR/hello -o hello.tar   # package a guest ELF
  ctr image import hello.tar
  ctr run --rm --runtime io.containerd.exitless.v1 docker.io/exitless/hello:latest hello1

Resources, first match wins:
  annotations io.exitless.vcpus=N, io.exitless.memory=SIZE (K/M/G suffix)
  linux.resources.cpu quota/period (ctr run --cpus, a Kubernetes CPU limit)
    or cpus (a CPU list); linux.resources.memory.limit (--memory-limit)
  the image's env EXITLESS_VCPUS, EXITLESS_MEMORY
  1 vCPU, 256 MiB

The shim logs to containerd's log (run containerd with --log-level debug to
see every step). See docs/containerd.md in the Exitless repository.

Options (containerd passes these): -namespace NS -id ID -address SOCKET
  -publish-binary PATH -bundle DIR -socket ADDR -debug, then start | delete
  -v, -version   print the version
  -h, --help     print this help
";

struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    bundle: String,
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The task service waits for its own host-shim children (waitid
        // without reaping, then wait), so the crate's catch-all reaper must
        // not take their exit first; a host shim forks nothing to reap.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        Self {
            exit: Arc::default(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim process per container: each task is its own group.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // The bundle's `address` file: the server removes its socket at exit
        // by it, and `delete` after a crash finds the socket there.
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        Ok(service::cleanup_bundle(&bundle))
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(self.namespace.clone(), Arc::clone(&self.exit), publisher)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-h" || a == "--help" || a == "-help")
    {
        print!("{HELP}");
        return;
    }
    if args
        .iter()
        .any(|a| a == "-v" || a == "-version" || a == "--version")
    {
        println!(
            "containerd-shim-exitless-v1 {} (runtime {RUNTIME_ID})",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    containerd_shim::run::<Shim>(RUNTIME_ID, None);
}
