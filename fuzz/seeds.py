#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/TARGET/seed-*): one valid input per message kind each
target understands, so that every run starts past the first parse. The encodings follow the
readers in fuzz/src/lib.rs (Rig) and each target's header comment. Re-run after changing an
input format: `python3 fuzz/seeds.py`. Inputs the fuzzer found (crashes, kept as regression
seeds) live beside them as crash-* and are not touched here."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = 0x8000  # fuzz/src/lib.rs: where the payload goes
HIGH = 0x20000

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- Rig (fuzz/src/lib.rs) -------------------------------------------------------------


def desc(addr, length, flags, raw_addr=False):
    """One descriptor as Rig::new reads it; NEXT and the next index are filled in by Rig."""
    if raw_addr:
        out = u8(2) + u64(addr)
    elif addr >= HIGH:
        out = u8(1) + u16(addr - HIGH)
    else:
        assert DATA <= addr < DATA + 0x8000, hex(addr)
        out = u8(0) + u16(addr - DATA)
    if length <= 0xFFFF:
        out += u8(0) + u16(length)
    else:
        out += u8(1) + u32(length)
    return out + u8(flags & ~F_NEXT) + u8(0)


def queue(chains):
    """A queue's published chains: each a list of desc() strings (1-4 of them)."""
    out = u8(len(chains))
    for chain in chains:
        assert 1 <= len(chain) <= 4
        out += u8(len(chain) - 1) + b"".join(chain)
    return out


def payload(parts):
    """The payload at DATA: {offset: bytes}."""
    size = max(off + len(b) for off, b in parts.items())
    buf = bytearray(size)
    for off, b in parts.items():
        buf[off : off + len(b)] = b
    return bytes(buf)


def rig(queues, parts):
    return b"".join(queue(q) for q in queues) + payload(parts)


# --- chain ------------------------------------------------------------------------------


def chain_seeds():
    direct = [desc(DATA, 16, 0), desc(DATA + 0x100, 512, F_WRITE), desc(DATA + 0x400, 1, F_WRITE)]
    indirect_table = b"".join(
        u64(a) + u32(l) + u16(f) + u16(n)
        for a, l, f, n in [(DATA, 16, F_NEXT, 1), (DATA + 0x100, 512, F_NEXT | F_WRITE, 2), (DATA + 0x400, 1, F_WRITE, 0)]
    )
    indirect = [desc(DATA + 0x800, len(indirect_table), F_INDIRECT)]
    high = [desc(HIGH, 64, 0), desc(HIGH + 0x1000, 4096, F_WRITE)]
    write("chain", "direct", u32(17) + rig([[direct]], {0: b"\0" * 16}))
    write("chain", "indirect", u32(100) + rig([[indirect, direct]], {0x800: indirect_table}))
    write("chain", "two-regions", u32(64) + rig([[high, direct]], {0: b"\0"}))
    # F3's shape: a last writable buffer at the top of the address space.
    top = [desc(DATA, 16, 0), desc(DATA + 0x100, 512, F_WRITE), desc(0xFFFFFFFFFFFFFFF8, 16, F_WRITE, raw_addr=True)]
    write("chain", "top-of-memory", u32(528) + rig([[top]], {0: b"\0"}))


# --- blk --------------------------------------------------------------------------------

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def blk_header(kind, sector):
    return u32(kind) + u32(0) + u64(sector)


