//! Logging: human text on stderr by default, or with `LAKESYNC_LOG_FORMAT=json` one JSON object
//! per line, flat, as Kubernetes log pipelines (Fluent Bit, Vector, Loki) expect: `timestamp`,
//! `level`, `target`, `message`, the fields of the event and of its spans (`table`, `run`,
//! `ingest`, ...) and, in `serve`, the `replica`.

use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The replica id `serve` runs as, added to every JSON line once known.
static REPLICA: OnceLock<String> = OnceLock::new();

/// Records the replica id for the log lines that follow.
pub fn set_replica(id: &str) {
    let _ = REPLICA.set(id.to_string());
}

/// Installs the global subscriber: `LAKESYNC_LOG` filters (default: warnings, and the
/// engine's and ingest's info), `LAKESYNC_LOG_FORMAT` = `text` (default) or `json`.
pub fn init() -> Result<(), String> {
    let filter = EnvFilter::try_from_env("LAKESYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,lakesync_engine=info,lakesync_ingest=info"));
    match std::env::var("LAKESYNC_LOG_FORMAT").as_deref() {
        Ok("json") => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .fmt_fields(JsonFields::new())
                .event_format(JsonLine)
                .with_writer(std::io::stderr)
                .init();
        }
        Ok("text") | Ok("") | Err(_) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .init();
        }
        Ok(other) => return Err(format!("LAKESYNC_LOG_FORMAT={other:?}: expected \"text\" or \"json\"")),
    }
    Ok(())
}

/// One flat JSON object per event.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(replica) = REPLICA.get() {
            line.insert("replica".into(), replica.clone().into());
        }
        // The spans' fields, outermost first, so an inner span's value wins.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                        line.extend(fields);
                    }
                }
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields into the line (`message` included).
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}
