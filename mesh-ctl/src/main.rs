//! The `meshctl` binary: parse, run, and turn a failure into one line on stderr and an exit
//! code (`meshctl --help` lists them).

use std::process::ExitCode;

use clap::Parser;
use mesh_ctl::{exit, run, Cli, Error};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and --version exit 0, usage errors 2, as clap decides.
        Err(e) => e.exit(),
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|runtime| {
            let result = runtime.block_on(run(cli));
            // A name lookup that timed out may still be running on a blocking thread: the
            // answer is decided, so do not wait for it.
            runtime.shutdown_background();
            result
        });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
