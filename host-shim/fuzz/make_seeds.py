#!/usr/bin/env python3
"""Writes the hand-made seeds of corpus/<target>/seed-*: one or a few valid
inputs per target, so that each fuzz run starts past the magic numbers and
check bytes instead of having to find them. Run from this folder; the
corpora that libFuzzer grew from these seeds are committed beside them."""
import os
import struct

M64 = (1 << 64) - 1


def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(bytes(data))


def at(buf, off, fmt, *vals):
    struct.pack_into("<" + fmt, buf, off, *vals)


# host_virtq_net: [size_sel, ops] + guest memory from 0 (descriptors at 0,
# available ring at 0x1000, buffers at 0x4000).
def virtq(write, two):
    mem = bytearray(0x4000 + 128)
    flags_w = 2 if write else 0
    if two:
        at(mem, 0, "QIHH", 0x4000, 10, 1 | flags_w, 1)
        at(mem, 16, "QIHH", 0x400A, 66, flags_w, 0)
    else:
        at(mem, 0, "QIHH", 0x4000, 76, flags_w, 0)
    at(mem, 0x1000, "HHH", 0, 1, 0)
    ops = 0x48 if write else 0x08
    return bytes([4, ops]) + bytes(mem)


put("host_virtq_net", "tx", virtq(False, False))
put("host_virtq_net", "tx-chain", virtq(False, True))
put("host_virtq_net", "rx", virtq(True, False))


# host_doorbell: a para region with one designation and a ring of records.
def check_byte(body):
    return (((body & ((1 << 56) - 1)) * 0x9E3779B97F4A7C15 & M64) >> 56) ^ 0xA5


def record(device, queue, op, position):
    body = device | (queue << 8) | (op << 24) | ((position & 0xFFF) << 44)
    return body | (check_byte(body) << 56)


region = bytearray(0x3000)
at(region, 0, "QIIQIIIIQ", int.from_bytes(b"EXLSPARA", "little"), 1, 128, 0x10000, 128, 32, 64, 1, 2)
# Designation 0: generation 2, guest vCPU source, range 0..64 KiB, protected
# 8 KiB, 64 slots, status at 0x1000, ring header at 0x2000.
at(region, 128, "IIIIQQIIIIQ", 2, 1, 0, 0, 0, 0x10000, 0x2000, 64, 0x1000, 0x2000, 0)
at(region, 0x2000, "Q", 3)  # tail
slots = 0x2000 + 256
for i, op in enumerate([1, 2, 3]):
    at(region, slots + 8 * i, "Q", record(i, 1, op, i))
at(region, 0x2000 + 64, "Q", 1)  # overflow summary
at(region, 0x2000 + 72, "Q", 0b101)  # overflow word 0
put("host_doorbell", "ring", region)

# host_hypercall_ctrl: one of each M4 call, a shadow store and an exit.
ops = bytearray([0])
for kind, vcpu, a, b in [
    (1, 0, 0, (1 << 32) | 1),  # CtrlWrite flag 1 = 1 (encoding: value in bit 32)
    (1, 1, 1, 1),              # CtrlRead flag 1
    (1, 0, 2, 0x0000000300000003),
    (1, 0, 3, 0),
    (2, 0, 0, 0xFF),
    (3, 0, 0, 0),
    (0, 0, 4, 0x11),           # decode: EAX 4 (CtrlWrite)
    (4, 0, 4, 1),
]:
    ops += struct.pack("<BBQQ", kind, vcpu, a, b)
put("host_hypercall_ctrl", "calls", ops)

# host_pci: read the vendor id through ECAM and CF8/CFC, size BAR0 (write
# all ones, read back), enable MSI-X, and touch the BAR's common config.
def op(kind, size_code, addr, value):
    b = bytearray(16)
    at(b, 0, "Q", addr << 8)
    b[0] = kind
    b[1] = size_code
    at(b, 8, "Q", value)
    return bytes(b)


dev1 = 1 << 15
seq = b"".join([
    op(0, 2, dev1 + 0x00, 0),                     # ECAM read vendor/device
    op(1, 2, dev1 + 0x10, 0xFFFFFFFF),            # size BAR0
    op(0, 2, dev1 + 0x10, 0),
    op(1, 1, dev1 + 0x04, 0x0006),                # memory + bus master
    op(2, 2, 0, 0x80000000 | dev1 + 0x34),        # CF8 = capability pointer
    op(3, 2, 4, 0),                               # CFC
    op(6, 1, 0x14, 0x0F),                         # common config: status
    op(7, 2, 0x00, 0),                            # device feature select
    op(6, 2, 0x4000, 0xFEE00000),                 # MSI-X table entry 0
    op(4, 0, 0x3000, 1),                          # notify through the bus
])
put("host_pci", "probe", seq)

# host_vmq_outbox: counters (produced 2, consumed 0, receiver consumed 0),
# 2 drain rounds, one copy message and one remap message to guest 1.
def message(dest, policy, transfer, length, addr, tag):
    b = bytearray(32)
    at(b, 0, "IBBBBIB", dest, policy, transfer, 0, 0, length, 0)
    at(b, 16, "QQ", addr, tag)
    return bytes(b)


put("host_vmq_outbox", "copy-remap", struct.pack("<III", 2, 0, 0) + bytes([1])
    + message(1, 0, 0, 100, 0x10000, 7) + message(1, 0, 1, 0x1000, 0x20000, 8))

# guest_used_ring: receive mode, deliver, receive, send, complete, reap, and
# one completion of an id that was never posted.
g = bytearray()
for kind, q, i, n in [(1, 0, 60, 60), (2, 0, 0, 0), (3, 1, 60, 0), (5, 4, 0, 0),
                      (4, 0, 0, 0), (0, 0, 200, 5000), (2, 0, 0, 0)]:
    g += struct.pack("<BBHI", kind, q, i, n)
put("guest_used_ring", "ops", g)

# guest_vmq_inbox: a 60-byte frame, a runt and an oversized one.
put("guest_vmq_inbox", "frames", struct.pack("<H", 60) + bytes(range(60))
    + struct.pack("<H", 4) + b"abcd" + struct.pack("<H", 1600) + bytes(1600))

# guest_direct_rx: two frames produced, received, then an index jump.
put("guest_direct_rx", "ops", bytes([0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 255,
                                     3, 0, 0, 0, 0, 255, 0, 0, 1, 0, 0, 0,
                                     5, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0]))

# guest_hints: a valid page with two records.
page = bytearray(4096)
at(page, 0, "IIII", int.from_bytes(b"HINT", "little"), 1, 63, 64)
at(page, 64, "IIIIQQQQ", 2, (1 << 31) | (1 << 16) | 1, 3, 2, 0b11, 0, 0, 0)
at(page, 128, "IIIIQQQQ", 4, (1 << 31) | (2 << 16) | 0, 1, 1, 0, 1 << 5, 0, 0)
put("guest_hints", "page", page)

# host_monitor: the guest's stores into its ring (offsets past the protected
# page: the ring header at 0, slot k at 0x100 + 8 k), then the monitor's pass.
def store(offset, value):
    return struct.pack("<BQQ", 1, offset, value)


def serve(batch):
    return struct.pack("<BQQ", 0, batch, 0)


put("host_monitor", "records", store(0x100, record(1, 0, 1, 0)) + store(0x108, record(1, 1, 3, 1))
    + store(0x110, record(9, 0, 1, 2)) + store(0, 3) + serve(8)
    + store(64, 1) + store(72, 0b11) + serve(8))
