//! Legs `guest-tcg` and `guest-kvm`: the in-guest tests (`ktest`) booted
//! under QEMU.

use crate::infra::{build, setup};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};

/// A guest test image under QEMU q35.
pub struct QemuGuest {
    pub name: &'static str,
    pub about: &'static str,
    pub image: &'static str,
    pub accel: Accel,
    pub smp: u32,
}

impl Leg for QemuGuest {
    fn name(&self) -> &'static str {
        self.name
    }

    fn about(&self) -> &'static str {
        self.about
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        // Check the machine before spending time on a build it cannot boot.
        let ready = setup::ensure_qemu()
            .map_err(|e| e.to_string())
            .and_then(|_| match self.accel {
                Accel::Kvm => setup::check_kvm().map_err(|why| format!("cannot use KVM: {why}")),
                Accel::Tcg => Ok(()),
            });
        let path = match ready.and_then(|()| images.get(self.image)) {
            Ok(path) => path,
            Err(why) => return LegRun::broken(why),
        };
        let cfg = qemu::Config {
            accel: self.accel,
            machine: Machine::Q35,
            smp: self.smp,
            mem_mib: 256,
            image: path,
            append: build::find_image(self.image)
                .map(|i| i.qemu_append.to_owned())
                .unwrap_or_default(),
            net: Net::User,
            hostfwd: Vec::new(),
            netdev: None,
            mac: None,
            nic_options: Vec::new(),
            extra_args: Vec::new(),
            timeout: opts.timeout,
        };
        let echo = if opts.verbose {
            Echo::All
        } else {
            Echo::Protocol {
                prefix: self.name.to_owned(),
            }
        };
        let run = match qemu::boot(&cfg, self.name, &echo) {
            Ok(run) => run,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let serial = run.serial();
        let outcome = verdict::judge_guest(run.exit, &serial);
        if !outcome.ok() {
            run.print_post_mortem();
        }
        if let Some(wall) = run.boot_wall() {
            println!(
                "{}: boot: main reached {:.2} s after QEMU start",
                self.name,
                wall.as_secs_f64()
            );
        }
        LegRun {
            outcome,
            reports: serial.reports,
            log: Some(run.log),
        }
    }
}
