//! The agent's logs: a tracing subscriber in text or JSON, whose filter the admin API can
//! change at run time (`PUT /v1/log-level`) without a restart.
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Reads and replaces the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// The filter in force, as `EnvFilter` prints it.
    pub fn current(&self) -> String {
        self.handle.with_current(|f| f.to_string()).unwrap_or_default()
    }

    /// Replaces the filter; a malformed one is refused with the parser's reason and the old
    /// one stays.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber, writing to stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<LogControl, tracing_subscriber::filter::ParseError> {
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let output = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output).init();
    Ok(LogControl { handle })
}
