use super::*;
use vm_memory::{Bytes, GuestAddress};

const W: u32 = 8;
const H: u32 = 4;
const FB: u64 = 0x10000;

fn mem() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
}

fn hdr(kind: u32) -> Vec<u8> {
    let mut v = vec![0u8; HDR_LEN];
    v[0..4].copy_from_slice(&kind.to_le_bytes());
    v
}

fn cmd(kind: u32, words: &[u32]) -> Vec<u8> {
    let mut v = hdr(kind);
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn attach(id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
    let mut v = cmd(CMD_RESOURCE_ATTACH_BACKING, &[id, entries.len() as u32]);
    for &(addr, len) in entries {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
    }
    v
}

fn transfer(id: u32, r: [u32; 4], offset: u64) -> Vec<u8> {
    let mut v = cmd(CMD_TRANSFER_TO_HOST_2D, &r);
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn kind(resp: &[u8]) -> u32 {
    Fields(resp).u32(0)
}

fn run(gpu: &mut Gpu, m: &Memory, req: &[u8]) -> (u32, Vec<DisplayOp>) {
    let (resp, ops) = gpu.control(m, req);
    (kind(&resp), ops)
}

fn ok(gpu: &mut Gpu, m: &Memory, req: &[u8]) -> Vec<DisplayOp> {
    let (k, ops) = run(gpu, m, req);
    assert_eq!(k, RESP_OK_NODATA, "command {:#x}", Fields(req).u32(0));
    ops
}

/// Pixel (x, y) of the test pattern, bytes B, G, R, X.
fn px(x: u32, y: u32) -> [u8; 4] {
    [(x * 7) as u8, (y * 13) as u8, (x ^ y) as u8, 0xee]
}

fn fill_pattern(m: &Memory, base: u64) {
    for y in 0..H {
        for x in 0..W {
            let at = base + u64::from((y * W + x) * 4);
            m.write_slice(&px(x, y), GuestAddress(at)).unwrap();
        }
    }
}

fn expected(r: Rect) -> Vec<u8> {
    let mut v = Vec::new();
    for y in r.y..r.y + r.height {
        for x in r.x..r.x + r.width {
            v.extend_from_slice(&px(x, y));
        }
    }
    v
}

/// Resource 1 (W x H, B8G8R8X8) backed at FB, on scanout 0.
fn shown(gpu: &mut Gpu, m: &Memory) {
    ok(gpu, m, &cmd(CMD_RESOURCE_CREATE_2D, &[1, 2, W, H]));
    ok(gpu, m, &attach(1, &[(FB, W * H * 4)]));
    let ops = ok(gpu, m, &cmd(CMD_SET_SCANOUT, &[0, 0, W, H, 0, 1]));
    assert_eq!(
        ops,
        vec![DisplayOp::Scanout {
            scanout: 0,
            width: W,
            height: H
        }]
    );
}

fn full() -> Rect {
    Rect {
        x: 0,
        y: 0,
        width: W,
        height: H,
    }
}

#[test]
fn a_drawn_frame_reaches_the_display() {
    let m = mem();
    fill_pattern(&m, FB);
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    let (resp, _) = gpu.control(&m, &hdr(CMD_GET_DISPLAY_INFO));
    assert_eq!(resp.len(), LEN_RESP_DISPLAY_INFO);
    let f = Fields(&resp);
    assert_eq!(f.u32(0), RESP_OK_DISPLAY_INFO);
    assert_eq!(
        f.rect(HDR_LEN),
        Rect {
            x: 0,
            y: 0,
            width: 640,
            height: 480
        }
    );
    assert_eq!(f.u32(HDR_LEN + 16), 1, "enabled");
    let (resp, _) = gpu.control(&m, &cmd(CMD_GET_EDID, &[0, 0]));
    assert_eq!(kind(&resp), RESP_OK_EDID);
    assert_eq!(Fields(&resp).u32(HDR_LEN), 128);
    assert_eq!(resp[HDR_LEN + 8..HDR_LEN + 8 + 128], edid(640, 480));

    shown(&mut gpu, &m);
    ok(&mut gpu, &m, &transfer(1, [0, 0, W, H], 0));
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_FLUSH, &[0, 0, W, H, 1, 0]));
    assert_eq!(
        ops,
        vec![DisplayOp::Update {
            scanout: 0,
            rect: full(),
            data: expected(full())
        }]
    );
    // A partial flush sends just that part.
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_FLUSH, &[2, 1, 3, 2, 1, 0]));
    let part = Rect {
        x: 2,
        y: 1,
        width: 3,
        height: 2,
    };
    assert_eq!(
        ops,
        vec![DisplayOp::Update {
            scanout: 0,
            rect: part,
            data: expected(part)
        }]
    );
    assert_eq!(gpu.current_picture().len(), 2);
}

