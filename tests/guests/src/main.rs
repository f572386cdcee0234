//! `isola-guests list` prints the image names; `isola-guests path NAME` prints the absolute
//! path of image NAME (e.g. `boot-check.elf`): the copy `scripts/install` put in
//! `PREFIX/share/isola/guests/` when this binary is `PREFIX/bin/isola-guests`, else the one
//! the build made in the target directory.

use std::path::PathBuf;
use std::process::ExitCode;

/// Image `name` installed beside this binary (`BIN/../share/isola/guests/NAME`), if there.
fn installed(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let path = exe
        .parent()?
        .parent()?
        .join("share/isola/guests")
        .join(name);
    path.is_file().then_some(path)
}

fn usage() -> ExitCode {
    eprintln!("usage: isola-guests list | isola-guests path NAME");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => {
            for name in isola_guests::IMAGES {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        ["path", name] => {
            match isola_guests::image(name).map(|built| installed(name).unwrap_or(built)) {
                Some(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("isola-guests: unknown image `{name}` (see `isola-guests list`)");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
