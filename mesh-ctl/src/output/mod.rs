//! What meshctl prints: a table for people, or the API's own documents as JSON or YAML for
//! programs (the same fields the node sent, nothing shortened).

pub mod human;
pub mod table;

use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::error::Error;

/// Tables fit this many columns unless the terminal is known to be wider.
pub const DEFAULT_WIDTH: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// The width tables are fitted to: `COLUMNS` if set, else the terminal's, else 80.
pub fn width() -> usize {
    if let Some(columns) = std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()) {
        return columns;
    }
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        if let Ok(size) = rustix::termios::tcgetwinsize(&stdout) {
            if size.ws_col > 0 {
                return usize::from(size.ws_col);
            }
        }
    }
    DEFAULT_WIDTH
}

/// `value` as JSON or YAML, or as `table` renders it.
pub fn render<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<String, Error> {
    match format {
        Format::Table => Ok(table(value)),
        Format::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| Error::Local(format!("encoding JSON: {e}"))),
        Format::Yaml => {
            serde_norway::to_string(value).map_err(|e| Error::Local(format!("encoding YAML: {e}")))
        }
    }
}

/// Writes a command's result to stdout. A closed pipe (`meshctl ... | head`) is not an error
/// worth a message, so it ends quietly.
pub fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(|e| Error::Local(format!("writing the output: {e}"))),
    }
}