#[test]
fn partial_transfers_follow_the_offset_across_backing_entries() {
    let m = mem();
    // The backing in three pieces, out of order in guest memory.
    let row = W * 4;
    let pieces = [
        (0x30000u64, row + 4),
        (0x20000, row * 2 - 8),
        (0x28000, row + 4),
    ];
    let mut linear = Vec::new();
    for y in 0..H {
        for x in 0..W {
            linear.extend_from_slice(&px(x, y));
        }
    }
    let mut at = 0usize;
    for &(addr, len) in &pieces {
        m.write_slice(&linear[at..at + len as usize], GuestAddress(addr))
            .unwrap();
        at += len as usize;
    }
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[1, 2, W, H]));
    ok(&mut gpu, &m, &attach(1, &pieces));
    ok(&mut gpu, &m, &cmd(CMD_SET_SCANOUT, &[0, 0, W, H, 0, 1]));
    // Only the rectangle (3, 1) 4x3, with the offset Linux uses: y * stride + x * 4.
    let r = Rect {
        x: 3,
        y: 1,
        width: 4,
        height: 3,
    };
    ok(
        &mut gpu,
        &m,
        &transfer(1, [3, 1, 4, 3], u64::from(row + 3 * 4)),
    );
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_FLUSH, &[0, 0, W, H, 1, 0]));
    let DisplayOp::Update { data, .. } = &ops[0] else {
        panic!("{ops:?}")
    };
    for y in 0..H {
        for x in 0..W {
            let got = &data[((y * W + x) * 4) as usize..][..4];
            let inside = x >= r.x && x < r.x + r.width && y >= r.y && y < r.y + r.height;
            let want = if inside { px(x, y) } else { [0; 4] };
            assert_eq!(got, want, "({x}, {y})");
        }
    }
}

#[test]
fn other_formats_are_converted_for_the_display() {
    let m = mem();
    m.write_slice(&[3, 2, 1, 4], GuestAddress(FB)).unwrap(); // R8G8B8A8: red 3, green 2, blue 1
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[5, 67, 1, 1]));
    ok(&mut gpu, &m, &attach(5, &[(FB, 4)]));
    ok(&mut gpu, &m, &cmd(CMD_SET_SCANOUT, &[0, 0, 1, 1, 0, 5]));
    ok(&mut gpu, &m, &transfer(5, [0, 0, 1, 1], 0));
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_FLUSH, &[0, 0, 1, 1, 5, 0]));
    assert!(matches!(&ops[0], DisplayOp::Update { data, .. } if data == &[1, 2, 3, 4]));
}