def blk_seeds():
    # sel (bit 0: read-only image), features (FLUSH, DISCARD, WRITE_ZEROES).
    prefix = u8(0) + u16(0b110001)
    chains, parts = [], {}
    for i, (kind, data_writable, dlen) in enumerate(
        [(T_IN, True, 512), (T_OUT, False, 1024), (T_FLUSH, None, 0), (T_GET_ID, True, 20)]
    ):
        hdr = i * 0x1000
        chain = [desc(DATA + hdr, 16, 0)]
        if data_writable is not None:
            chain.append(desc(DATA + hdr + 0x100, dlen, F_WRITE if data_writable else 0))
        chain.append(desc(DATA + hdr + 0xF00, 1, F_WRITE))
        chains.append(chain)
        parts[hdr] = blk_header(kind, 8)
    write("blk", "in-out-flush-getid", prefix + rig([chains], parts))
    seg = u64(16) + u32(8) + u32(0)
    dwz = []
    for i, kind in enumerate([T_DISCARD, T_WRITE_ZEROES]):
        hdr = i * 0x1000
        dwz.append([desc(DATA + hdr, 16, 0), desc(DATA + hdr + 0x100, 16, 0), desc(DATA + hdr + 0xF00, 1, F_WRITE)])
        parts = {0: blk_header(T_DISCARD, 0) + b"\0" * 0xF0 + seg, 0x1000: blk_header(T_WRITE_ZEROES, 0) + b"\0" * 0xF0 + seg}
    write("blk", "discard-write-zeroes", prefix + rig([dwz], parts))
    # F6's shape: IN whose data buffer is device-readable.
    f6 = [desc(DATA, 16, 0), desc(DATA + 0x100, 512, 0), desc(DATA + 0xF00, 1, F_WRITE)]
    write("blk", "in-readable-data", prefix + rig([[f6]], {0: blk_header(T_IN, 0)}))
    # F3's shape.
    f3 = [desc(DATA, 16, 0), desc(DATA + 0x100, 512, F_WRITE), desc(0xFFFFFFFFFFFFFFF8, 16, F_WRITE, raw_addr=True)]
    write("blk", "status-at-top", prefix + rig([[f3]], {0: blk_header(T_IN, 0)}))


# --- net --------------------------------------------------------------------------------


def net_seeds():
    csum = (1 << 0) | (1 << 11) | (1 << 12) | (1 << 15)  # CSUM, HOST_TSO4, HOST_TSO6, HOST_UFO
    for name, features, flen, hdr in [
        ("plain", 0, 60, bytes(12)),
        ("csum", csum, 1500, u8(1) + u8(0) + u16(54) + u16(0) + u16(34) + u16(16) + u16(0)),
        ("tso4", csum, 9000, u8(1) + u8(1) + u16(54) + u16(1448) + u16(34) + u16(16) + u16(0)),
    ]:
        ctrl = [desc(DATA, 4, 0), desc(DATA + 0x100, 1, F_WRITE)]
        body = rig([[ctrl]], {0: u8(4) + u8(0) + u16(2)})  # MQ, VQ_PAIRS_SET, 2 pairs
        write("net", name, u64(features) + u16(flen) + u8(0) + u16(1500) + hdr + u8(3) + body)


# --- console ----------------------------------------------------------------------------


def cmsg(port, event, value, data=b""):
    return u32(port) + u16(event) + u16(value) + data


def console_seeds():
    headers = [cmsg(0, 0, 1), cmsg(0, 3, 1), cmsg(1, 3, 1), cmsg(0, 6, 1)]
    direct = u8(len(headers)) + b"".join(headers)
    tx = [[desc(DATA + 0x10 * i, 8, 0)] for i in range(4)]
    rx = [[desc(DATA + 0x1000 + 0x100 * i, 64, F_WRITE)] for i in range(4)]
    data_tx = [[desc(DATA + 0x2000, 32, 0)]]
    data_rx = [[desc(DATA + 0x3000, 64, F_WRITE)]]
    parts = {0x10 * i: h for i, h in enumerate(headers)}
    parts[0x2000] = b"hello from the guest\n"
    write("console", "handshake", direct + rig([tx, rx, data_tx, data_rx], parts))
    write("console", "via-queue-only", u8(0) + rig([tx, rx, data_tx, data_rx], parts))


# --- gpu --------------------------------------------------------------------------------


def ghdr(kind):
    return u32(kind) + u32(0) + u64(0) + u32(0) + u8(0) + b"\0\0\0"


def rect(x, y, w, h):
    return u32(x) + u32(y) + u32(w) + u32(h)


