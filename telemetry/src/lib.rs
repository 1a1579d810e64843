//! Logging set-up shared by every Tether program.
//!
//! Every binary flattens [`LogArgs`] into its clap parser and calls [`LogArgs::init`] first
//! thing, so all programs accept the same `--log-format` / `--log-level` flags and honour
//! `RUST_LOG`. Human-readable output is the default because the first reader is usually a
//! person at a terminal or `journalctl`; JSON exists for log shippers.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// How log lines are rendered on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// One readable line per event, for terminals and the journal.
    #[default]
    Human,
    /// One JSON object per event, for log shippers.
    Json,
}

/// Command-line flags that control logging; flatten into a program's top-level parser.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "TETHER_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
    /// Default log filter when RUST_LOG is unset (tracing-subscriber EnvFilter syntax).
    #[arg(long, default_value = "info", env = "TETHER_LOG_LEVEL", global = true)]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the global subscriber. Safe to call more than once (later calls are no-ops),
    /// so tests that run a program's `main` logic in-process do not panic.
    pub fn init(&self) {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&self.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        // Colours only for a person at a terminal: the journal and log files get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let _ = match self.log_format {
            LogFormat::Human => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn parses_formats() {
        let cases = [
            (vec!["x"], LogFormat::Human),
            (vec!["x", "--log-format", "json"], LogFormat::Json),
            (vec!["x", "--log-format", "human"], LogFormat::Human),
        ];
        for (args, want) in cases {
            assert_eq!(Cli::try_parse_from(args).unwrap().log.log_format, want);
        }
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
    }
}