#[test]
fn hostile_commands_get_error_responses_and_change_nothing() {
    let m = mem();
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    shown(&mut gpu, &m);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("short header", vec![0u8; 8], RESP_ERR_UNSPEC),
        ("unknown command", hdr(0x0999), RESP_ERR_UNSPEC),
        ("3D command", hdr(0x0200), RESP_ERR_UNSPEC),
        (
            "short create",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 2]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "id 0",
            cmd(CMD_RESOURCE_CREATE_2D, &[0, 2, 4, 4]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "id in use",
            cmd(CMD_RESOURCE_CREATE_2D, &[1, 2, 4, 4]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "bad format",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 99, 4, 4]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "zero width",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 0, 4]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "huge",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, u32::MAX, u32::MAX]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "over budget",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 16384, 16384]),
            RESP_ERR_OUT_OF_MEMORY,
        ),
        (
            "unref unknown",
            cmd(CMD_RESOURCE_UNREF, &[9, 0]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "attach unknown",
            attach(9, &[(FB, 16)]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        ("attach twice", attach(1, &[(FB, 16)]), RESP_ERR_UNSPEC),
        (
            "no entries",
            cmd(CMD_RESOURCE_ATTACH_BACKING, &[1, 0]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "entries missing",
            cmd(CMD_RESOURCE_ATTACH_BACKING, &[1, 0x7fff_ffff]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "entries short",
            cmd(CMD_RESOURCE_ATTACH_BACKING, &[1, 2]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "detach unknown",
            cmd(CMD_RESOURCE_DETACH_BACKING, &[9, 0]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "scanout 1",
            cmd(CMD_SET_SCANOUT, &[0, 0, W, H, 1, 1]),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
        (
            "scanout unknown res",
            cmd(CMD_SET_SCANOUT, &[0, 0, W, H, 0, 9]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "scanout outside",
            cmd(CMD_SET_SCANOUT, &[1, 0, W, H, 0, 1]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "scanout overflow",
            cmd(CMD_SET_SCANOUT, &[u32::MAX, 0, 2, 1, 0, 1]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "transfer unknown",
            transfer(9, [0, 0, 1, 1], 0),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "transfer outside",
            transfer(1, [0, 0, W + 1, H], 0),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "transfer overflow",
            transfer(1, [u32::MAX, 0, 2, 1], 0),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "transfer past backing",
            transfer(1, [0, 0, W, H], 4),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "transfer offset wraps",
            transfer(1, [0, 0, 1, 2], u64::MAX - 4),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "flush unknown",
            cmd(CMD_RESOURCE_FLUSH, &[0, 0, 1, 1, 9, 0]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "flush overflow",
            cmd(CMD_RESOURCE_FLUSH, &[0, u32::MAX, 1, 2, 1, 0]),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "edid scanout 3",
            cmd(CMD_GET_EDID, &[3, 0]),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
    ];
    for (name, req, want) in cases {
        let (got, ops) = run(&mut gpu, &m, &req);
        assert_eq!(got, want, "{name}: got {got:#x}");
        assert!(ops.is_empty(), "{name}");
        gpu.take_dirty();
    }
    // Backing outside guest memory, wrapping, or straddling its end: refused, resource kept.
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 4, 4]));
    for entries in [
        vec![(0xffff_ffff_0000_0000u64, 64u32)],
        vec![(u64::MAX - 8, 64)],
        vec![(0x3fff0, 64)],
        vec![(FB, 32), (0x100000, 32)],
    ] {
        assert_eq!(
            run(&mut gpu, &m, &attach(2, &entries)).0,
            RESP_ERR_UNSPEC,
            "{entries:x?}"
        );
    }
    assert_eq!(
        run(&mut gpu, &m, &transfer(2, [0, 0, 1, 1], 0)).0,
        RESP_ERR_UNSPEC,
        "no backing"
    );
    assert_eq!(
        run(&mut gpu, &m, &cmd(CMD_RESOURCE_DETACH_BACKING, &[2, 0])).0,
        RESP_ERR_UNSPEC
    );
    // The device still works.
    fill_pattern(&m, FB);
    ok(&mut gpu, &m, &transfer(1, [0, 0, W, H], 0));
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_FLUSH, &[0, 0, W, H, 1, 0]));
    assert!(matches!(&ops[0], DisplayOp::Update { data, .. } if *data == expected(full())));
}

#[test]
fn the_budget_is_returned_on_unref_and_unref_disables_the_scanout() {
    let m = mem();
    let mut gpu = Gpu::new(640, 480, 64 * 64 * 4);
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[1, 2, 64, 64]));
    assert_eq!(
        run(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 1, 1])).0,
        RESP_ERR_OUT_OF_MEMORY
    );
    ok(&mut gpu, &m, &cmd(CMD_SET_SCANOUT, &[0, 0, 64, 64, 0, 1]));
    let ops = ok(&mut gpu, &m, &cmd(CMD_RESOURCE_UNREF, &[1, 0]));
    assert_eq!(
        ops,
        vec![DisplayOp::Scanout {
            scanout: 0,
            width: 0,
            height: 0
        }]
    );
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 64, 64]));
    assert!(gpu.current_picture().is_empty());
}

