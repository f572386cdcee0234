//! isola-vmconfig: the VM file for `scripts/isola-run`.
//!
//! ```text
//! isola-vmconfig args FILE      the file's VM as isola-run flags, each ended by a NUL byte
//! isola-vmconfig toml FLAGS...  the VM those isola-run flags describe, as a VM file
//!                               (defaults made explicit, relative paths made absolute)
//! ```
//!
//! A refused file or flag: one line on stderr (`FILE:LINE: KEY: why`), exit status 2.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("isola-vmconfig: {why}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let written = match args.split_first() {
        Some((cmd, [file])) if cmd == "args" => {
            let vm = isola_vmconfig::file::load(file.as_ref()).map_err(|e| e.to_string())?;
            let mut bytes = Vec::new();
            for arg in isola_vmconfig::args::to_args(&vm) {
                bytes.extend_from_slice(arg.as_bytes());
                bytes.push(0);
            }
            out.write_all(&bytes)
        }
        Some((cmd, flags)) if cmd == "toml" => {
            let mut vm = isola_vmconfig::args::from_args(flags)?.resolved();
            let cwd = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
            vm.make_absolute(&cwd);
            let mut text = toml::to_string(&vm).map_err(|e| format!("cannot write TOML: {e}"))?;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            out.write_all(text.as_bytes())
        }
        _ => return Err("usage: isola-vmconfig args FILE | isola-vmconfig toml FLAGS...".into()),
    };
    written
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}
