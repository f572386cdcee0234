//! Builds the test guests in `guest/` with gcc, ld and objcopy into `OUT_DIR`:
//! `NAME.elf` (ELF64 with a PVH note) for every guest, and `NAME.bzimage` for those that also
//! need a Linux bzImage. See README.md.
//!
//! `vdrivers.elf` is the exception: its ring-3 payload is the Rust crate in `vdrivers/` (drivers
//! from the crates.io `virtio-drivers` crate), built as a no_std staticlib for the host target by
//! a nested `cargo build` with its own target directory, then linked with the same shim and
//! runtime as the C guests.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "src/elf.rs"]
mod elf;

/// Guests: source `guest/NAME.c`, whether a bzImage is made as well as the ELF, and further
/// sources from `guest/` linked into that guest only.
const GUESTS: &[(&str, bool, &[&str])] = &[
    ("boot-check", true, &[]),
    ("msi", false, &[]),
    ("power", false, &[]),
    ("triple-fault", false, &[]),
    ("cpu-check", false, &[]),
    ("virtio-blk", false, &["virtio.c"]),
    ("virtio-net", false, &["virtio.c"]),
    ("virtio-gpu", false, &["virtio.c"]),
    ("virtio-console", false, &["virtio.c"]),
    ("virtio-input", false, &["virtio.c"]),
    ("desktop", false, &["virtio.c"]),
    ("vfio-user", false, &[]),
    ("usb", false, &[]),
];

/// Objects linked into every guest.
const RUNTIME: &[&str] = &["shim.S", "rt.c"];

const IMAGE_BASE: u64 = 0x10_0000;
const ENTRY64_OFFSET: u64 = 0x200;
const SETUP_SIZE: usize = 2 * 512; // SETUP_SECTS = 1, plus the boot sector

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "--param=min-pagesize=0",
    "-nostdlib",
    "-static",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let obj = out.join("obj");
    fs::create_dir_all(&obj).expect("create OUT_DIR/obj");

    rerun_if_changed(&src);
    for tool in ["gcc", "ld", "objcopy"] {
        check_tool(tool);
    }

    let mut runtime = Vec::new();
    for file in RUNTIME {
        runtime.push(compile(&src, &src.join(file), &obj, &[]));
    }
    let mut shared = std::collections::HashMap::new();
    for &(name, bzimage, extra) in GUESTS {
        let guest_obj = compile(&src, &src.join(format!("{name}.c")), &obj, &[]);
        let extra_objs: Vec<PathBuf> = extra
            .iter()
            .map(|file| {
                shared
                    .entry(*file)
                    .or_insert_with(|| compile(&src, &src.join(file), &obj, &[]))
                    .clone()
            })
            .collect();
        let elf_path = out.join(format!("{name}.elf"));
        let mut cmd = Command::new("ld");
        cmd.args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "--build-id=none",
        ])
        .args([
            "-z",
            "max-page-size=0x200000",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
        ])
        .arg("-T")
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf_path)
        .args(&runtime)
        .args(&extra_objs)
        .arg(&guest_obj);
        run(&mut cmd);
        let load_end = check_elf(&elf_path);
        if bzimage {
            make_bzimage(name, &src, &elf_path, load_end, &obj, &out);
        }
    }
    build_vdrivers(&manifest.join("vdrivers"), &src, &runtime, &out);
}

/// Target of the nested build: the host's own (its `core`/`alloc` come with every toolchain,
/// so nothing beyond crates.io is needed); the crate is no_std and linked freestanding.
const VDRIVERS_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Environment the outer cargo sets for build scripts that must not leak into the nested
/// build (flags, wrappers and directories meant for the host crates).
const VDRIVERS_ENV_REMOVE: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
];

