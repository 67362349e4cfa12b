//! Writes the manual pages (`sluice.1`, `sluice-run.1`, …) into the directory given as the only
//! argument. Run by `cargo xtask man`, `package` and `install`; see `sluice::cli::man`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: sluice-man DIR   (writes sluice.1 and one page per subcommand into DIR)");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("sluice-man: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for page in sluice::cli::man::pages() {
        let path = dir.join(page.file_name());
        if let Err(e) = std::fs::write(&path, &page.roff) {
            eprintln!("sluice-man: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}