def gpu_seeds():
    cmds = [
        (False, ghdr(0x100)),  # GET_DISPLAY_INFO
        (False, ghdr(0x101) + u32(1) + u32(1) + u32(16) + u32(16)),  # RESOURCE_CREATE_2D
        (False, ghdr(0x106) + u32(1) + u32(1) + u64(DATA) + u32(1024) + u32(0)),  # ATTACH_BACKING
        (False, ghdr(0x103) + rect(0, 0, 16, 16) + u32(0) + u32(1)),  # SET_SCANOUT
        (False, ghdr(0x105) + rect(0, 0, 16, 16) + u64(0) + u32(1) + u32(0)),  # TRANSFER_TO_HOST_2D
        (False, ghdr(0x104) + rect(0, 0, 16, 16) + u32(1) + u32(0)),  # RESOURCE_FLUSH
        (False, ghdr(0x10A) + u32(0) + u32(0)),  # GET_EDID
        (True, ghdr(0x300) + u32(0) + u32(5) + u32(5) + u32(0) + u32(1) + u32(0) + u32(0) + u32(0)),  # UPDATE_CURSOR
        (True, ghdr(0x301) + u32(0) + u32(7) + u32(7) + u32(0) + u32(0) + u32(0) + u32(0) + u32(0)),  # MOVE_CURSOR
        (False, ghdr(0x107) + u32(1) + u32(0)),  # DETACH_BACKING
        (False, ghdr(0x102) + u32(1) + u32(0)),  # RESOURCE_UNREF
    ]
    direct = u8(len(cmds)) + b"".join(u8(0x80 if c else 0) + u16(len(b)) + b for c, b in cmds)
    ctrl = [[desc(DATA + 0x1000, 24, 0), desc(DATA + 0x2000, 408, F_WRITE)]]
    cursor = [[desc(DATA + 0x3000, 56, 0)]]
    parts = {0x1000: ghdr(0x100), 0x3000: ghdr(0x301) + bytes(32), 0: bytes(1024)}
    write("gpu", "draw-a-frame", direct + rig([ctrl, cursor], parts))


# --- input ------------------------------------------------------------------------------


def input_seeds():
    for kind, name in [(0, "keyboard"), (1, "tablet")]:
        writes = [(0, b"\x01"), (1, b"\x00"), (0, b"\x11\x01"), (0, b"\x12"), (1, b"\x00"), (0, b"\x02")]
        direct = u8(kind) + u8(len(writes)) + b"".join(u8(o) + u8(len(d)) + d for o, d in writes)
        report = u8(2) + u16(1) + u16(30) + u32(1) + u16(0) + u16(0) + u32(0)
        events = [[desc(DATA + 0x100 * i, 8, F_WRITE)] for i in range(4)]
        status = [[desc(DATA + 0x1000, 8, 0)]]
        parts = {0x1000: u16(0x11) + u16(1) + u32(1)}  # EV_LED, LED_CAPSL, on
        write("input", name, direct + report + rig([events, status], parts))


# --- display protocol -------------------------------------------------------------------


def dmsg(code, payload=b"", flags=0):
    return struct.pack("=III", code, flags, len(payload)) + payload


def display_seeds():
    w = lambda *xs: b"".join(struct.pack("=I", x) for x in xs)
    session = (
        dmsg(1)
        + dmsg(2, struct.pack("=Q", 1))
        + dmsg(3)
        + dmsg(11, w(0))
        + dmsg(7, w(0, 32, 24))
        + dmsg(8, w(0, 2, 2, 4, 4) + b"\x7f" * 64)
        + dmsg(4, w(0, 10, 10))
        + dmsg(6, w(0, 1, 1, 0, 0) + b"\x00\xff\x00\xff" * 64 * 64)
        + dmsg(5, w(0, 0, 0))
        + dmsg(10, w(0, 0, 0, 8, 8))
        + dmsg(7, w(0, 0, 0))
    )
    write("display_protocol", "session", session)
    write("display_protocol", "unknown-and-reply", dmsg(99, b"abc") + dmsg(3, b"", flags=4) + dmsg(9, bytes(40)))


