//! `isola-guests list` prints the image names; `isola-guests path NAME` prints the absolute
//! path of image NAME (e.g. `boot-check.elf`).

use std::process::ExitCode;

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
        ["path", name] => match isola_guests::image(name) {
            Some(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("isola-guests: unknown image `{name}` (see `isola-guests list`)");
                ExitCode::FAILURE
            }
        },
        _ => usage(),
    }
}
