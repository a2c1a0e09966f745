//! The guest's reading of the hints page (M2) the host writes: the page check
//! (`Hints::open`), record lookup (`Hints::find`), the seqlocked record copy
//! (`HintRecord::read`), key splitting and APIC sets, over a page of fuzzer
//! bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use para_abi::hints::{self, Hints, PAGE_BYTES};

/// One hints page, 8-byte aligned as the contract asks.
#[repr(C, align(4096))]
struct Page([u8; PAGE_BYTES]);

fuzz_target!(|data: &[u8]| {
    let mut page = Box::new(Page([0; PAGE_BYTES]));
    let n = data.len().min(PAGE_BYTES);
    page.0[..n].copy_from_slice(&data[..n]);
    // SAFETY: a 4 KiB-aligned page that lives until the end of the closure,
    // only accessed through `Hints`' atomics from here on.
    let Ok(h) = (unsafe { Hints::open(page.0.as_ptr()) }) else {
        return;
    };
    for record in h.records {
        let Ok(hint) = record.read() else { continue };
        assert_eq!(
            hint.apics.len(),
            hint.apics.iter().count() as u32,
            "APIC set size"
        );
        if let Some((device, queue)) = hints::split_key(hint.key) {
            assert_eq!(hints::key(device, queue), hint.key, "key round trip");
            let _ = h.find(hint.key);
        }
        for id in hint.apics.iter() {
            assert!(
                hint.apics.contains(id) && id < hints::APIC_IDS,
                "APIC id {id}"
            );
        }
    }
});