/// Builds the Rust payload in `crate_dir` and links it into `vdrivers.elf`.
fn build_vdrivers(crate_dir: &Path, src: &Path, runtime: &[PathBuf], out: &Path) {
    println!(
        "cargo:rerun-if-changed={}",
        crate_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        crate_dir.join("Cargo.lock").display()
    );
    rerun_if_changed(&crate_dir.join("src"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join("vdrivers-target");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--target",
        VDRIVERS_TARGET,
    ])
    .arg("--manifest-path")
    .arg(crate_dir.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir);
    for var in VDRIVERS_ENV_REMOVE {
        cmd.env_remove(var);
    }
    for (var, _) in env::vars_os() {
        if var.to_string_lossy().starts_with("CARGO_PROFILE_") {
            cmd.env_remove(var);
        }
    }
    // Absolute addresses (no GOT indirection in our code); the prebuilt core is PIC, which a
    // static link resolves as well.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("isola-guests: cannot run {cmd:?}: {e}"));
    if !output.status.success() {
        panic!(
            "isola-guests: building the virtio-drivers guest failed ({}): {cmd:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let lib = target_dir
        .join(VDRIVERS_TARGET)
        .join("release")
        .join("libisola_vdrivers_guest.a");
    let elf_path = out.join("vdrivers.elf");
    let mut link = Command::new("ld");
    link.args([
        "-m",
        "elf_x86_64",
        "-nostdlib",
        "-static",
        "--build-id=none",
    ])
    .args(["-z", "max-page-size=0x200000", "-z", "noexecstack"])
    .args(["--no-warn-rwx-segments", "--gc-sections", "--strip-debug"])
    .arg("-T")
    .arg(src.join("guest.ld"))
    .arg("-o")
    .arg(&elf_path)
    .args(runtime)
    .arg(&lib);
    run(&mut link);
    check_elf(&elf_path);
}

/// One `rerun-if-changed` line per source file (and the folder, for added files).
fn rerun_if_changed(src: &Path) {
    println!("cargo:rerun-if-changed={}", src.display());
    let mut files: Vec<PathBuf> = fs::read_dir(src)
        .unwrap_or_else(|e| panic!("isola-guests: cannot read {}: {e}", src.display()))
        .map(|entry| entry.expect("read guest/ entry").path())
        .collect();
    files.sort();
    for file in files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
}

fn check_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "isola-guests: `{tool} --version` failed ({}); the test guests need gcc and GNU \
             binutils (ld, objcopy) for x86_64, e.g. `apt-get install gcc binutils`",
            o.status
        ),
        Err(e) => panic!(
            "isola-guests: cannot run `{tool}` ({e}); the test guests need gcc and GNU binutils \
             (ld, objcopy) for x86_64, e.g. `apt-get install gcc binutils`"
        ),
    }
}

/// Runs a command; panics with its command line and output if it fails, and passes any
/// diagnostics it printed on as cargo warnings.
fn run(cmd: &mut Command) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("isola-guests: cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "isola-guests: {cmd:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
}

fn compile(include: &Path, source: &Path, obj: &Path, defines: &[String]) -> PathBuf {
    let stem = source
        .file_name()
        .expect("source file name")
        .to_string_lossy();
    let object = obj.join(format!("{stem}.o"));
    let mut cmd = Command::new("gcc");
    cmd.args(CFLAGS)
        .arg("-I")
        .arg(include)
        .args(defines)
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object);
    run(&mut cmd);
    object
}

/// Checks what a VMM's loader relies on; returns the end of the loaded image in memory.
fn check_elf(path: &Path) -> u64 {
    let bytes = fs::read(path).expect("read linked guest");
    let image = elf::Elf::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fail = |what: &str| -> ! { panic!("isola-guests: {}: {what}", path.display()) };
    if image.machine != elf::EM_X86_64 {
        fail("not an x86_64 ELF");
    }
    if image.entry != IMAGE_BASE + ENTRY64_OFFSET {
        fail("e_entry is not the 64-bit entry at IMAGE_BASE + 0x200");
    }
    if image.pvh_entry() != Some(IMAGE_BASE as u32) {
        fail("missing or wrong PVH (Xen PHYS32_ENTRY) note");
    }
    for ph in image
        .program_headers
        .iter()
        .filter(|ph| ph.p_type == elf::PT_LOAD)
    {
        if ph.align == 0 || ph.align % 0x20_0000 != 0 {
            fail("PT_LOAD p_align is not a multiple of 2 MiB");
        }
        if ph.paddr != ph.vaddr {
            fail("PT_LOAD is not identity mapped (p_paddr != p_vaddr)");
        }
    }
    match image.load_range() {
        Some((IMAGE_BASE, end)) => end,
        _ => fail("image does not start at IMAGE_BASE"),
    }
}

/// bzImage = real-mode setup sectors (header only; bzimage-setup.S) + the flat payload that
/// the loader puts at 0x100000, i.e. exactly the ELF's loaded bytes.
fn make_bzimage(name: &str, src: &Path, elf_path: &Path, load_end: u64, obj: &Path, out: &Path) {
    let payload_path = obj.join(format!("{name}.payload.bin"));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(elf_path)
        .arg(&payload_path));
    let payload = fs::read(&payload_path).expect("read payload");

    let syssize = payload.len().div_ceil(16);
    let init_size = (load_end - IMAGE_BASE).next_multiple_of(0x1000);
    let defines = [
        format!("-DSYSSIZE={syssize:#x}"),
        format!("-DINIT_SIZE={init_size:#x}"),
    ];
    let setup_obj = compile(src, &src.join("bzimage-setup.S"), obj, &defines);
    let setup_path = obj.join(format!("{name}.setup.bin"));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&setup_obj)
        .arg(&setup_path));
    let mut image = fs::read(&setup_path).expect("read setup");
    assert_eq!(
        image.len(),
        SETUP_SIZE,
        "bzimage-setup.S must assemble to 1024 bytes"
    );
    image.extend_from_slice(&payload);
    fs::write(out.join(format!("{name}.bzimage")), image).expect("write bzImage");
}