# --- RFB --------------------------------------------------------------------------------


def rfb_seeds():
    be16 = lambda v: struct.pack(">H", v & 0xFFFF)
    be32 = lambda v: struct.pack(">I", v & 0xFFFFFFFF)
    pixel = bytes([32, 24, 0, 1]) + be16(255) + be16(255) + be16(255) + bytes([16, 8, 0]) + bytes(3)
    msgs = (
        b"\x00" + bytes(3) + pixel
        + b"\x02\x00" + be16(4) + be32(0) + be32(16) + be32(-223) + be32(-239)
        + b"\x03\x00" + be16(0) + be16(0) + be16(64) + be16(48)
        + b"\x04\x01\x00\x00" + be32(0x61)
        + b"\x05\x01" + be16(10) + be16(20)
        + b"\x06" + bytes(3) + be32(5) + b"hello"
        + b"\x03\x01" + be16(0) + be16(0) + be16(64) + be16(48)
    )
    write("rfb", "v3.8", b"RFB 003.008\n" + b"\x01" + b"\x01" + msgs)
    write("rfb", "v3.7", b"RFB 003.007\n" + b"\x01" + b"\x01" + msgs)
    write("rfb", "v3.3", b"RFB 003.003\n" + b"\x01" + msgs)


# --- ipc --------------------------------------------------------------------------------


def frame(body, version=9):
    """isola-ipc's framing: length, PROTOCOL_VERSION, a postcard body."""
    return u32(len(body) + 2) + u16(version) + body


def var(v):
    """postcard's varint (LEB128): integers wider than u8, enum variants, lengths."""
    out = b""
    while v >= 0x80:
        out += u8(v & 0x7F | 0x80)
        v >>= 7
    return out + u8(v)


def ipc_seeds():
    string = lambda s: var(len(s)) + s
    write("ipc", "control-requests", u8(0) + b"".join(frame(var(v)) for v in range(4)) + frame(var(4) + var(0xFEE00000) + var(0x41))
          + frame(var(5)) + frame(var(6) + var(30000)) + frame(var(7) + string(b"/run/isola/blk0.sock")))
    write("ipc", "supervisor-requests", u8(2) + frame(var(0)) + frame(var(1) + string(b"blk0")) + frame(var(2) + string(b"blk0") + u8(0)))
    write("ipc", "display-requests", u8(4) + frame(var(0) + var(0)) + frame(var(1)))
    write("ipc", "input-requests", u8(6) + frame(var(0) + var(30) + u8(1)) + frame(var(1) + var(100) + var(200) + var(1)) + frame(var(2)))
    write("ipc", "responses", u8(3) + frame(var(1)) + frame(var(2) + string(b"no such daemon")))


# --- vhost-user -------------------------------------------------------------------------

NONE, MEMFD, EVENTFD = 0, 1, 2


def vmsg(code, payload=b"", fd=NONE, flags=0x1):
    raw = u32(code) + u32(flags) + u32(len(payload)) + payload
    return u8(fd) + u16(len(raw)) + raw


