//! ACPI tables for the guest, built with the `acpi_tables` crate.
//!
//! RSDP (rev 2) → XSDT → FADT (→ DSDT), MADT, MCFG (ACPI 6.5 §5.2). The guest parses
//! them with the `acpi` crate, which wants a FADT before it reads the MADT.

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use para_abi::layout::{IOAPIC_BASE, LAPIC_BASE};

const OEM_ID: [u8; 6] = *b"EXTLSS";
const OEM_TABLE: [u8; 8] = *b"EXITLESS";
const OEM_REVISION: u32 = 1;

/// Where the PCI configuration space (ECAM) is, for the MCFG.
#[derive(Clone, Copy, Debug)]
pub struct EcamInfo {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// The tables as one blob to copy to `base`; the RSDP is at `base`.
#[derive(Debug)]
pub struct Tables {
    pub base: u64,
    pub bytes: Vec<u8>,
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Appends `table` 16-byte aligned and returns its guest-physical address.
fn place(blob: &mut Vec<u8>, base: u64, table: &[u8]) -> u64 {
    blob.resize(blob.len().next_multiple_of(16), 0);
    let at = base + blob.len() as u64;
    blob.extend_from_slice(table);
    at
}

/// Builds the tables for a VM with `apic_ids` (one LAPIC per vCPU) to live at `base`.
#[must_use]
pub fn build(base: u64, apic_ids: &[u8], ecam: Option<EcamInfo>) -> Tables {
    let mut blob = vec![0u8; Rsdp::len()];

    // A DSDT with no AML: the guest needs its header only (ACPI 6.5 §5.2.11.1).
    let dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let dsdt_at = place(&mut blob, base, dsdt.as_slice());

    // No PM hardware: a hardware-reduced platform (ACPI 6.5 §4.1).
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .finalize();
    let fadt_at = place(&mut blob, base, &aml_bytes(&fadt));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE as u32),
    );
    for (uid, &id) in apic_ids.iter().enumerate() {
        madt.add_structure(ProcessorLocalApic::new(
            uid as u8,
            id,
            EnabledStatus::Enabled,
        ));
    }
    // IOAPIC id after the last LAPIC id; GSI base 0.
    let ioapic_id = apic_ids
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m.wrapping_add(1));
    madt.add_structure(IoApic::new(ioapic_id, IOAPIC_BASE as u32, 0));
    let madt_at = place(&mut blob, base, &aml_bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    if let Some(e) = ecam {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE, OEM_REVISION);
        mcfg.add_ecam(e.base, 0, e.start_bus, e.end_bus);
        xsdt.add_entry(place(&mut blob, base, &aml_bytes(&mcfg)));
    }
    let xsdt_at = place(&mut blob, base, &aml_bytes(&xsdt));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_at));
    blob[..rsdp.len()].copy_from_slice(&rsdp);
    Tables { base, bytes: blob }
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
    use std::ptr::NonNull;
    use std::sync::Arc;

    /// Lets the `acpi` crate (the guest's parser) read a table blob as "physical memory".
    #[derive(Clone)]
    struct Blob(Arc<Tables>);

    impl AcpiHandler for Blob {
        unsafe fn map_physical_region<T>(
            &self,
            pa: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            let off = pa - self.0.base as usize;
            assert!(
                off + size <= self.0.bytes.len(),
                "parser read past the tables: {pa:#x}+{size}"
            );
            let ptr = NonNull::new(
                self.0
                    .bytes
                    .as_ptr()
                    .wrapping_add(off)
                    .cast_mut()
                    .cast::<T>(),
            )
            .unwrap();
            // SAFETY: `ptr` points into the blob, which outlives the mapping via the Arc.
            unsafe { PhysicalMapping::new(pa, ptr, size, size, self.clone()) }
        }
        fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
    }

    fn parse(t: Tables) -> AcpiTables<Blob> {
        let base = t.base as usize;
        // SAFETY: the handler bounds-checks every mapping against the blob.
        unsafe { AcpiTables::from_rsdp(Blob(Arc::new(t)), base) }.expect("tables parse")
    }

    #[test]
    fn the_guest_parser_finds_every_cpu_and_the_ioapic() {
        let tables = parse(build(
            0xE_0000,
            &[0, 1, 2],
            Some(EcamInfo {
                base: 0xB000_0000,
                start_bus: 0,
                end_bus: 0,
            }),
        ));
        let fadt = tables.find_table::<acpi::fadt::Fadt>().expect("FADT");
        assert_eq!(fadt.dsdt_address().unwrap() % 16, 0);
        tables.dsdt().expect("DSDT reachable from the FADT");
        let madt = tables.find_table::<acpi::madt::Madt>().expect("MADT");
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        for e in madt.get().entries() {
            match e {
                acpi::madt::MadtEntry::LocalApic(l) => {
                    lapics.push((l.processor_id, l.apic_id, { l.flags }));
                }
                acpi::madt::MadtEntry::IoApic(io) => ioapics.push(io.io_apic_address),
                _ => {}
            }
        }
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, vec![0xFEC0_0000]);
        assert_eq!({ madt.get().local_apic_address }, 0xFEE0_0000);
    }

    #[test]
    fn mcfg_describes_the_ecam_window() {
        let tables = parse(build(
            0x1000,
            &[0],
            Some(EcamInfo {
                base: 0xB000_0000,
                start_bus: 0,
                end_bus: 3,
            }),
        ));
        let mcfg = tables.find_table::<acpi::mcfg::Mcfg>().expect("MCFG");
        let e = mcfg.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (
                { e[0].base_address },
                e[0].bus_number_start,
                e[0].bus_number_end
            ),
            (0xB000_0000, 0, 3)
        );
    }

    #[test]
    fn no_mcfg_without_ecam_and_checksums_hold() {
        let t = build(0x1000, &[0, 1], None);
        // RSDP checksums (ACPI 6.5 §5.2.5.3): first 20 bytes and all 36 sum to 0.
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(sum(&t.bytes[..20]), 0);
        assert_eq!(sum(&t.bytes[..36]), 0);
        let tables = parse(t);
        assert!(tables.find_table::<acpi::mcfg::Mcfg>().is_err());
    }
}