#[test]
fn cursor_commands_are_checked() {
    let m = mem();
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    let cursor = |k: u32, scanout: u32, res: u32| cmd(k, &[scanout, 10, 20, 0, res, 1, 2, 0]);
    assert_eq!(
        gpu.cursor(&cursor(CMD_UPDATE_CURSOR, 0, 7)),
        Err(CmdError::InvalidResource)
    );
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[7, 1, 32, 32]));
    assert_eq!(
        gpu.cursor(&cursor(CMD_UPDATE_CURSOR, 0, 7)),
        Err(CmdError::InvalidParameter)
    );
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[8, 1, 64, 64]));
    let ops = gpu.cursor(&cursor(CMD_UPDATE_CURSOR, 0, 8)).unwrap();
    assert!(matches!(
        &ops[0],
        DisplayOp::CursorUpdate {
            x: 10,
            y: 20,
            hot_x: 1,
            hot_y: 2,
            ..
        }
    ));
    assert_eq!(
        gpu.cursor(&cursor(CMD_MOVE_CURSOR, 0, 8)).unwrap(),
        vec![DisplayOp::CursorMove {
            scanout: 0,
            x: 10,
            y: 20
        }]
    );
    assert_eq!(
        gpu.cursor(&cursor(CMD_MOVE_CURSOR, 0, 0)).unwrap(),
        vec![DisplayOp::CursorHide {
            scanout: 0,
            x: 10,
            y: 20
        }]
    );
    assert_eq!(
        gpu.cursor(&cursor(CMD_MOVE_CURSOR, 4, 0)),
        Err(CmdError::InvalidScanout)
    );
    assert_eq!(gpu.cursor(&cursor(0x0999, 0, 0)), Err(CmdError::Unspec));
    assert_eq!(gpu.cursor(&[0u8; 10]), Err(CmdError::InvalidParameter));
    assert_eq!(
        gpu.cursor(&cursor(CMD_UPDATE_CURSOR, 0, 0)).unwrap(),
        vec![DisplayOp::CursorHide {
            scanout: 0,
            x: 10,
            y: 20
        }]
    );
}

#[test]
fn a_snapshot_restores_resources_scanouts_and_pixels_from_guest_memory() {
    let m = mem();
    fill_pattern(&m, FB);
    let mut gpu = Gpu::new(640, 480, 1 << 20);
    shown(&mut gpu, &m);
    ok(&mut gpu, &m, &transfer(1, [0, 0, W, H], 0));
    ok(&mut gpu, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[3, 2, 2, 2])); // no backing
    let before = gpu.current_picture();
    let snap = gpu.snapshot(Some((1, 2)));

    let mut fresh = Gpu::new(640, 480, 1 << 20);
    assert_eq!(fresh.restore(&m, &snap), 2);
    assert_eq!(fresh.current_picture(), before);
    assert_eq!(fresh.snapshot(Some((1, 2))), snap);
    // The restored resource takes further commands.
    ok(&mut fresh, &m, &transfer(1, [0, 0, W, H], 0));
    assert_eq!(
        run(&mut fresh, &m, &cmd(CMD_RESOURCE_CREATE_2D, &[1, 2, W, H])).0,
        RESP_ERR_INVALID_RESOURCE_ID,
        "id 1 exists again"
    );
    // A snapshot naming memory that is not there restores the resource without backing.
    let mut bad = snap.clone();
    bad.resources[0].backing = Some(vec![(0x7000_0000, 64)]);
    let mut other = Gpu::new(640, 480, 1 << 20);
    assert_eq!(other.restore(&m, &bad), 2);
    assert_eq!(
        run(&mut other, &m, &transfer(1, [0, 0, 1, 1], 0)).0,
        RESP_ERR_UNSPEC
    );
}