def vhost_seeds():
    user = 0x7F0000000000
    region = u64(0) + u64(0x10000) + u64(user) + u64(0)
    setup = (
        vmsg(3)  # SET_OWNER
        + vmsg(1)  # GET_FEATURES
        + vmsg(15)  # GET_PROTOCOL_FEATURES
        + vmsg(16, u64(0x1 | 0x8 | 0x200 | 0x1000 | 0x2000 | 0x8000))  # SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG, INFLIGHT, RESET, MEM_SLOTS)
        + vmsg(2, u64((1 << 32) | (1 << 30)), flags=0x9)  # SET_FEATURES (need reply)
        + vmsg(17)  # GET_QUEUE_NUM
        + vmsg(5, u32(1) + u32(0) + region, fd=MEMFD, flags=0x9)  # SET_MEM_TABLE
    )
    ring = (
        vmsg(8, u32(0) + u32(16))  # SET_VRING_NUM
        + vmsg(9, u32(0) + u32(0) + u64(user) + u64(user + 0x1000) + u64(user + 0x100) + u64(0))  # SET_VRING_ADDR
        + vmsg(10, u32(0) + u32(0))  # SET_VRING_BASE
        + vmsg(13, u64(0), fd=EVENTFD)  # SET_VRING_CALL
        + vmsg(12, u64(0), fd=EVENTFD)  # SET_VRING_KICK
        + vmsg(18, u32(0) + u32(1))  # SET_VRING_ENABLE
        + vmsg(11, u32(0) + u32(0))  # GET_VRING_BASE
    )
    config = vmsg(24, u32(0) + u32(16) + u32(0) + bytes(16)) + vmsg(25, u32(0) + u32(4) + u32(0) + bytes(4))
    inflight = vmsg(31, u64(0) + u64(0) + u16(2) + u16(16)) + vmsg(32, u64(4096) + u64(0) + u16(2) + u16(16), fd=MEMFD)
    slots = vmsg(36) + vmsg(37, u64(0) + u64(HIGH) + u64(0x10000) + u64(user + HIGH) + u64(0), fd=MEMFD) + vmsg(38, u64(0) + u64(HIGH) + u64(0x10000) + u64(user + HIGH) + u64(0))
    write("vhost_user", "negotiate-and-ring", setup + ring)
    write("vhost_user", "config-inflight-slots", setup + config + inflight + slots)
    write("vhost_user", "resets", setup + ring + vmsg(34) + ring + vmsg(4) + vmsg(3))
    write("vhost_user", "gpu-set-socket", setup + vmsg(33, b"", fd=EVENTFD))


# --- usb ---------------------------------------------------------------------------------
def usb_seeds():
    def cbw(tag, length, data_in, cdb):
        return (b"USBC" + u32(tag) + u32(length) + u8(0x80 if data_in else 0) + u8(0)
                + u8(len(cdb)) + cdb + bytes(16 - len(cdb)))
    read10 = bytes([0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0])
    trb = u64(0x0012000001000680) + u32(8) + u32((2 << 10) | 1 | (1 << 6))
    # mode 0: a TRB, a CBW, a geometry and a CDB.
    write("usb", "parsers", u8(0) + trb + u8(31) + cbw(1, 1024, True, read10) + u32(2048) + u8(0)
          + u8(len(read10)) + read10 + u8(0) + u8(0) + u8(0))
    # mode 1: a write of one block (CBW, data, CSW), then a read back.
    write10 = bytes([0x2a, 0, 0, 0, 0, 3, 0, 0, 1, 0])
    op_out = lambda data: u16(len(data)) + u8(2) + u8(0) + data
    op_in = lambda n: u16(n) + u8(1) + u8(1)
    write("usb", "transport", u8(1) + u8(0) + op_out(cbw(2, 512, False, write10))
          + op_out(bytes(range(256)) * 2) + op_in(13) + op_out(cbw(3, 512, True, read10)) + op_in(512) + op_in(13))
    # mode 2: start the controller (DCBAAP, CRCR, ERST, RS), an Enable Slot, a doorbell.
    mem = lambda off, data: u8(0) + u16(off) + data + bytes(16 - len(data))
    reg = lambda off, v: u8(1) + u16(off) + u32(v)
    erst = u64(0x14000) + u32(16) + u32(0)
    enable = u64(0) + u32(0) + u32((9 << 10) | 1)
    write("usb", "controller", u8(2) + mem(0x3000, erst) + mem(0x2000, enable)
          + reg(0x70, 0x11000) + reg(0x58, 0x12001) + reg(0x1028, 1) + reg(0x1030, 0x13000)
          + reg(0x1038, 0x14000) + reg(0x1020, 2) + reg(0x40, 5) + reg(0x2000, 0) + reg(0x440, 0x10))


if __name__ == "__main__":
    chain_seeds()
    blk_seeds()
    net_seeds()
    console_seeds()
    gpu_seeds()
    input_seeds()
    display_seeds()
    rfb_seeds()
    ipc_seeds()
    vhost_seeds()
    usb_seeds()
